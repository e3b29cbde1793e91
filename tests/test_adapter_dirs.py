"""A LoRA run saved without its merged model (``model.lora.save_merged: false``) is still a
model: its ``adapter/`` loads as the base plus the adapter, in ``preftune eval``, as a
reference and across online rounds, equal to the merged model it stands for."""

import json
from pathlib import Path
import shutil

import pytest
import torch

from preftune.api import Config, evaluate, run_online, train
from preftune.config import ConfigError
from preftune.model.load import load_model_and_tokenizer
from tiny_models import save_tiny_model_dir

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run that wrote both ``model/`` (merged) and ``adapter/``, and the same run with
    the merged copy removed."""
    root = tmp_path_factory.mktemp("adapter")
    save_tiny_model_dir(root / "base")
    rows = [{"prompt": f"Q{i}: say yes.", "chosen": " yes", "rejected": " no thanks"}
            for i in range(8)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = train(Config.from_dict({
        "output_dir": str(root / "run"), "model": {"path": str(root / "base"), "lora": LORA},
        "data": {"train": str(root / "pairs.jsonl")},
        "reference": {"cache_dir": str(root / "cache")},
        "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-2}}), show_progress=False)
    adapter_only = root / "adapter_only"
    shutil.copytree(run, adapter_only, ignore=shutil.ignore_patterns("model", "eval*"))
    return root, run, adapter_only


def weights(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_an_adapter_dir_loads_as_its_merged_model(lora_run):
    root, run, _ = lora_run
    merged, _ = load_model_and_tokenizer(str(run / "model"))
    from_adapter, tokenizer = load_model_and_tokenizer(str(run / "adapter"))
    base, _ = load_model_and_tokenizer(str(root / "base"))
    expected = weights(merged)
    assert weights(from_adapter).keys() == expected.keys()
    for name, tensor in weights(from_adapter).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
    trained = "model.layers.0.self_attn.q_proj.weight"  # training moved the adapted weights
    assert not torch.equal(expected[trained], weights(base)[trained])
    assert type(from_adapter).__name__ == "LlamaForCausalLM"  # a plain model, no PEFT wrapper
    assert len(tokenizer) == len(load_model_and_tokenizer(str(run / "model"))[1])


def test_an_adapter_dir_trains_in_full_as_its_merged_model(lora_run, tmp_path):
    """model.path an adapter/ and no LoRA: every weight trains, as from the merged model/."""
    root, run, adapter_only = lora_run
    losses, trained = [], []
    for name, path in (("merged", run / "model"), ("adapter", adapter_only / "adapter")):
        out = train(Config.from_dict({
            "output_dir": str(tmp_path / name), "model": {"path": str(path)},
            "data": {"train": str(root / "pairs.jsonl")},
            "reference": {"cache_dir": str(tmp_path / f"cache-{name}")},
            "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-2}}),
            show_progress=False)
        losses.append([json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()])
        trained.append(weights(load_model_and_tokenizer(str(out / "model"))[0]))
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    moved = "model.layers.1.mlp.down_proj.weight"  # not adapted: trains only in full
    assert not torch.equal(trained[1][moved], weights(load_model_and_tokenizer(
        str(run / "model"))[0])[moved])
    for name, tensor in trained[1].items():
        torch.testing.assert_close(tensor, trained[0][name], rtol=0, atol=1e-4)


def test_lora_on_an_adapter_records_the_merged_model_beside_it_so_peft_loads_it(lora_run,
                                                                                tmp_path):
    """A second LoRA run on run/adapter names run/model (base + first adapter, merged) as its
    base: PEFT's own loader gives the trained model. It named run/adapter, which transformers
    loads as the base with the first adapter unmerged, and PEFT then replaced that adapter by
    the second (a warning, and the first run's training gone)."""
    from peft import AutoPeftModelForCausalLM

    root, run, adapter_only = lora_run

    def lora_on(path: Path, name: str):
        return train(Config.from_dict({
            "output_dir": str(tmp_path / name), "model": {"path": str(path), "lora": LORA},
            "data": {"train": str(root / "pairs.jsonl")},
            "reference": {"cache_dir": str(tmp_path / "cache")},
            "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-2}}),
            show_progress=False)

    second = lora_on(run / "adapter", "second")
    saved = json.loads((second / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(run / "model")
    ids = torch.tensor([[5, 17, 40, 33, 9, 21]])
    merged, _ = load_model_and_tokenizer(str(second / "model"))
    by_peft = AutoPeftModelForCausalLM.from_pretrained(str(second / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(by_peft(ids).logits, merged(ids).logits, rtol=0, atol=1e-5)
    # without run/model beside it, the chain names the adapter (preftune loads it in order)
    chained = lora_on(adapter_only / "adapter", "chained")
    assert json.loads((chained / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(adapter_only / "adapter")


def test_eval_of_an_adapter_only_run_equals_eval_of_the_merged_run(lora_run, tmp_path):
    root, run, adapter_only = lora_run
    options = {"reference": str(root / "base"), "samples": 0}
    merged = evaluate(str(run), str(root / "pairs.jsonl"), output=str(tmp_path / "a"), **options)
    adapter = evaluate(str(adapter_only), str(root / "pairs.jsonl"), output=str(tmp_path / "b"),
                       **options)
    assert adapter["settings"]["model_dir"] == str(adapter_only / "adapter")
    assert adapter["rewards/margin"] != 0.0
    for key in ("rewards/accuracy", "rewards/margin", "displacement/chosen",
                "displacement/rejected"):
        assert adapter[key] == pytest.approx(merged[key], abs=1e-6), key


def test_an_adapter_without_a_base_says_so(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ConfigError, match="is a PEFT adapter whose adapter_config.json names no "
                                          "base model"):
        load_model_and_tokenizer(str(tmp_path / "adapter"))


def count_a(prompt, response):
    return float(response.count("a"))


def test_online_rounds_without_merged_copies_train_like_merged_ones(lora_run, tmp_path):
    root, rounds = lora_run[0], 2
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say a{'a' * k} {k}"}) + "\n"
                               for k in range(6)))

    def online(name, save_merged):
        return run_online({
            "output_dir": str(tmp_path / name),
            "model": {"path": str(root / "base"), "lora": {**LORA, "save_merged": save_merged}},
            "data": {"train": str(prompts), "max_length": 64, "max_prompt_length": 32},
            "reference": {"cache_dir": str(tmp_path / "cache")},
            "train": {"learning_rate": 1e-2, "batch_size": 2, "max_steps": 2, "seed": 0,
                      "warmup_ratio": 0.0},
            "online": {"rounds": rounds, "scorer": "test_adapter_dirs:count_a",
                       "reference": "previous",
                       "sampling": {"samples": 4, "max_new_tokens": 10, "batch_size": 4}}})

    merged, adapters = online("merged", True), online("adapters", False)
    last = f"round-{rounds}"
    assert not (adapters / last / "model").exists()
    config = json.loads((adapters / last / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(adapters / f"round-{rounds - 1}" / "adapter")
    summary = json.loads((adapters / "online.json").read_text())
    assert summary["rounds"][-1]["policy"] == str(adapters / f"round-{rounds - 1}" / "adapter")
    expected = weights(load_model_and_tokenizer(str(merged / last / "model"))[0])
    for name, tensor in weights(load_model_and_tokenizer(str(adapters / last / "adapter"))[0]
                                ).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5)


def test_vllm_sampling_needs_merged_round_models(tmp_path):
    from preftune.config import build_config
    from preftune.online.config import OnlineConfig

    tree = {"output_dir": str(tmp_path), "data": {"train": "prompts.jsonl"},
            "model": {"lora": {**LORA, "save_merged": False}},
            "online": {"scorer": "synthetic", "sampling": {"backend": "vllm"}}}
    with pytest.raises(ConfigError, match="online.sampling.backend vllm loads each round's model "
                                          "from its directory, and LoRA writes one only with "
                                          "model.lora.save_merged: true"):
        build_config(tree, schema=OnlineConfig)
    tree["model"]["lora"]["save_merged"] = True
    assert build_config(tree, schema=OnlineConfig).online.sampling.backend == "vllm"


def test_a_run_dir_given_as_a_model_names_the_model_inside(lora_run):
    _, run, adapter_only = lora_run
    for directory, inside in ((run, run / "model"), (adapter_only, adapter_only / "adapter")):
        with pytest.raises(FileNotFoundError, match=f"model.path: {directory} has no config.json"
                                                    f".*; it is a preftune run directory: give "
                                                    f"the model it trained, {inside}$"):
            load_model_and_tokenizer(str(directory))


def test_eval_against_the_adapters_base_holds_one_copy_and_equals_two_models(lora_run, tmp_path,
                                                                            monkeypatch):
    """With the adapter's base as reference, eval loads the base once: the policy is it with
    the adapter, the reference it with the adapter disabled. Its numbers equal the plain path's,
    the merged model/ against a separate copy of the base."""
    from preftune.model import load as loading

    root, run, _ = lora_run
    loads, load = [], loading.load_model
    monkeypatch.setattr(loading, "load_model",
                        lambda path, *args, **kwargs: loads.append(path) or load(path, *args,
                                                                                  **kwargs))
    shutil.copytree(root / "base", tmp_path / "copy")
    options = {"samples": 2, "max_new_tokens": 4, "scorer": "test_adapter_dirs:count_a"}
    results, rows, answers = {}, {}, {}
    for name, reference in (("shared", root / "base"), ("plain", tmp_path / "copy")):
        loads.clear()
        results[name] = evaluate(str(run), str(root / "pairs.jsonl"), reference=str(reference),
                                 output=str(tmp_path / name), **options)
        rows[name] = [json.loads(line) for line in
                      (tmp_path / name / "eval_pairs.jsonl").read_text().splitlines()]
        answers[name] = [json.loads(line) for line in
                         (tmp_path / name / "eval_answers.jsonl").read_text().splitlines()]
        assert loads == ([str(reference)] if name == "shared" else
                         [str(run / "model"), str(reference)]), name
    for key in ("ref_logp_chosen", "ref_logp_rejected", "logp_chosen", "logp_rejected"):
        assert [r[key] for r in rows["shared"]] == pytest.approx(
            [r[key] for r in rows["plain"]], abs=1e-5), key
    # the adapter was on for the policy and off for the reference
    assert [r["logp_chosen"] for r in rows["shared"]] != pytest.approx(
        [r["ref_logp_chosen"] for r in rows["shared"]], abs=1e-3)
    assert [a["reference_answer"] for a in answers["shared"]] == \
        [a["reference_answer"] for a in answers["plain"]]
    for key in ("rewards/margin", "sampled/kl", "win_rate"):
        assert results["shared"][key] == pytest.approx(results["plain"][key], abs=1e-4), key


def test_an_adapter_trained_on_a_relative_base_loads_from_anywhere(lora_run, tmp_path,
                                                                   monkeypatch):
    root, _, _ = lora_run
    monkeypatch.chdir(root)  # model.path given relative to the run's working directory
    run = train(Config.from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"path": "base", "lora": {
            **LORA, "save_merged": False}},
        "data": {"train": "pairs.jsonl"},
        "train": {"batch_size": 4, "max_steps": 1, "learning_rate": 1e-2}}), show_progress=False)
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str((root / "base").resolve())
    monkeypatch.chdir(tmp_path)
    model, _ = load_model_and_tokenizer(str(run / "adapter"))  # (the relative name: refused)
    base, _ = load_model_and_tokenizer(str(root / "base"))
    assert torch.equal(model.get_input_embeddings().weight, base.get_input_embeddings().weight)
