"""TR-DPO's moving reference (reference.sync_every / sync_mix): the mixing rule against a
hand computation, the policy's weights as a plain model sees them (LoRA merged as PEFT merges
it), the real loop (a reference that is the policy gives a loss of log 2), checkpoints and
resume, and what is refused."""

import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from test_train_loop import (assert_same_weights, crashed_run, losses, resume, run,  # noqa: F401
                             workspace)

from preftune.api import write_report
from preftune.config import ConfigError, build_config
from preftune.model.lora import add_lora
from preftune.model.reference_sync import ReferenceSync, trained_weights
from preftune.train import loop
from preftune.train.logging import read_metrics
from tiny_models import tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore")
LOG_2 = math.log(2.0)


def _nudged(model, seed=1, scale=0.05):
    """``model`` with every trainable weight moved by seeded noise (as training would)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def test_a_sync_mixes_the_policy_in_on_due_steps_only():
    policy = tiny_llama()
    reference = copy.deepcopy(policy).requires_grad_(False)
    initial = {n: p.clone() for n, p in reference.named_parameters()}
    sync = ReferenceSync(reference, policy, every=3, mix=0.25)
    _nudged(policy)
    assert [sync.due(step) for step in range(7)] == [False, False, True, False, False, True,
                                                     False]
    assert not sync.after_update(0)  # not due: nothing moves
    for name, param in reference.named_parameters():
        assert torch.equal(param, initial[name])
    assert sync.after_update(2)
    weights = dict(policy.named_parameters())
    for name, param in reference.named_parameters():  # 0.25 of the policy, 0.75 of the old
        expected = [0.25 * a + 0.75 * b for a, b in
                    zip(weights[name].flatten().tolist(), initial[name].flatten().tolist())]
        assert param.flatten().tolist() == pytest.approx(expected, abs=1e-7), name
    # the tied embedding / output weight is one tensor: mixed once, not twice
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    assert sorted(sync.state_dict()) == sorted(initial)


def test_a_hard_sync_copies_the_policy_and_only_trained_weights_move():
    policy = tiny_llama()
    policy.requires_grad_(False).model.layers[1].requires_grad_(True)  # train the top layer
    reference = copy.deepcopy(policy).requires_grad_(False)
    initial = {n: p.clone() for n, p in reference.named_parameters()}
    _nudged(policy)
    with torch.no_grad():  # a frozen weight that differs is left alone: it does not train
        policy.model.norm.weight.add_(1.0)
    sync = ReferenceSync(reference, policy, every=1, mix=1.0)
    sync.after_update(0)
    weights = dict(policy.named_parameters())
    for name, param in reference.named_parameters():
        target = weights[name] if name.startswith("model.layers.1.") else initial[name]
        assert torch.equal(param, target), name
    assert all(name.startswith("model.layers.1.") for name in sync.state_dict())


@pytest.mark.parametrize("lora", [
    {"r": 4, "alpha": 8},
    {"r": 4, "alpha": 8, "dora": True},
    {"r": 4, "alpha": 8, "init": "pissa"},
    {"r": 4, "alpha": 8, "modules_to_save": ["lm_head"]},
])
def test_lora_weights_are_seen_merged_as_peft_merges_them(lora):
    from preftune.config import LoraConfig

    base = tiny_llama(tie=False)
    model = _nudged(add_lora(copy.deepcopy(base), LoraConfig(**lora)))
    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    seen = dict(trained_weights(model))
    expected = {name for name, value in merged.items()
                if not torch.equal(value, dict(base.named_parameters())[name])}
    assert set(seen) == expected  # the adapted layers (and the head's trained copy), no others
    assert expected  # the adapters did move something
    for name, value in seen.items():
        torch.testing.assert_close(value, merged[name], rtol=1e-6, atol=1e-6, msg=name)


def _sync_run(workspace, name, **settings):
    return run(workspace, name, objective={"name": "dpo"}, **settings)


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}, {"r": 4, "alpha": 8, "dora": True},
                                  {"r": 4, "alpha": 8, "modules_to_save": ["lm_head"]}])
def test_a_reference_reset_to_the_policy_gives_a_loss_of_log_2_after_each_sync(workspace,
                                                                                lora):
    """mix 1: after every second step the reference is the policy, so the next step's
    log-ratios are all 0 and its DPO loss is log 2; the steps between move on from it."""
    extra = {"model__lora": lora} if lora else {}
    output = _sync_run(workspace, f"hard-sync-{lora}", reference__sync_every=2,
                       reference__sync_mix=1.0, train__max_steps=5, **extra)
    values = losses(output)
    for step in (0, 2, 4):  # steps 1, 3, 5: right after a sync (or the start)
        assert values[step] == pytest.approx(LOG_2, abs=1e-6), values
    for step in (1, 3):
        assert abs(values[step] - LOG_2) > 1e-4, values
    # rewards of exactly 0 after a sync are by design, not a policy that does not move
    assert not (output / "alarms.jsonl").exists()


def test_a_fixed_reference_is_what_a_run_without_syncs_has(workspace):
    # syncing less often than the run is long never moves the reference: same as live
    fixed = _sync_run(workspace, "live-fixed", reference__strategy="live")
    never = _sync_run(workspace, "never-synced", reference__sync_every=100)
    assert losses(never) == pytest.approx(losses(fixed), rel=1e-6)
    assert losses(never) != pytest.approx(
        losses(_sync_run(workspace, "synced-every-step", reference__sync_every=1)), rel=1e-3)


def test_checkpoints_hold_the_mixed_reference(workspace):
    output = _sync_run(workspace, "soft-sync", reference__sync_every=2, reference__sync_mix=0.5,
                       train__max_steps=6, train__save_every=2, train__keep_checkpoints=3)
    initial = load_file(workspace / "model" / "model.safetensors")
    policy = {step: load_file(output / "checkpoints" / f"step-{step:08d}" /
                              "trainable.safetensors") for step in (2, 4)}
    reference = {step: load_file(output / "checkpoints" / f"step-{step:08d}" /
                                 "reference.safetensors") for step in (2, 4)}
    assert sorted(reference[2]) == sorted(n.removeprefix("model.") for n in policy[2])
    for name, value in reference[2].items():  # ref_2 = (policy_2 + initial) / 2
        torch.testing.assert_close(value, 0.5 * policy[2][f"model.{name}"] + 0.5 * initial[name],
                                   rtol=0, atol=1e-7)
    for name, value in reference[4].items():  # ref_4 = (policy_4 + ref_2) / 2
        torch.testing.assert_close(value, 0.5 * policy[4][f"model.{name}"]
                                   + 0.5 * reference[2][name], rtol=0, atol=1e-7)
    run_info = (output / "run.json").read_text()
    assert '"reference_sync": {\n    "every": 2,\n    "mix": 0.5\n  }' in run_info
    for page in (output / "model" / "README.md", write_report(output)):  # card and report
        assert "moved toward the policy every 2 steps (mix 0.5, TR-DPO)" in page.read_text()


def test_a_resumed_run_continues_from_the_same_moved_reference(workspace, monkeypatch):
    settings = dict(reference__sync_every=2, reference__sync_mix=0.5, train__max_steps=6,
                    train__save_every=3)
    straight = _sync_run(workspace, "sync-straight", **settings)
    interrupted = crashed_run(workspace, "sync-interrupted", monkeypatch, 3,
                              objective={"name": "dpo"}, **settings)
    resumed = resume(interrupted)
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6)
    assert_same_weights(straight, resumed, atol=0)


def _config(workspace, **reference):
    return {"output_dir": str(workspace / "runs" / "refused"),
            "model": {"path": str(workspace / "model")},
            "data": {"train": str(workspace / "pairs.jsonl")},
            "reference": reference}


@pytest.mark.parametrize("settings,objective,message", [
    ({"sync_mix": 0.5}, "dpo", "reference.sync_mix does nothing without reference.sync_every"),
    ({"sync_every": 4}, "simpo", "reference.sync_every does nothing: simpo is reference-free"),
    ({"sync_every": 4, "strategy": "precomputed"}, "dpo",
     "but reference.strategy is 'precomputed'; set it to 'live'"),
    ({"sync_every": 4, "strategy": "adapter-off"}, "dpo",
     "but reference.strategy is 'adapter-off'; set it to 'live'"),
    ({"sync_every": 4, "sync_mix": 0}, "dpo", "greater than 0"),
    ({"sync_every": 4, "sync_mix": 1.5}, "dpo", "less than or equal to 1"),
])
def test_settings_that_cannot_work_are_refused_before_any_work(workspace, settings, objective,
                                                               message):
    tree = {**_config(workspace, **settings), "objective": {"name": objective}}
    if settings.get("strategy") == "adapter-off":
        tree["model"]["lora"] = {"r": 4}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(tree)


def test_auto_picks_the_live_reference_for_syncs_with_or_without_lora(workspace):
    tree = {**_config(workspace, sync_every=8), "objective": {"name": "dpo"}}
    assert build_config(tree).reference_strategy == "live"
    tree["model"]["lora"] = {"r": 4}
    assert build_config(tree).reference_strategy == "live"
    tree["objective"] = {"name": "tdpo"}  # needs distributions: live, not adapter-off
    assert build_config(tree).reference_strategy == "live"


def test_the_plan_says_how_the_reference_moves(workspace, capsys):
    tree = {**_config(workspace, sync_every=64), "objective": {"name": "dpo"}}
    loop.train(build_config(tree), plan_only=True)
    assert ("reference          live, moved toward the policy every 64 steps (mix 0.6)"
            in capsys.readouterr().out)
