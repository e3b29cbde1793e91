"""The real training loop on a tiny model: accumulation, resume, references, saved model."""

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preftune.config import ConfigError, build_config
from preftune.data.records import DataError
from preftune.train import loop, trainer
from preftune.train.logging import read_metrics
from preftune.train.kept import KeptBytes
from preftune.train.plan import _activation_bytes
from tiny_models import save_tiny_model_dir

pytestmark = pytest.mark.filterwarnings("ignore")


def write_sum_pairs(path: Path, count: int) -> Path:
    """``count`` chat pairs asking for a sum (seeded): the right answer against a wrong one."""
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        rows.append({
            "prompt": [{"role": "user", "content": f"What is {a}+{b}?" + " please" * rng.randint(0, 3)}],
            "chosen": [{"role": "assistant", "content": str(a + b)}],
            "rejected": [{"role": "assistant", "content": f"It is {a + b + rng.randint(1, 9)}."}],
        })
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    save_tiny_model_dir(root / "model")
    write_sum_pairs(root / "pairs.jsonl", 48)
    return root


def run(workspace: Path, name: str, **overrides) -> Path:
    tree = {
        "output_dir": str(workspace / "runs" / name),
        "model": {"path": str(workspace / "model")},
        "data": {"train": str(workspace / "pairs.jsonl"), "eval_fraction": 0.25},
        "reference": {"cache_dir": str(workspace / "cache")},
        "train": {"learning_rate": 5e-3, "batch_size": 8, "max_steps": 4, "warmup_ratio": 0.0,
                  "max_grad_norm": None, "seed": 3},
    }
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return loop.train(build_config(tree), show_progress=False)


def crash_after_checkpoint(monkeypatch, at_step: int) -> None:
    """Make the next run die (KeyboardInterrupt) right after writing its step-``at_step``
    checkpoint; later runs in the test save normally again."""
    real_save = trainer.save_checkpoint

    def save_then_crash(directory, step, *args, **kwargs):
        path = real_save(directory, step, *args, **kwargs)
        if step == at_step:
            monkeypatch.setattr(trainer, "save_checkpoint", real_save)
            raise KeyboardInterrupt(f"simulated crash after the step-{step} checkpoint")
        return path

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_crash)


def crashed_run(workspace: Path, name: str, monkeypatch, at_step: int, **settings) -> Path:
    """A run that dies right after its step-``at_step`` checkpoint; returns its directory."""
    crash_after_checkpoint(monkeypatch, at_step)
    with pytest.raises(KeyboardInterrupt):
        run(workspace, name, **settings)
    return workspace / "runs" / name


def final_weights(output_dir: Path) -> dict:
    return load_file(output_dir / "model" / "model.safetensors")


def assert_same_weights(a: Path, b: Path, atol=1e-5):
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=1e-4, msg=name)


def losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir / "metrics.jsonl")]


def test_a_step_larger_than_the_data_is_said(workspace, capsys):
    """36 training pairs (48, a quarter held out) and steps of 20 x 2: some pairs repeat in
    each step, which the run says rather than leaving to be found."""
    run(workspace, "bigger-than-data", train__batch_size=20,
        train__gradient_accumulation_steps=2, train__max_steps=1)
    assert "note: a step takes 40 examples (batch_size x accumulation x processes) and the " \
        "data has 36: some examples appear twice in each step." in capsys.readouterr().out
    run(workspace, "fits", train__batch_size=36, train__max_steps=1)
    assert "note: a step takes" not in capsys.readouterr().out


