"""``preftune online --plan``: the sampling memory against the tensor bytes a generate call
peaks at (the CPU allocator's count), the training part equal to ``preftune train --plan`` on
the worst-case rows it describes, written out as a pairs file, and nothing written."""

import json

import pytest
import torch
import yaml
from common import PhaseMemory
from transformers import LlamaConfig, LlamaForCausalLM

from preftune import api
from preftune.cli import main
from preftune.generation import HFGenerator, SamplingSettings
from preftune.online.config import SamplingSection
from preftune.online.plan import sampling_lines
from tiny_models import char_tokenizer, save_tiny_model_dir

NEW_TOKENS = 16
SCORER = "test_online_plan:shortness"


def shortness(prompt, response):
    return -float(len(response))


@pytest.fixture()
def workspace(tmp_path):
    save_tiny_model_dir(tmp_path / "model")
    rows = [{"prompt": f"Q{i}: say yes" + "!" * (i % 5)} for i in range(12)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"output_dir": str(tmp_path / "online"), "model": {"path": str(tmp_path / "model")},
              "data": {"train": str(tmp_path / "prompts.jsonl")},
              "objective": {"name": "dpo"}, "train": {"batch_size": 4, "max_steps": 2},
              "online": {"rounds": 2, "scorer": SCORER,
                         "sampling": {"samples": 4, "max_new_tokens": NEW_TOKENS}}}
    (tmp_path / "online.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_training_part_is_train_plan_on_the_worst_rows_and_nothing_is_written(workspace,
                                                                              capsys):
    assert main(["online", str(workspace / "online.yaml"), "--plan"]) == 0
    printed = capsys.readouterr().out
    assert "rounds             2, 12 of 12 prompts each x 4 samples of up to 16 tokens" \
        in printed
    assert f"pairs              best_vs_worst, scored by {SCORER}" in printed
    assert f"scoring            {SCORER}: a Python function: no model" in printed
    assert "training (round 1, on the 12 longest prompts with 2 responses of 16 tokens " \
        "each):" in printed
    assert not (workspace / "online").exists()
    # the same plan from `preftune train --plan` on pairs of those prompts whose responses
    # hold 16 characters (16 tokens of the character tokenizer, and the EOS)
    rows = [{"prompt": f"Q{i}: say yes" + "!" * (i % 5), "chosen": "a" * NEW_TOKENS,
             "rejected": "b" * NEW_TOKENS} for i in range(12)]
    (workspace / "worst.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    api.train({"output_dir": str(workspace / "offline"), "model": {"path": str(workspace /
                                                                               "model")},
               "data": {"train": str(workspace / "worst.jsonl"), "shape": "pairs"},
               "objective": {"name": "dpo"}, "train": {"batch_size": 4, "max_steps": 2}},
              plan_only=True)
    offline = capsys.readouterr().out
    training = printed[printed.index("objective "):]
    assert training == offline[offline.index("objective "):]
    assert "worst micro-batch  8 rows x 32 tokens" in training  # 15-token prompts, 16 + EOS


@pytest.mark.parametrize("mode", ["rounds", "per_step"])
def test_a_judge_of_the_policys_kind_holds_no_weights_of_its_own_in_per_step_mode(
        workspace, capsys, monkeypatch, mode):
    """per_step judges with the policy in training (rounds load the round's model for it):
    its weights are training's, not counted again on top."""
    from preftune.online import plan

    monkeypatch.setattr(plan, "MIB", 1)  # (bytes: the tiny model's weights round to 0 MiB)
    config = yaml.safe_load((workspace / "online.yaml").read_text())
    config["online"]["scorer"] = "judge:policy"
    if mode == "per_step":
        config["online"].pop("rounds")
        config["online"]["mode"] = "per_step"
    path = workspace / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["online", str(path), "--plan"]) == 0
    weights = next(line for line in capsys.readouterr().out.splitlines()
                   if line.startswith("  weights") and "judge:policy" in line)
    held = int(weights.split()[1])
    if mode == "per_step":
        assert held == 0 and weights.endswith("(the policy, judge:policy: training holds them)")
    else:
        from preftune.model.load import load_model_and_tokenizer
        from preftune.train.plan import weight_bytes

        assert held == weight_bytes(load_model_and_tokenizer(str(workspace / "model"))[0])


@pytest.mark.parametrize("samples", [pytest.param(4, marks=pytest.mark.slow), 1],
                         ids=["last-step", "prefill"])
