"""train.optimizer: AdamW with 8-bit moments (bitsandbytes) against torch's AdamW, in a run,
across a resume, and in --plan's memory count."""

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from test_train_loop import (_tree_of, assert_same_weights, crashed_run, final_weights,  # noqa: F401
                             losses, run, workspace)

from preftune.config import ConfigError, TrainConfig, build_config
from preftune.train import loop
from preftune.train.engines import check_engine
from preftune.train.optimizers import make_optimizer, moment_bytes

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore")


def twins(device: str, seed: int = 0):
    """A tensor big enough for 8-bit moments (8192 weights) and one that keeps fp32 moments
    (100), around 10 so that weight decay moves them visibly; and a copy of both."""
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(10 + torch.randn(64, 128, device=device)),
              torch.nn.Parameter(10 + torch.randn(100, device=device))]
    return params, [torch.nn.Parameter(p.detach().clone()) for p in params]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("kind", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_adamw_updates_as_adamw_up_to_the_rounding_of_its_moments(kind, device):
    """Step 1 uses the moments before they are stored, so it is AdamW's (learning rate, betas,
    eps and decoupled weight decay all wired): exactly on a CPU, to float rounding on CUDA,
    whose kernels order the arithmetic differently. The small tensor keeps fp32 moments and
    stays AdamW's; the big one drifts by the 8-bit rounding, a few percent of its movement."""
    settings = dict(learning_rate=1e-3, weight_decay=0.1)
    same = dict(rtol=0, atol=0 if device == "cpu" else 4e-6)  # float32 spacing near 10: 1e-6
    eight, plain = twins(device)
    start = [p.detach().clone() for p in plain]
    eight_bit = make_optimizer(TrainConfig(optimizer=kind, **settings), eight)
    adamw = make_optimizer(TrainConfig(**settings), plain)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"]
    for step in range(8):
        for a, b in zip(eight, plain):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        eight_bit.step()
        adamw.step()
        if step == 0:
            for a, b in zip(eight, plain):
                torch.testing.assert_close(a, b, **same)
    big, small = eight_bit.state[eight[0]], eight_bit.state[eight[1]]
    assert big["state1"].dtype == big["state2"].dtype == torch.uint8
    assert small["state1"].dtype == small["state2"].dtype == torch.float32
    torch.testing.assert_close(eight[1], plain[1], **same)
    drift = (eight[0] - plain[0]).abs().max().item()
    moved = (plain[0] - start[0]).abs().mean().item()
    assert 8e-3 == pytest.approx(moved, rel=0.02)  # 8 steps of about lr each (decay included)
    assert 0 < drift < 0.05 * moved


def test_moment_bytes_counts_what_the_optimizers_hold():
    """Against the state tensors each optimizer holds after a step (the shared 256-value maps
    of the 8-bit one aside), for fp32 and bf16 weights, big and small, and an embedding."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for n in (4095, 4096, 5000)
              for dtype in (torch.float32, torch.bfloat16)]
    embedding = torch.nn.Embedding(100, 64).weight
    params.append(embedding)
    for kind in ("adamw", "adamw_8bit"):
        optimizer = make_optimizer(TrainConfig(optimizer=kind), params, [embedding])
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        held = sum(value.nbytes for state in optimizer.state.values()
                   for key, value in state.items()
                   if torch.is_tensor(value) and key not in ("qmap1", "qmap2", "step"))
        assert moment_bytes(kind, params, [embedding]) == held
    assert optimizer.state[embedding]["state1"].dtype == torch.float32
    assert moment_bytes("adamw_8bit", [embedding], [embedding]) == 2 * 6400 * 4
    assert moment_bytes("adamw_8bit", [embedding]) == 2 * (6400 + 4 * 25)
    # 8-bit: a byte per weight per moment and a fp32 scale per 256 weights; fp32 under 4096
    assert moment_bytes("adamw_8bit", params[:2]) == 2 * 4095 * 4 * 2
    assert moment_bytes("adamw_8bit", params[2:3]) == 2 * (4096 + 4 * 16)
    assert moment_bytes("adamw_8bit", params[4:5]) == 2 * (5000 + 4 * math.ceil(5000 / 256))


def test_the_8bit_step_on_a_cpu_holds_fp32_temporaries_of_its_largest_tensor():
    """What --plan adds for bitsandbytes' CPU step: its fp32 temporaries (5x a tensor with
    8-bit moments, 3x one with fp32 moments), measured as the tensor bytes alive during a
    step (the moments already made by an earlier one)."""
    from common import PhaseMemory

    from preftune.train.optimizers import step_temporaries

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((64, 32), (500, 64), (63,))]
    embedding = torch.nn.Parameter(torch.randn(1000, 64))  # fp32 moments: updated in place
    optimizer = make_optimizer(TrainConfig(optimizer="adamw_8bit"), [*params, embedding],
                               [embedding])
    for p in [*params, embedding]:
        p.grad = torch.randn_like(p)
    optimizer.step()
    memory = PhaseMemory("tensors")
    memory.enter("step")
    optimizer.step()
    measured = memory.stop()["step"] * 2**20
    planned = step_temporaries("adamw_8bit", [*params, embedding], [embedding],
                               torch.device("cpu"))
    assert planned == max(5 * 4 * 500 * 64, 3 * 4 * 1000 * 64)  # the embedding's
    assert measured == pytest.approx(planned, rel=1e-3)
    assert step_temporaries("adamw_8bit", params, [], torch.device("cpu")) == 5 * 4 * 500 * 64
    assert step_temporaries("adamw", params, [], torch.device("cpu")) == 0
    assert step_temporaries("adamw_8bit", params, [], torch.device("cuda")) == 0


def stored_moment_dtypes(output_dir, step: int) -> list[torch.dtype]:
    """The dtypes of the first moments in a checkpoint's optimizer state."""
    saved = torch.load(output_dir / "checkpoints" / f"step-{step:08d}" / "optimizer.pt",
                       weights_only=True)
    return [(state.get("__bnb_optimizer_quant_state__") or state).get("state1",
                                                                      state.get("exp_avg")).dtype
            for state in saved["state"].values()]


