"""model.lora.rslora, model.lora.dora and model.lora.init (PiSSA, OLoRA): the saved model is the
formula of each applied to the trained adapter (checked from the adapter's tensors), every
layout trains DoRA alike, and its reference (adapters off) starts DPO at log 2."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_train_loop import (assert_same_weights, crashed_run, losses, resume, run,  # noqa: F401
                             workspace)

from preftune.config import ConfigError, LoraConfig, build_config
from preftune.train.logging import read_metrics

pytestmark = pytest.mark.filterwarnings("ignore")

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def merged_and_parts(output):
    """(merged model/ weights, the base's weights, the adapter's tensors)."""
    return (load_file(output / "model" / "model.safetensors"),
            load_file(output.parent.parent / "model" / "model.safetensors"),
            load_file(output / "adapter" / "adapter_model.safetensors"))


def merged_is_w_plus_scaled_update(merged, base, adapter, scale: float) -> int:
    """Assert each weight of the ``merged`` model is the ``base`` one plus ``scale`` B A of the
    ``adapter``'s tensors (unadapted ones unchanged); returns how many adapted weights moved."""
    adapted = 0
    for name, weight in base.items():
        stem = "base_model.model." + name.removesuffix(".weight")
        if f"{stem}.lora_A.weight" in adapter:
            delta = adapter[f"{stem}.lora_B.weight"] @ adapter[f"{stem}.lora_A.weight"]
            weight = weight + scale * delta
            adapted += bool(delta.abs().max() > 0)
        torch.testing.assert_close(merged[name], weight, rtol=0, atol=1e-6)
    return adapted


@pytest.mark.parametrize("rslora", [False, True])
def test_the_saved_model_is_w_plus_the_scaled_update(workspace, rslora):  # noqa: F811
    """W + s B A, with s = alpha / r, or alpha / sqrt(r) under rsLoRA (r 16: 2 against 8)."""
    output = run(workspace, f"rslora-{rslora}", model__lora={"r": 16, "alpha": 32,
                                                              "rslora": rslora})
    scale = 32 / math.sqrt(16) if rslora else 32 / 16
    assert merged_is_w_plus_scaled_update(*merged_and_parts(output), scale) == 2 * len(LINEAR)


def test_the_saved_dora_model_is_magnitude_times_normalized_direction(workspace):  # noqa: F811
    """W' = m / ||W + s B A|| * (W + s B A), the norm taken over each output row's inputs, m
    the trained magnitudes (starting at ||W||: the untrained adapter is the base)."""
    output = run(workspace, "dora", model__lora={"r": 4, "alpha": 8, "dora": True})
    merged, base, adapter = merged_and_parts(output)
    adapted = 0
    for name, weight in base.items():
        stem = "base_model.model." + name.removesuffix(".weight")
        if f"{stem}.lora_A.weight" in adapter:
            direction = weight + 2.0 * (adapter[f"{stem}.lora_B.weight"]
                                        @ adapter[f"{stem}.lora_A.weight"])
            magnitude = adapter[f"{stem}.lora_magnitude_vector"]
            assert magnitude.shape == (weight.shape[0],)
            moved = (magnitude - weight.norm(dim=1)).abs().max()
            weight = (magnitude / direction.norm(dim=1))[:, None] * direction
            adapted += bool(moved > 0)
        torch.testing.assert_close(merged[name], weight, rtol=0, atol=1e-6)
    assert adapted == 2 * len(LINEAR)  # every magnitude trained


@pytest.mark.parametrize("layout", ["prefix_shared", "packed", "packed_prefix_shared"])
def test_dora_trains_alike_in_every_layout(workspace, layout):  # noqa: F811
    lora = {"r": 4, "alpha": 8, "dora": True}
    padded = run(workspace, f"dora-padded-{layout}", model__lora=lora, train__layout="padded")
    other = run(workspace, f"dora-{layout}", model__lora=lora, train__layout=layout)
    assert losses(other) == pytest.approx(losses(padded), rel=1e-5)
    norms = [[r["grad_norm"] for r in read_metrics(out / "metrics.jsonl")]
             for out in (padded, other)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)
    for name, value in load_file(padded / "adapter" / "adapter_model.safetensors").items():
        torch.testing.assert_close(
            load_file(other / "adapter" / "adapter_model.safetensors")[name], value,
            atol=1e-5, rtol=1e-4, msg=name)


def test_dora_with_its_adapters_off_as_reference_starts_at_log_2(workspace):  # noqa: F811
    lora = {"r": 4, "alpha": 8, "dora": True}
    off = run(workspace, "dora-adapter-off", model__lora=lora, reference__strategy="adapter-off")
    precomputed = run(workspace, "dora-precomputed", model__lora=lora,
                      reference__strategy="precomputed")
    assert losses(off)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses(off) == pytest.approx(losses(precomputed), rel=1e-5)