def test_batch_8_equals_batch_4_times_2_accumulation(workspace):
    whole = run(workspace, "b8")
    split = run(workspace, "b4x2", train__batch_size=4, train__gradient_accumulation_steps=2)
    whole_log = read_metrics(whole / "metrics.jsonl")
    split_log = read_metrics(split / "metrics.jsonl")
    for a, b in zip(whole_log, split_log, strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert_same_weights(whole, split)
    # and the run did train: weights moved away from the initial model
    start = load_file(workspace / "model" / "model.safetensors")
    moved = final_weights(whole)
    assert any(not torch.allclose(start[k], moved[k]) for k in start)


def test_interrupt_and_resume_matches_uninterrupted(workspace, monkeypatch):
    settings = dict(train__max_steps=6, train__save_every=2, train__batch_size=4)
    straight = run(workspace, "straight", **settings)

    crashed_run(workspace, "interrupted", monkeypatch, 4, **settings)
    # a crash may leave log lines past the checkpoint: write one to prove they are dropped
    interrupted_dir = workspace / "runs" / "interrupted"
    with (interrupted_dir / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
        handle.write('{"step": 6, "loss": 0.69')  # and a line whose write was cut off

    config = build_config(json.loads(json.dumps(_tree_of(interrupted_dir))))
    resumed = loop.train(config, resume=True, show_progress=False)
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)
    assert_same_weights(straight, resumed)


def test_the_last_step_is_logged_whatever_log_every_says(workspace):
    logged = run(workspace, "log3", train__max_steps=3, train__log_every=2)
    assert [r["step"] for r in read_metrics(logged / "metrics.jsonl")] == [2, 3]


def test_held_out_data_is_evaluated_at_the_last_step_without_eval_every(workspace):
    """data.eval_fraction and no train.eval_every: the held-out pairs are measured once, at
    the end (they were held out of training and never measured); eval_every adds its steps."""
    plain = run(workspace, "eval-end", train__max_steps=3)
    assert [sorted(k for k in r if k.startswith("eval/"))[:1] for r in read_metrics(
        plain / "metrics.jsonl")] == [[], [], ["eval/diag/displacement/chosen"]]
    every = read_metrics(run(workspace, "eval-2", train__max_steps=3, train__eval_every=2)
                         / "metrics.jsonl")
    assert [r["step"] for r in every if "eval/loss" in r] == [2, 3]
    alone = read_metrics(run(workspace, "no-eval", train__max_steps=2,
                             data__eval_fraction=0.0) / "metrics.jsonl")
    assert not any(k.startswith("eval/") for r in alone for k in r)


def test_checkpoints_key_optimizer_state_by_name_and_old_positional_ones_still_resume(
        workspace, monkeypatch):
    from preftune.train import checkpoint

    settings = dict(train__max_steps=4, train__save_every=2, train__batch_size=4)
    straight = run(workspace, "names-straight", **settings)
    named = crashed_run(workspace, "names-new", monkeypatch, 2, **settings)
    state = torch.load(named / "checkpoints" / "step-00000002" / "optimizer.pt",
                       weights_only=True)
    assert "model.model.layers.0.self_attn.q_proj.weight" in state["state"]
    # the format of earlier versions: torch's positional state dict
    monkeypatch.setattr(checkpoint, "get_optimizer_state_dict",
                        lambda model, optimizer, options: optimizer.state_dict())
    old = crashed_run(workspace, "names-old", monkeypatch, 2, **settings)
    monkeypatch.undo()
    state = torch.load(old / "checkpoints" / "step-00000002" / "optimizer.pt", weights_only=True)
    assert set(state["state"]) == set(range(len(state["state"])))
    for interrupted in (named, old):
        resumed = loop.train(build_config(_tree_of(interrupted)), resume=True,
                             show_progress=False)
        assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)
        assert_same_weights(straight, resumed, atol=0)


