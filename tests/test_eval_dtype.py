"""What evaluation and scoring load their models in: ``--dtype`` of ``preftune eval`` and of
``preftune rm eval | score | strength | fit-cpm``, whose default ``auto`` is the dtype the
evaluated model's weights are saved in (``saved_dtype``); eval's reference and scorer follow
the policy's dtype, a scorer file's models the dtype its scorer is loaded in, and the UPO
estimator loads in the run's ``model.dtype``."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from preftune.cli import main
from preftune.model.load import saved_dtype
from preftune.reward.config import build_reward_config
from preftune.reward.train import train_reward_model
from preftune.score import load_scorer
from test_reward_model import digit_pairs, write_jsonl
from tiny_models import save_tiny_model_dir

pytestmark = pytest.mark.filterwarnings("ignore")


def write_config(directory, tree: dict):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(tree))
    return str(directory)


def test_saved_dtype_reads_the_config_and_an_adapters_base(tmp_path):
    assert saved_dtype(write_config(tmp_path / "a", {"dtype": "bfloat16"})) == "bfloat16"
    assert saved_dtype(write_config(tmp_path / "b", {"torch_dtype": "float16"})) == "float16"
    vlm = {"text_config": {"dtype": "bfloat16"}, "vision_config": {}}
    assert saved_dtype(write_config(tmp_path / "c", vlm)) == "bfloat16"
    assert saved_dtype(write_config(tmp_path / "d", {})) == "float32"
    assert saved_dtype(write_config(tmp_path / "e", {"dtype": "float64"})) == "float32"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(tmp_path / "a")}))
    assert saved_dtype(str(adapter)) == "bfloat16"


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """A run whose policy was saved in bf16, a float32 reference, eight pairs."""
    root = tmp_path_factory.mktemp("dtype")
    save_tiny_model_dir(root / "reference", seed=0)
    save_tiny_model_dir(root / "fp32", seed=1)
    policy = AutoModelForCausalLM.from_pretrained(root / "fp32", dtype=torch.bfloat16)
    policy.save_pretrained(root / "run" / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "run" / "model" / name).write_bytes((root / "fp32" / name).read_bytes())
    (root / "run" / "run.json").write_text("{}")
    write_jsonl(root / "pairs.jsonl", digit_pairs(8, 3))
    return root


def eval_rows(root, *dtype) -> tuple[dict, list[dict]]:
    run = root / "run"
    assert main(["eval", "--model", str(run), "--data", str(root / "pairs.jsonl"),
                 "--reference", str(root / "reference"), "--samples", "0", *dtype]) == 0
    rows = [json.loads(line) for line in (run / "eval_pairs.jsonl").read_text().splitlines()]
    return json.loads((run / "eval.json").read_text()), rows


def test_eval_loads_every_model_in_the_policys_saved_dtype_by_default(bf16_run, capsys):
    auto, auto_rows = eval_rows(bf16_run)
    assert auto["settings"]["dtype"] == "bfloat16"  # what run/model's config.json says
    assert "(8 pairs, bfloat16, beta 0.1, CHES with the reference)" in capsys.readouterr().out
    _, bf16_rows = eval_rows(bf16_run, "--dtype", "bfloat16")
    fp32, fp32_rows = eval_rows(bf16_run, "--dtype", "float32")
    assert fp32["settings"]["dtype"] == "float32"
    for key in ("logp_chosen", "ref_logp_chosen", "logp_rejected", "ref_logp_rejected"):
        assert [r[key] for r in auto_rows] == [r[key] for r in bf16_rows], key
        # the same weights computed in float32 give other values: the reference (saved in
        # float32) was loaded in bf16 under auto, as the policy was
        assert [r[key] for r in auto_rows] != [r[key] for r in fp32_rows], key
        assert [r[key] for r in auto_rows] == pytest.approx([r[key] for r in fp32_rows],
                                                           rel=0.05), key


def test_rm_commands_load_the_reward_model_as_saved_or_in_the_dtype_given(tmp_path):
    save_tiny_model_dir(tmp_path / "decoder")
    data = write_jsonl(tmp_path / "pairs.jsonl", digit_pairs(8, 1))
    run = train_reward_model(build_reward_config({
        "output_dir": str(tmp_path / "rm"), "model": {"path": str(tmp_path / "decoder")},
        "data": {"train": str(data)}, "train": {"batch_size": 4, "max_steps": 2}}),
        show_progress=False)

    def scores(*dtype) -> list[float]:
        out = tmp_path / "scored.jsonl"
        assert main(["rm", "score", "--model", str(run), "--data", str(data), "--output",
                     str(out), "--overwrite", *dtype]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        return [r["chosen_score"] for r in rows] + [r["rejected_score"] for r in rows]

    saved = scores()  # trained in float32: saved in float32
    assert saved == scores("--dtype", "float32")
    halved = scores("--dtype", "bfloat16")
    assert halved != saved and halved == pytest.approx(saved, abs=0.05)
    for dtype, expected in (("auto", saved), ("bfloat16", halved)):
        assert main(["rm", "eval", "--model", str(run), "--data", str(data), "--output",
                     str(tmp_path / dtype), "--dtype", dtype]) == 0
        results = json.loads((tmp_path / dtype / "rm_eval.json").read_text())
        assert results["settings"]["dtype"] == dtype
        pairs = [json.loads(line) for line in
                 (tmp_path / dtype / "rm_eval_pairs.jsonl").read_text().splitlines()]
        assert [p["reward_chosen"] for p in pairs] == pytest.approx(expected[:8], abs=1e-6)


def test_a_scorer_files_models_load_in_the_scorers_dtype(bf16_run, tmp_path):
    """Follow-up likelihood and a compositional preference model described in a YAML file
    load their model in the dtype the scorer is loaded in, as judge:PATH does."""
    judge = str(bf16_run / "fp32")
    files = {"follow_up": {"model": judge}, "compositional": {
        "judge": judge, "features": {"short": "Is it short?"}, "weights": {"short": 1.0}}}
    for key, tree in files.items():
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump({key: tree}))
        for dtype in ("bfloat16", "float32"):
            scorer = load_scorer(str(path), dtype=dtype)
            model = scorer.model if key == "follow_up" else scorer.judges[0].model
            assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}, key


def test_fit_cpm_rates_with_the_judge_as_saved_or_in_the_dtype_given(bf16_run, tmp_path):
    source = tmp_path / "cpm.yaml"
    source.write_text(yaml.safe_dump({"compositional": {
        "judge": str(bf16_run / "run" / "model"),  # saved in bf16
        "features": {"short": "Is it short?", "digits": "Does it have digits?"}}}))

    def fitted(*dtype) -> dict:
        out = tmp_path / "fitted.yaml"
        assert main(["rm", "fit-cpm", str(source), "--data", str(bf16_run / "pairs.jsonl"),
                     "--output", str(out), "--overwrite", *dtype]) == 0
        return yaml.safe_load(out.read_text())["compositional"]["weights"]

    auto = fitted()
    assert auto == fitted("--dtype", "bfloat16")
    fp32 = fitted("--dtype", "float32")
    assert auto != fp32 and auto == pytest.approx(fp32, abs=0.05)
