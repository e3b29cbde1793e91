"""Wiring of the reference needs through config and loop: several references (MRPO) and the
reference's full distributions (TDPO)."""

import json

import pytest
from tokenizers import Tokenizer, models

from preftune.config import ConfigError, build_config
from preftune.data.records import DataError
from preftune.train import loop
from preftune.train.logging import read_metrics
from tiny_models import save_tiny_model_dir


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    save_tiny_model_dir(root / "model")
    pairs = [{"prompt": f"{a}+{a}=", "chosen": f" {2 * a}", "rejected": f" {2 * a + 1}!"}
             for a in range(12)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root


def _config(root, name, **reference):
    return build_config({
        "output_dir": str(root / "runs" / name), "model": {"path": str(root / "model")},
        "data": {"train": str(root / "pairs.jsonl")}, "objective": {"name": name},
        "reference": {"cache_dir": str(root / "cache"), **reference},
        "train": {"learning_rate": 1e-2, "batch_size": 4, "max_steps": 3}})


def test_mrpo_with_the_initial_model_as_extra_reference_is_dpo(workspace):
    """Every reference equal to the initial policy: the combined reference is it, so MRPO's
    losses, whatever the weights, equal DPO's step by step."""
    dpo = loop.train(_config(workspace, "dpo"), show_progress=False)
    config = _config(workspace, "mrpo", extra_models=[str(workspace / "model")])
    config.objective[0].__pydantic_extra__["weights"] = [0.3, 0.7]
    mrpo = loop.train(config, show_progress=False)
    for a, b in zip(read_metrics(dpo / "metrics.jsonl"), read_metrics(mrpo / "metrics.jsonl")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_mrpo_config_errors(workspace):
    with pytest.raises(ConfigError, match="reference.extra_models"):
        _config(workspace, "mrpo")
    with pytest.raises(ConfigError, match="does nothing for dpo"):
        _config(workspace, "dpo", extra_models=[str(workspace / "model")])


def test_mrpo_refuses_an_extra_reference_with_another_tokenizer(workspace, tmp_path):
    other = save_tiny_model_dir(tmp_path / "other")
    vocab = json.loads((other / "tokenizer.json").read_text())
    backend = Tokenizer(models.WordLevel({"<pad>": 0, "x": 1}, unk_token="<pad>"))
    vocab["model"] = json.loads(backend.to_str())["model"]
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(DataError, match="different tokenizer"):
        loop.train(_config(workspace, "mrpo", extra_models=[str(other)]), show_progress=False,
                   overwrite=True)


def test_tdpo_picks_a_reference_with_distributions(workspace):
    assert _config(workspace, "tdpo").reference_strategy == "live"
    with pytest.raises(ConfigError, match="full next-token"):
        _config(workspace, "tdpo", strategy="precomputed")
    lora = _config(workspace, "tdpo").model_dump()
    lora["model"]["lora"] = {"r": 4}
    assert build_config(lora).reference_strategy == "adapter-off"


def test_tdpo_trains_with_lora_and_the_adapter_off_reference(workspace):
    tree = _config(workspace, "tdpo").model_dump()
    tree["output_dir"] = str(workspace / "runs" / "tdpo-lora")
    tree["model"]["lora"] = {"r": 4}
    log = read_metrics(loop.train(build_config(tree), show_progress=False) / "metrics.jsonl")
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 1
    assert log[-1]["rewards/margins"] != 0.0


def test_a_reference_model_of_its_own_can_be_live_and_gives_the_precomputed_numbers(
        workspace, tmp_path):
    """reference.model kept in memory (live) equals its precomputed table step by step; with
    LoRA, a per-token objective's auto reference becomes it live (adapters off would show the
    policy's own base), and adapters off with reference.model is refused."""
    other = str(save_tiny_model_dir(tmp_path / "other", seed=5))
    runs = [loop.train(_config(workspace, "dpo", model=other, strategy=strategy),
                       show_progress=False, overwrite=True) for strategy in ("precomputed", "live")]
    precomputed, live = (read_metrics(run / "metrics.jsonl") for run in runs)
    assert [m["logps/ref_chosen"] for m in live] == pytest.approx(
        [m["logps/ref_chosen"] for m in precomputed], rel=1e-5)
    assert [m["loss"] for m in live] == pytest.approx([m["loss"] for m in precomputed], rel=1e-5)
    assert precomputed[0]["loss"] != pytest.approx(0.6931, abs=1e-3)  # another model's numbers
    lora = _config(workspace, "tdpo", model=other).model_dump()
    lora["model"]["lora"] = {"r": 4}
    assert build_config(lora).reference_strategy == "live"
    lora["reference"]["strategy"] = "adapter-off"
    with pytest.raises(ConfigError, match="reference.model is read by the precomputed and live "
                                          "references, but the reference here is 'adapter-off'"):
        build_config(lora)