def test_sampling_memory_is_within_a_few_percent_of_a_generate_calls_peak(samples):
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    # a vocabulary as wide as a real one's makes each step's logits count
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=20000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)).eval()
    settings = SamplingSection(samples=samples, max_new_tokens=64, batch_size=8)
    prompts = [torch.randint(3, 90, (length,)).tolist() for length in [100] + [60] * 15]
    printed = sampling_lines(settings, model, [len(p) for p in prompts], 4, per_call=8)
    planned = float(next(line for line in printed if "total" in line).split()[1])
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    memory = PhaseMemory("tensors")
    generated = HFGenerator(model, tokenizer).generate(prompts, SamplingSettings(
        samples=samples, max_new_tokens=64, batch_size=8, seed=0))
    measured = weights + memory.stop()["setup"]
    assert max(len(s) for p in generated.token_ids for s in p) == 64  # the cache grew fully
    assert printed[0].endswith(f"8 prompts x {samples} samples, 100 + 64 tokens, "
                               "transformers):")
    assert printed[-1].endswith("(at the last step)" if samples == 4 else
                                "(at the prompts' prefill)")
    assert planned == pytest.approx(measured, rel=0.05)


def scorer_dir(directory, vocab_size: int, hidden: int, mlp: int):
    """A saved Llama with ``hidden``-wide residuals and ``mlp``-wide MLPs."""
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def planned(lines: list[str], label: str) -> float:
    return float(next(line for line in lines if line.strip().startswith(label)).split()[1])