@pytest.fixture
def eight_bit_from_1024(monkeypatch):
    """The tiny model's tensors have 32 to 3328 weights: from 1024 on, their moments are held
    in 8 bits (4096, bitsandbytes' default, would leave them all in fp32)."""
    monkeypatch.setattr("preftune.train.optimizers.SMALLEST_8BIT", 1024)


def test_a_run_with_8bit_adamw_trains_as_adamw_then_drifts_and_resumes_exactly(
        workspace, monkeypatch, eight_bit_from_1024):  # noqa: F811
    settings = dict(train__max_steps=4, train__save_every=2, train__batch_size=4)
    adamw = run(workspace, "opt-adamw", **settings)
    straight = run(workspace, "opt-8bit", train__optimizer="adamw_8bit", **settings)
    # 10 of the 20 tensors: the MLP, q and o projections of both layers (not the embedding)
    assert sorted(map(str, stored_moment_dtypes(straight, 2))) == \
        ["torch.float32"] * 10 + ["torch.uint8"] * 10
    # step 1's update is AdamW's exactly, so step 2's loss is too; then the moments round
    assert losses(straight)[:2] == pytest.approx(losses(adamw)[:2], rel=1e-6)
    eight, plain = final_weights(straight), final_weights(adamw)
    start = final_weights(workspace)
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):
        drift = (eight[name] - plain[name]).abs().max().item()
        moved = (plain[name] - start[name]).abs().max().item()
        assert 0 < drift < 0.05 * moved, (name, drift, moved)

    crashed_run(workspace, "opt-8bit-crash", monkeypatch, 2, train__optimizer="adamw_8bit",
                **settings)
    config = build_config(_tree_of(workspace / "runs" / "opt-8bit-crash"))
    resumed = loop.train(config, resume=True, show_progress=False)
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6)
    assert_same_weights(straight, resumed, atol=0)


def test_8bit_adamw_trains_lora_adapters(workspace, eight_bit_from_1024):  # noqa: F811
    lora = {"model__lora": {"r": 32, "alpha": 64}, "train__max_steps": 3,
            "train__save_every": 2}
    eight = run(workspace, "opt-8bit-lora", train__optimizer="adamw_8bit", **lora)
    plain = run(workspace, "opt-adamw-lora", **lora)
    # 7 adapters a layer, each an A and a B; the B of k and v (16 x 32) stays in fp32
    assert sorted(map(str, stored_moment_dtypes(eight, 2))) == \
        ["torch.float32"] * 4 + ["torch.uint8"] * 24
    assert losses(eight)[:2] == pytest.approx(losses(plain)[:2], rel=1e-6)  # AdamW's update


def test_settings_an_8bit_optimizer_cannot_run_with_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="train.optimizer: adamw_8bit and "
                                         "train.optimizer_in_backward do not combine"):
        TrainConfig(optimizer="adamw_8bit", optimizer_in_backward=True, max_grad_norm=None)
    with pytest.raises(ValueError, match="Input should be 'adamw', 'adamw_8bit' or "
                                         "'paged_adamw_8bit'"):
        TrainConfig(optimizer="adam8")
    for engine, name in ((DistributedType.FSDP, "FSDP"), (DistributedType.DEEPSPEED, "DeepSpeed")):
        accelerator = SimpleNamespace(distributed_type=engine, num_processes=2)
        with pytest.raises(ConfigError, match=f"train.optimizer: paged_adamw_8bit does not run "
                                              f"under {name}"):
            check_engine(accelerator, TrainConfig(optimizer="paged_adamw_8bit"))
    real = __import__("importlib").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match=r"adamw_8bit needs the bitsandbytes package: pip "
                                         r"install 'bitsandbytes>=0.46.1'"):
        TrainConfig(optimizer="adamw_8bit")