def test_the_lora_settings_reach_peft():
    from preftune.model.lora import peft_lora_config

    config = peft_lora_config(LoraConfig(r=8, alpha=16, rslora=True, dora=True,
                                         target_modules=["q_proj"]), task_type="CAUSAL_LM")
    assert (config.r, config.lora_alpha, config.use_rslora, config.use_dora) == (8, 16, True, True)
    assert config.target_modules == {"q_proj"}


def principal_part(weight: torch.Tensor, init: str, r: int, scale: float) -> torch.Tensor:
    """What each init takes out of W into the adapter (s B0 A0), computed from W itself: PiSSA
    the top r singular triplets U_r S_r V_r^T; OLoRA s Q_r R_r of W = Q R."""
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        return (u[:, :r] * s[:r]) @ vh[:r]
    q, upper = torch.linalg.qr(weight.double())
    return scale * q[:, :r] @ upper[:r]


@pytest.mark.parametrize("init", ["pissa", "pissa_fast", "olora"])
def test_pissa_and_olora_start_at_the_base_and_save_a_plain_lora_of_it(workspace,  # noqa: F811
                                                                      init):
    """The run starts as the base (DPO at log 2 against the precomputed reference); adapter/ is
    [B, -B0] [A; A0] at rank 2r, alpha 2 alpha, so base + s B'A' is the saved model/, and its
    second half, s B0 A0, is the part of W the paper's decomposition puts in the adapter."""
    output = run(workspace, f"init-{init}", model__lora={"r": 4, "alpha": 8, "init": init})
    assert losses(output)[0] == pytest.approx(math.log(2), abs=1e-5)
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    merged, base, adapter = merged_and_parts(output)
    assert merged_is_w_plus_scaled_update(merged, base, adapter, 2.0) == 2 * len(LINEAR)
    if init == "pissa_fast":  # randomized: near the SVD part only where the spectrum falls off
        return
    for name, weight in base.items():
        stem = "base_model.model." + name.removesuffix(".weight")
        if f"{stem}.lora_A.weight" in adapter:
            b0, a0 = -adapter[f"{stem}.lora_B.weight"][:, 4:], adapter[f"{stem}.lora_A.weight"][4:]
            initial = b0 @ a0
            torch.testing.assert_close(2.0 * initial.double(),
                                       principal_part(weight, init, 4, 2.0), atol=1e-5, rtol=0,
                                       msg=name)


def test_a_resumed_pissa_run_ends_as_an_uninterrupted_one(workspace, monkeypatch):  # noqa: F811
    """Resuming decomposes the base again; the checkpoint's adapters go on from there."""
    settings = dict(model__lora={"r": 4, "alpha": 8, "init": "pissa"}, train__max_steps=4,
                    train__save_every=2, train__batch_size=4)
    straight = run(workspace, "pissa-straight", **settings)
    crashed = crashed_run(workspace, "pissa-crashed", monkeypatch, 2, **settings)
    resumed = resume(crashed)
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)
    assert_same_weights(straight, resumed)


def test_what_pissa_cannot_combine_with_is_refused():
    pissa = {"r": 4, "alpha": 8, "init": "pissa"}
    tdpo = build_config({"model": {"lora": pissa}, "objective": {"name": "tdpo"}})
    assert tdpo.reference_strategy == "live"  # the base under PiSSA adapters is not the model
    with pytest.raises(ConfigError, match="reference.strategy='adapter-off' is the base without "
                                          "adapters, but model.lora.init: pissa takes"):
        build_config({"model": {"lora": pissa}, "reference": {"strategy": "adapter-off"}})
    with pytest.raises(ConfigError, match="model.lora.init: olora and model.lora.dora do not "
                                          "combine"):
        build_config({"model": {"lora": {"init": "olora", "dora": True}}})
    with pytest.raises(ConfigError, match="model.lora.init: pissa decomposes the base's weights, "
                                          "which model.quantize: nf4 holds in 4 bits"):
        build_config({"model": {"lora": pissa, "quantize": "nf4"}})


def test_pissa_fast_finds_the_top_singular_part_of_a_weight_whose_spectrum_falls():
    """16 randomized subspace iterations recover U_r S_r V_r^T when the singular values fall
    off (as trained weights' do; a random matrix's flat spectrum would need a full SVD)."""
    from peft import get_peft_model

    from preftune.model.lora import peft_lora_config

    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 48))
    v, _ = torch.linalg.qr(torch.randn(48, 48))
    sigma = 2.0 ** -torch.arange(48.0)
    weight = (u * sigma) @ v.T
    layer = torch.nn.Sequential(torch.nn.Linear(48, 64, bias=False))
    layer[0].weight.data = weight.clone()
    lora = LoraConfig(r=4, alpha=8, init="pissa_fast", target_modules=["0"])
    adapted = get_peft_model(layer, peft_lora_config(lora)).base_model.model[0]
    part = 2.0 * adapted.lora_B["default"].weight @ adapted.lora_A["default"].weight
    torch.testing.assert_close(part, (u[:, :4] * sigma[:4]) @ v[:, :4].T, atol=1e-5, rtol=0)
    torch.testing.assert_close(adapted.base_layer.weight + part, weight, atol=1e-6, rtol=0)
