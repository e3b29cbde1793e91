"""train.adam_betas and train.adam_epsilon reach every optimizer: three updates of a small weight
equal AdamW's formula written out with those settings."""

import importlib.util

import pytest
import torch

from preftune.config import ConfigError, TrainConfig, build_config
from preftune.train.optimizers import make_optimizer

LR, DECAY, BETAS, EPS = 0.1, 0.1, (0.5, 0.75), 0.3
GRADIENTS = [torch.tensor([0.2, -1.0, 3.0]), torch.tensor([-0.4, 0.5, 1.0]),
             torch.tensor([1.0, 0.0, -2.0])]
START = torch.tensor([1.0, 2.0, -3.0])


def adamw_by_hand() -> list[float]:
    """AdamW (Loshchilov & Hutter): decoupled decay, bias-corrected moments, eps outside the
    root, in float64."""
    weight, m, v = START.double().clone(), 0.0, 0.0
    for t, g in enumerate(GRADIENTS, start=1):
        g = g.double()
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        m_hat, v_hat = m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)
        weight = weight * (1 - LR * DECAY) - LR * m_hat / (v_hat.sqrt() + EPS)
    return weight.tolist()


EIGHT_BIT = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not installed")


@pytest.mark.parametrize("settings", [
    {}, {"optimizer_in_backward": True, "max_grad_norm": None},
    pytest.param({"optimizer": "adamw_8bit"}, marks=EIGHT_BIT)],  # (3 weights: fp32 moments)
    ids=["adamw", "in-backward", "adamw_8bit"])
def test_every_optimizer_takes_the_betas_and_epsilon(settings):
    cfg = TrainConfig(learning_rate=LR, weight_decay=DECAY, adam_betas=list(BETAS),
                      adam_epsilon=EPS, **settings)
    weight = torch.nn.Parameter(START.clone())
    optimizer = make_optimizer(cfg, [weight])
    for gradient in GRADIENTS:
        (weight * gradient).sum().backward()  # d/dw = gradient (in-backward steps here)
        optimizer.step()
        optimizer.zero_grad()
    assert weight.tolist() == pytest.approx(adamw_by_hand(), abs=1e-6)


def test_the_defaults_are_adamws_and_bad_betas_are_refused():
    cfg = TrainConfig()
    assert (cfg.adam_betas, cfg.adam_epsilon) == ([0.9, 0.999], 1e-8)
    with pytest.raises(ConfigError, match=r"train.adam_betas takes two numbers, \[beta1, beta2\]"):
        build_config({"train": {"adam_betas": [0.9]}})
    with pytest.raises(ConfigError, match=r"train.adam_betas: Input should be less than 1 \(got 1.0\)"):
        build_config({"train": {"adam_betas": [0.9, 1.0]}})
