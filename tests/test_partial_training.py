"""model.train_layers / model.train_params: only the chosen weights move, and each moves exactly
as it does when every weight trains (the first AdamW step of a weight depends only on its own
gradient, which freezing the others must not change)."""

import pytest
import torch
from safetensors.torch import load_file
from test_train_loop import (assert_same_weights, crashed_run, final_weights, losses,  # noqa: F401
                             resume, run, workspace)

from preftune.config import ConfigError, ModelConfig

pytestmark = pytest.mark.filterwarnings("ignore")


def moved(output, workspace) -> set[str]:  # noqa: F811
    start = load_file(workspace / "model" / "model.safetensors")
    end = final_weights(output)
    return {name for name in start if not torch.equal(start[name], end[name])}


def layer_of(name: str) -> str:
    return name.split(".")[2] if name.startswith("model.layers.") else name


def full_step(workspace, **layout):  # noqa: F811
    """One step of full fine-tuning (in ``layout``), the run a partial one is compared with."""
    output = workspace / "runs" / ("full-" + "-".join(map(str, layout.values())))
    if not (output / "model").is_dir():
        run(workspace, output.name, train__max_steps=1, **layout)
    return output


@pytest.fixture
def full(workspace):  # noqa: F811
    return full_step(workspace)


@pytest.mark.parametrize("layers, trained", [(1, {"1"}), (-1, {"0"}), (2, {"0", "1"})])
def test_only_the_chosen_layers_move_and_as_in_full_training(workspace, full, layers,  # noqa: F811
                                                             trained):
    output = run(workspace, f"layers{layers}", model__train_layers=layers, train__max_steps=1)
    changed = moved(output, workspace)
    assert {layer_of(name) for name in changed} == trained
    assert len(changed) == 9 * len(trained)  # 7 projections and 2 norms per layer
    card = (output / "model" / "README.md").read_text()
    assert f'| trained weights | {{"train_layers": {layers}}} |' in card
    assert losses(output) == pytest.approx(losses(full), rel=1e-6)  # the same model at step 1
    end, reference = final_weights(output), final_weights(full)
    for name in changed:
        torch.testing.assert_close(end[name], reference[name], rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("extra", [{}, {"train__gradient_checkpointing": True},
                                   {"train__layout": "padded"},
                                   {"train__optimizer_in_backward": True}])
def test_patterns_train_only_their_weights_in_every_mode(workspace, extra):  # noqa: F811
    """(Rows padded, the gradients differ from the default layout's in rounding, which moves
    the first step of a weight with a gradient near AdamW's eps: the full run is padded too.)"""
    full = full_step(workspace, **{k: v for k, v in extra.items() if k == "train__layout"})
    name = "mlp-" + "-".join(k.split("__")[1] for k in extra)
    output = run(workspace, name, model__train_params=["*.mlp.*", "model.norm.weight"],
                 train__max_steps=1, **extra)
    changed = moved(output, workspace)
    assert changed == {f"model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 1)
                       for p in ("gate", "up", "down")} | {"model.norm.weight"}
    end, reference = final_weights(output), final_weights(full)
    for name in changed:
        torch.testing.assert_close(end[name], reference[name], rtol=0, atol=1e-7, msg=name)


def test_checkpoints_hold_only_the_trained_weights_and_resume(workspace,  # noqa: F811
                                                             monkeypatch):
    settings = dict(model__train_layers=1, train__max_steps=3, train__save_every=1,
                    train__keep_checkpoints=3)
    straight = run(workspace, "top-straight", **settings)
    saved = load_file(straight / "checkpoints" / "step-00000001" / "trainable.safetensors")
    assert {layer_of(name.removeprefix("model.")) for name in saved} == {"1"}
    assert len(saved) == 9
    crashed = crashed_run(workspace, "top-crashed", monkeypatch, 1, **settings)
    resumed = resume(crashed)
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6)
    assert moved(resumed, workspace) == moved(straight, workspace)
    assert_same_weights(straight, resumed)


def test_the_tied_output_layer_trains_under_either_name(workspace):  # noqa: F811
    output = run(workspace, "head", model__train_params=["lm_head.weight"], train__max_steps=1)
    assert moved(output, workspace) == {"model.embed_tokens.weight"}  # tied: one tensor


def test_what_cannot_work_is_refused(workspace):  # noqa: F811
    with pytest.raises(ConfigError, match=r"model.train_layers: 3, but the model has 2 decoder "
                                          r"layers; choose 1 to 2 \(or -1 to -2"):
        run(workspace, "too-many", model__train_layers=3)
    with pytest.raises(ConfigError, match=r"model.train_params: '\*.attn.\*' matches no weight "
                                          r"of the model; names look like "
                                          r"model.embed_tokens.weight, "):
        run(workspace, "no-match", model__train_params=["*.attn.*"])
    with pytest.raises(ValueError, match="model.train_layers / model.train_params choose "
                                         "weights to train in full, model.lora trains adapters"):
        ModelConfig(train_layers=2, lora={"r": 4})
    with pytest.raises(ValueError, match="would train nothing"):
        ModelConfig(train_layers=0)