def _tree_of(output_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((output_dir / "config.yaml").read_text())


def resume(output_dir: Path) -> Path:
    """``--resume`` of the run in ``output_dir``, with the config it wrote."""
    return loop.train(build_config(_tree_of(output_dir)), resume=True, show_progress=False)


@pytest.mark.parametrize("lora", [False, True])
def test_reference_strategies_give_the_same_losses(workspace, lora):
    extra = {"model__lora": {"r": 4, "alpha": 8}} if lora else {}
    strategies = ["precomputed", "live"] + (["adapter-off"] if lora else [])
    runs = {s: run(workspace, f"ref-{s}-{lora}", reference__strategy=s, **extra)
            for s in strategies}
    baseline = losses(runs["precomputed"])
    assert baseline[0] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference at step 1
    assert len(set(round(x, 4) for x in baseline)) > 1  # the loss moves
    for strategy, output in runs.items():
        assert losses(output) == pytest.approx(baseline, rel=1e-5, abs=1e-6), strategy


def test_precomputed_reference_is_cached_and_reused(workspace, capsys):
    run(workspace, "cache-a", reference__cache_dir=str(workspace / "fresh-cache"))
    first = sorted((workspace / "fresh-cache").glob("reference-*.pt"))
    assert len(first) == 2  # train and eval splits
    capsys.readouterr()
    run(workspace, "cache-b", reference__cache_dir=str(workspace / "fresh-cache"))
    assert "loaded from cache" in capsys.readouterr().out
    assert sorted((workspace / "fresh-cache").glob("reference-*.pt")) == first
    # a damaged cache file (truncated) is said and computed again, to the same losses
    whole = first[0].read_bytes()
    first[0].write_bytes(whole[:100])
    capsys.readouterr()
    again = run(workspace, "cache-damaged", reference__cache_dir=str(workspace / "fresh-cache"))
    assert f"reference cache {first[0]} cannot be read" in capsys.readouterr().out
    assert losses(again) == losses(workspace / "runs" / "cache-b")
    assert first[0].stat().st_size == len(whole)
    # a different tokenization setting is a different key
    run(workspace, "cache-c", reference__cache_dir=str(workspace / "fresh-cache"),
        data__max_length=40, data__max_prompt_length=30)
    assert len(list((workspace / "fresh-cache").glob("reference-*.pt"))) == 4


def _plain_logp(model, example, response: int) -> float:
    ids = torch.tensor([example.prompt_ids + example.response_ids[response]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    start = len(example.prompt_ids)
    return sum(float(logprobs[start - 1 + t, tok])
               for t, tok in enumerate(example.response_ids[response]))


def _plain_mean_chosen_logp(model, examples) -> float:
    return sum(_plain_logp(model, example, 0) for example in examples) / len(examples)


@pytest.mark.parametrize("lora", [False, True])
def test_saved_model_loads_and_reproduces_trained_logps(workspace, lora):
    from preftune.data.prepare import prepare_examples
    from preftune.model.load import load_tokenizer

    extra = {"model__lora": {"r": 4, "alpha": 8}} if lora else {}
    output = run(workspace, f"saved-{lora}", train__eval_every=4, **extra)
    last = read_metrics(output / "metrics.jsonl")[-1]
    model = AutoModelForCausalLM.from_pretrained(output / "model").eval()
    config = build_config(_tree_of(output))
    _, eval_examples, _, _ = prepare_examples(config.data, load_tokenizer(str(output / "model")), 3)
    plain = _plain_mean_chosen_logp(model, eval_examples)
    assert plain == pytest.approx(last["eval/logps/chosen"], abs=1e-4)
    assert plain != pytest.approx(last["eval/logps/ref_chosen"], abs=1e-3)  # it did change
    # eval-step diagnostics: displacement of the chosen log-prob from the reference
    assert last["eval/diag/displacement/chosen"] == pytest.approx(
        plain - last["eval/logps/ref_chosen"], abs=1e-4)
    # the length-normalised ranking accuracy: share of pairs whose chosen response has the
    # higher per-token log-prob under the trained model
    ranked = [_plain_logp(model, e, 0) / len(e.response_ids[0]) >
              _plain_logp(model, e, 1) / len(e.response_ids[1]) for e in eval_examples]
    assert last["eval/diag/ranking/normalised"] == pytest.approx(sum(ranked) / len(ranked))
    if lora:
        from peft import AutoPeftModelForCausalLM

        adapter_model = AutoPeftModelForCausalLM.from_pretrained(output / "adapter").eval()
        assert _plain_mean_chosen_logp(adapter_model, eval_examples) == pytest.approx(plain, abs=1e-4)


def test_layouts_train_identically_through_the_loop(workspace):
    runs = {layout: run(workspace, f"layout-{layout}", train__layout=layout, train__max_steps=3)
            for layout in ["padded", "prefix_shared", "packed", "packed_prefix_shared"]}
    baseline = read_metrics(runs["padded"] / "metrics.jsonl")
    for layout, output in runs.items():
        log = read_metrics(output / "metrics.jsonl")
        assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in baseline], rel=1e-5)
        assert [r["grad_norm"] for r in log] == pytest.approx(
            [r["grad_norm"] for r in baseline], rel=1e-4)
        assert_same_weights(runs["padded"], output, atol=1e-5)
    padding = {layout: read_metrics(out / "metrics.jsonl")[0]["padding_fraction"]
               for layout, out in runs.items()}
    assert padding["packed"] < padding["padded"]
    assert json.loads((runs["packed"] / "run.json").read_text())["layout"] == "packed"


@pytest.mark.parametrize("lora, every", [(False, 1), (True, 1), (False, 2)])
def test_gradient_checkpointing_trains_identically(workspace, lora, every):
    extra = {"model__lora": {"r": 4, "alpha": 8}} if lora else {}
    plain = run(workspace, f"ckpt-off-{lora}-{every}", train__max_steps=3, **extra)
    checkpointed = run(workspace, f"ckpt-on-{lora}-{every}", train__max_steps=3,
                       train__gradient_checkpointing=True, train__checkpoint_every=every,
                       **extra)
    assert losses(checkpointed) == pytest.approx(losses(plain), rel=1e-5)
    assert_same_weights(plain, checkpointed)


def test_lean_activations_train_like_transformers_own(workspace, monkeypatch):
    """train.lean_activations (the default) against transformers' RMSNorm: the same losses and
    weights after 3 steps (the forward is bitwise the same; gradients differ by rounding). The
    lean norm runs in every training forward (5 norms in the tiny model), not at all when off."""
    from preftune.model.lean import LeanRMSNorm

    calls = []
    forward = LeanRMSNorm.forward
    monkeypatch.setattr(LeanRMSNorm, "forward", staticmethod(
        lambda ctx, *args: calls.append(1) or forward(ctx, *args)))
    lean = run(workspace, "norms-lean", train__max_steps=3)
    assert len(calls) >= 3 * 5
    calls.clear()
    own = run(workspace, "norms-own", train__max_steps=3, train__lean_activations=False)
    assert calls == []
    assert losses(lean) == pytest.approx(losses(own), rel=1e-6)
    assert_same_weights(own, lean)


def test_plan_prints_layout_reference_and_memory_without_training(workspace, capsys):
    output = run(workspace, "plan-only", train__layout="auto")
    capsys.readouterr()
    config = build_config({**_tree_of(output), "output_dir": str(workspace / "runs" / "planned")})
    loop.train(config, plan_only=True, show_progress=False)
    printed = capsys.readouterr().out
    for needle in ["reference          precomputed", "layout             prefix_shared",
                   "optimizer", "activations", "output backward", "total"]:
        assert needle in printed
    assert not (workspace / "runs" / "planned" / "model").exists()

    def activations_line(**train):
        tree = {**_tree_of(output), "output_dir": str(workspace / "runs" / "planned")}
        tree["train"] = {**tree.get("train", {}), **train}
        loop.train(build_config(tree), plan_only=True, show_progress=False)
        return next(x for x in capsys.readouterr().out.splitlines() if "activations" in x)

    assert activations_line(gradient_checkpointing=True).endswith("(gradient checkpointing)")
    assert activations_line(gradient_checkpointing=True, checkpoint_every=2).endswith(
        "(gradient checkpointing, every 2 layers)")
    # 16 layers that keep 804 bytes a slot, 300 kept outside them, 1,000 slots, a layer input
    # 100 bytes a slot. No checkpointing: 16 full sets; every 8th: the inputs of layers 0 and
    # 8 and 14 full sets; each: 16 inputs and, while the top layer is recomputed, its full set
    kept = KeptBytes((0.0,) * 16, (804.0,) * 16, (0.0,) * 16, (0.0, 300.0, 0.0))
    assert [_activation_bytes(kept, 1, 1000, 100, every) for every in (None, 8, 1)] \
        == [16 * 804_000 + 300_000, 200_000 + 14 * 804_000 + 300_000,
            1_600_000 + 804_000 + 300_000]
    # a dense mask is one 1,000 x 1,000 tensor for all layers, checkpointed or not; eager
    # attention's scores grow with the square of the row, and a layer may keep a constant
    assert [_activation_bytes(kept, 1, 1000, 100, every, 1_000_000) for every in (None, 1)] \
        == [16 * 804_000 + 1_300_000, 1_600_000 + 804_000 + 1_300_000]
    scores = KeptBytes((7.0,) * 16, (804.0,) * 16, (0.5,) * 16, (0.0, 300.0, 0.0))
    assert _activation_bytes(scores, 2, 1000, 100) == 16 * (7 + 2 * (804_000 + 500_000)) + 600_000
    # a model whose layers preftune cannot find: all it keeps counts outside them
    assert _activation_bytes(KeptBytes((), (), (), (0.0, 900.0, 0.0)), 1, 1000, 100, 1) == 900_000


def test_zero_learning_rate_raises_policy_not_moving_through_the_loop(workspace):
    output = run(workspace, "frozen", train__learning_rate=0.0)
    alarms = [json.loads(x) for x in (output / "alarms.jsonl").read_text().splitlines()]
    assert [a["kind"] for a in alarms] == ["policy_not_moving"]
    assert "bit-for-bit unchanged" in alarms[0]["message"]  # from the weights: holds on GPUs too
    assert read_metrics(output / "metrics.jsonl")[2]["alarms"] == ["policy_not_moving"]


@pytest.mark.parametrize("variant", ["full", "lora", "checkpointed"])
def test_optimizer_in_backward_trains_like_adamw(workspace, variant):
    """Per-parameter AdamW applied during backward = one AdamW step after it (no clipping);
    also when the layers are recomputed in backward (each layer's update runs before the
    layer below is recomputed)."""
    extra = {"lora": {"model__lora": {"r": 4, "alpha": 8}},
             "checkpointed": {"train__gradient_checkpointing": True}}.get(variant, {})
    plain = run(workspace, f"adamw-{variant}", train__weight_decay=0.01, **extra)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = run(workspace, f"in-bwd-{variant}", train__weight_decay=0.01,
                    train__optimizer_in_backward=True, **extra)
    # the LR schedule learns of each step (torch warns when it is stepped before the optimizer)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert losses(fused) == pytest.approx(losses(plain), rel=1e-5)
    grad_norms = [[r["grad_norm"] for r in read_metrics(out / "metrics.jsonl")]
                  for out in (plain, fused)]
    assert grad_norms[1] == pytest.approx(grad_norms[0], rel=1e-4)
    assert_same_weights(plain, fused)


def test_optimizer_in_backward_resumes_exactly(workspace, monkeypatch):
    settings = dict(train__max_steps=4, train__save_every=2, train__batch_size=4,
                    train__optimizer_in_backward=True)
    straight = run(workspace, "in-bwd-straight", **settings)

    crashed_run(workspace, "in-bwd-crash", monkeypatch, 2, **settings)
    config = build_config(_tree_of(workspace / "runs" / "in-bwd-crash"))
    resumed = loop.train(config, resume=True, show_progress=False)
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)
    assert_same_weights(straight, resumed)


