"""model.lora.lr_ratio (LoRA+): the B matrices train at ratio x the learning rate, everything
else at the learning rate, with every optimizer and across a resume."""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from test_train_loop import crashed_run, losses, resume, run, workspace  # noqa: F401

from preftune.config import ConfigError, LoraConfig, build_config
from preftune.model.lora import lr_scale, mark_lora_plus
from preftune.train.engines import check_engine
from preftune.train.logging import read_metrics
from preftune.train.optimizers import learning_rate_groups

pytestmark = pytest.mark.filterwarnings("ignore")

LR = 5e-3


def adapter(output) -> dict:
    return load_file(output / "adapter" / "adapter_model.safetensors")


def split(tensors: dict) -> tuple[dict, dict]:
    """(A matrices, B matrices) of an adapter."""
    return ({k: v for k, v in tensors.items() if "lora_A" in k},
            {k: v for k, v in tensors.items() if "lora_B" in k})


@pytest.mark.parametrize("ratio", [None, 4.0])
def test_the_first_step_moves_each_b_entry_by_ratio_times_the_rate(workspace, ratio):  # noqa: F811
    """B starts at 0, so A gets no gradient in step 1 and every B entry moves by Adam's first
    step, lr * g / (|g| + eps), i.e. the rate itself: lr, or lr x ratio under LoRA+."""
    lora = {"r": 4, "alpha": 8, **({"lr_ratio": ratio} if ratio else {})}
    output = run(workspace, f"plus-first-{ratio}", model__lora=lora, train__max_steps=1)
    plain = workspace / "runs" / "plus-first-None"  # the case without LoRA+ (run once)
    if not (plain / "adapter").is_dir():
        run(workspace, plain.name, model__lora={"r": 4, "alpha": 8}, train__max_steps=1)
    a, b = split(adapter(output))
    moved = torch.cat([t.flatten() for t in b.values()]).abs()
    moved = moved[moved > 0]
    assert moved.numel() > 1000
    rate = LR * (ratio or 1.0)
    assert moved.max().item() == pytest.approx(rate, rel=1e-6)
    assert moved.median().item() == pytest.approx(rate, rel=1e-4)
    for name, value in split(adapter(plain))[0].items():  # A: the same initial values
        torch.testing.assert_close(a[name], value, rtol=0, atol=0)
    assert [r["lr"] for r in read_metrics(output / "metrics.jsonl")] == [LR]


def test_in_backward_updates_take_the_same_rates(workspace):  # noqa: F811
    lora = {"r": 4, "alpha": 8, "lr_ratio": 8.0}
    normal = run(workspace, "plus-normal", model__lora=lora, train__max_steps=3)
    inside = run(workspace, "plus-inside", model__lora=lora, train__max_steps=3,
                 train__optimizer_in_backward=True)
    assert losses(inside) == pytest.approx(losses(normal), rel=1e-5)
    for name, value in adapter(normal).items():
        torch.testing.assert_close(adapter(inside)[name], value, atol=1e-6, rtol=1e-4, msg=name)


def test_a_resumed_lora_plus_run_ends_as_an_uninterrupted_one(workspace, monkeypatch):  # noqa: F811
    settings = dict(model__lora={"r": 4, "alpha": 8, "lr_ratio": 16.0}, train__max_steps=4,
                    train__save_every=2, train__batch_size=4)
    straight = run(workspace, "plus-straight", **settings)
    crashed = crashed_run(workspace, "plus-crashed", monkeypatch, 2, **settings)
    resumed = resume(crashed)
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)
    for name, value in adapter(straight).items():
        torch.testing.assert_close(adapter(resumed)[name], value, atol=1e-6, rtol=1e-4, msg=name)


def test_only_b_matrices_are_marked_and_groups_put_the_unscaled_first():
    module = torch.nn.Module()
    module.lora_A = torch.nn.Linear(3, 2)
    module.lora_B = torch.nn.Linear(2, 3)
    module.head = torch.nn.Linear(3, 1)
    module.head.requires_grad_(False)
    mark_lora_plus(module, 16.0)
    assert [lr_scale(p) for p in module.parameters()] == [1.0, 1.0, 16.0, 16.0, 1.0, 1.0]
    groups = learning_rate_groups(list(module.parameters())[::-1], 0.5)
    assert [(len(g["params"]), g["lr"]) for g in groups] == [(4, 0.5), (2, 8.0)]
    with pytest.raises(ValueError, match="greater than 0"):
        LoraConfig(lr_ratio=0)


def test_deepspeed_refuses_lora_plus():
    module = torch.nn.Module()
    module.lora_B = torch.nn.Linear(2, 3)
    mark_lora_plus(module, 16.0)
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED, num_processes=2,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config={})))
    task = SimpleNamespace(module=module, name="dpo", unsharded=True)
    with pytest.raises(ConfigError, match=r"model.lora.lr_ratio \(LoRA\+\) does not run under "
                                          "DeepSpeed"):
        check_engine(accelerator, build_config({}).train, task)


def test_a_denoisers_b_matrices_are_marked_too(tmp_path):
    pytest.importorskip("diffusers")
    from diffusion_fixtures import tiny_pipeline

    from preftune.diffusion.model import attach_lora, load_diffusion_model

    model = load_diffusion_model(str(tiny_pipeline(tmp_path / "pipeline")))
    attach_lora(model, LoraConfig(r=4, alpha=8, lr_ratio=16.0, target_modules=["to_q"]))
    scales = {name: lr_scale(p) for name, p in model.denoiser.named_parameters()
              if p.requires_grad}
    assert scales and all(scale == (16.0 if "lora_B" in name else 1.0)
                          for name, scale in scales.items())
    assert sorted(set(scales.values())) == [1.0, 16.0]