@pytest.mark.parametrize("width", [(64, 2048), (192, 512)], ids=["wide-mlp", "narrow-mlp"])
@pytest.mark.parametrize("kind", ["judge", "judge-pair", "rm", "follow-up"])
def test_scoring_memory_is_near_a_scorers_peak(kind, width, tmp_path):
    """The scoring phase's weights equal the loaded scorer's; its working tensors are within
    5% of what one batch of the longest prompts with max_new_tokens responses of different
    lengths allocates (the CPU allocator's count), on a model whose MLP is most of a
    forward's tensors and on one whose residual stream and padded rows' mask count too."""
    from types import SimpleNamespace

    from preftune.online.plan import scoring_lines
    from preftune.score import load_scorer
    from preftune.train.plan import weight_bytes

    model = scorer_dir(tmp_path / "model", len(char_tokenizer()), *width)
    spec = f"{kind}:{model}"
    if kind == "rm":  # a reward model on that backbone, trained one step
        from preftune.reward.config import build_reward_config
        from preftune.reward.train import train_reward_model

        rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 4
        (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = "rm:" + str(train_reward_model(build_reward_config({
            "output_dir": str(tmp_path / "rm"), "model": {"path": str(model)},
            "data": {"train": str(tmp_path / "pairs.jsonl")},
            "train": {"batch_size": 4, "max_steps": 1}}), show_progress=False))
    config = SimpleNamespace(model=SimpleNamespace(dtype="float32"), online=SimpleNamespace(
        scorer=spec, mode="rounds", sampling=SimpleNamespace(max_new_tokens=96)))
    lines = scoring_lines(config, LlamaForCausalLM.from_pretrained(model), char_tokenizer(), 80)
    scorer = load_scorer(spec, None, "float32")
    held = weight_bytes(scorer.scoring.model if kind == "rm" else scorer.model)
    assert planned(lines, "weights") == round(held / 2**20)
    rows = {"rm": 16, "follow-up": 8}.get(kind, 8)
    prompts, responses = ["p" * 80] * rows, ["r" * (96 - 3 * n) for n in range(rows)]
    memory = PhaseMemory("tensors")
    if kind == "judge-pair":
        scorer.prefer(prompts, responses, ["s" * 96] * rows)
    else:
        scorer.score(prompts, responses)
    measured = memory.stop()["setup"]
    assert planned(lines, "working") == pytest.approx(measured, rel=0.05)
    assert planned(lines, "total") == pytest.approx(planned(lines, "weights") +
                                                    planned(lines, "working"), abs=1)


def test_the_scoring_plan_counts_every_model_a_scorer_loads(tmp_path):
    """Which models each kind of scorer spec loads: the policy for ``judge:policy``, each
    model term of a combination (functions have none), a follow-up file's model with its own
    follow-ups and batch; a rendering scorer is not estimated."""
    from preftune.score.memory import ScorerModel, scorer_models

    assert scorer_models("judge-pair:policy") == [ScorerModel("judge-pair:policy", "judge-pair",
                                                              None, 8)]
    assert scorer_models(SCORER) == "a Python function: no model"
    rm = tmp_path / "rm"
    rm.mkdir()
    combined = tmp_path / "combined.yaml"
    combined.write_text(yaml.safe_dump({"terms": [
        {"scorer": f"rm:{rm}"}, {"scorer": SCORER}, {"scorer": "judge:default", "weight": 2}]}))
    assert scorer_models(str(combined)) == [
        ScorerModel(f"rm:{rm}", "rm", str(rm), 16),
        ScorerModel("judge:default", "judge", "default", 8)]
    follow = tmp_path / "follow.yaml"
    follow.write_text(yaml.safe_dump({"follow_up": {
        "model": "default", "positive": ["Thanks!"], "negative": ["Wrong.", "No, not that."],
        "batch_size": 2}}))
    assert scorer_models(str(follow)) == [
        ScorerModel(str(follow), "follow-up", "default", 2, 3, "No, not that.")]
    render = tmp_path / "render.yaml"
    render.write_text(yaml.safe_dump({"render": {"pipeline": "p", "scorer": "shape_colour"}}))
    assert scorer_models(str(render)).startswith("a rendering pipeline")


@pytest.mark.parametrize("scorer", ["judge:policy", pytest.param(SCORER, marks=pytest.mark.slow)],
                         ids=["judge", "function"])
def test_evaluation_memory_is_near_a_held_out_evaluations_peak(scorer, tmp_path, capsys):
    """The evaluation section's total against the tensor bytes a real held-out evaluation
    peaks at on CPU (``measure.evaluate_model`` of a round's model: greedy answers, KL
    samples, the initial model loaded for their KL), where the peak is the initial model
    judging the samples, and where a function scores them and the peak is the forward that
    gives the samples' log-probs."""
    from preftune.config import build_config
    from preftune.online.config import OnlineConfig
    from preftune.online.loop import _prompts
    from preftune.online.measure import evaluate_model

    tokenizer = char_tokenizer()
    for name, seed in (("model", 0), ("round", 1)):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=1024,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    rows = [{"prompt": f"Q{i}: " + "say yes " * (4 + i)} for i in range(6)]
    for name in ("prompts", "held_out"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = build_config({
        "output_dir": str(tmp_path / "online"), "model": {"path": str(tmp_path / "model")},
        "data": {"train": str(tmp_path / "prompts.jsonl"),
                 "eval": str(tmp_path / "held_out.jsonl")},
        "objective": {"name": "dpo"}, "train": {"batch_size": 4, "max_steps": 2},
        "online": {"scorer": scorer, "eval_max_new_tokens": 48, "eval_kl_samples": 4,
                   "sampling": {"samples": 2, "max_new_tokens": 8, "batch_size": 6}}},
        schema=OnlineConfig)
    assert main(["online", "--plan", str(_write(tmp_path, config))]) == 0
    printed = capsys.readouterr().out.splitlines()
    section = printed[next(i for i, line in enumerate(printed) if line.startswith(
        "evaluation memory")):]
    assert section[0] == ("evaluation memory (MiB, after each round, 6 held-out prompts; the "
                          "scorer and one model at a time):")
    assert "a generate call of 6 prompts x 4 samples" in section[3]
    assert section[5].startswith("  KL log-probs ") and "6 prompts x 4 samples" in section[5]
    memory = PhaseMemory("tensors")
    evaluate_model(config, str(tmp_path / "round"), _prompts(config.data.eval, config),
                   tmp_path / "evaluated")
    measured = memory.stop()["setup"]
    assert planned(section, "total") == pytest.approx(measured, rel=0.05)


def _write(directory, config) -> str:
    path = directory / "online.yaml"
    path.write_text(yaml.safe_dump(config.model_dump()))
    return str(path)


def test_on_a_gpu_each_phase_says_whether_it_fits(workspace, capsys, monkeypatch):
    """Sampling, scoring and evaluation each get the fit line of train --plan, with advice of
    their own (a stubbed GPU with nothing free: nothing fits)."""
    import preftune.online.plan as online_plan

    monkeypatch.setattr(online_plan, "device_of", lambda model: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (0, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    tree = yaml.safe_load((workspace / "online.yaml").read_text())
    tree["online"]["scorer"] = f"judge:{workspace / 'model'}"
    tree["data"]["eval"] = tree["data"]["train"]
    (workspace / "online.yaml").write_text(yaml.safe_dump(tree))
    assert main(["online", str(workspace / "online.yaml"), "--plan"]) == 0
    fits = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("  this GPU ")]
    assert [line.split(": ", 1)[1].split(": ", 1)[1] for line in fits[:3]] == [
        "a smaller online.sampling.batch_size, or max_new_tokens",
        "a smaller scorer",
        "fewer online.eval_kl_samples or eval_best_of, a smaller online.sampling.batch_size"]