def test_optimizer_in_backward_refuses_accumulation_and_clipping(workspace):
    with pytest.raises(ConfigError, match="max_grad_norm: null"):
        run(workspace, "bad", train__optimizer_in_backward=True, train__max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps: 1"):
        run(workspace, "bad", train__optimizer_in_backward=True,
            train__gradient_accumulation_steps=2)


def test_attention_implementation_is_configurable(workspace):
    default = run(workspace, "attn-default", train__max_steps=2)
    eager = run(workspace, "attn-eager", train__max_steps=2, model__attn_implementation="eager")
    assert losses(eager) == pytest.approx(losses(default), rel=1e-4)
    if not torch.cuda.is_available():  # on CUDA, tests/test_cuda.py trains with it
        with pytest.raises(ConfigError, match="CUDA only"):
            run(workspace, "attn-flex", model__attn_implementation="flex_attention")


@pytest.mark.parametrize("objective, expected", [
    ("pro", r"pro trains on ranked data, but .*pairs\.jsonl holds pairs\. No data\.convert turns "
            r"pairs into ranked: pick an objective for pairs"),
    ("kto", r"kto trains on unpaired data, but .*pairs\.jsonl holds pairs\. Convert it with "
            r"data\.convert: unpaired, or pick an objective for pairs"),
])
def test_data_of_another_shape_names_only_conversions_that_apply(workspace, objective, expected):
    with pytest.raises(DataError, match=expected):
        run(workspace, f"shape-{objective}", objective={"name": objective})


def test_a_missing_example_weight_stops_the_run_before_the_model_loads(workspace, monkeypatch):
    monkeypatch.setattr(loop, "load_policy", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(DataError, match=r"pairs\.jsonl:\d+: numeric field 'weight' is missing"):
        run(workspace, "no-weights", train__example_weight_field="weight")


def test_a_shape_mismatch_after_a_conversion_extends_that_conversion():
    from types import SimpleNamespace

    data = SimpleNamespace(train="lists.jsonl", convert="pairs:all_pairs")
    assert loop.shape_mismatch(SimpleNamespace(name="kto", data="unpaired"), "pairs", data) == (
        "kto trains on unpaired data, but lists.jsonl gives pairs after data.convert "
        "[pairs:all_pairs]. Convert it with data.convert: [pairs:all_pairs, unpaired], or pick "
        "an objective for pairs (`preftune objectives`).")
