"""A trained parameter that never gets a gradient (LLaVA's CLIP tower has a post_layernorm
its language model never reads) has no optimizer state. Its checkpoint used to be refused on
--resume ("Missing optimizer state for parameter ..."), every checkpoint of the run alike."""

import torch
from torch import nn

from preftune.train.checkpoint import gather_training_state, load_checkpoint, save_checkpoint


class PartlyUsed(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 3)
        self.unused = nn.LayerNorm(3)  # trainable, never in the forward

    def forward(self, x):
        return self.used(x)


def _trained(seed: int):
    torch.manual_seed(seed)
    model = PartlyUsed()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def test_a_parameter_without_optimizer_state_resumes(tmp_path):
    model, optimizer, scheduler = _trained(0)
    for _ in range(2):
        model(torch.ones(2, 3)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    weights, optimizer_state = gather_training_state(model, optimizer)
    assert set(optimizer_state["state"]) == {"used.weight", "used.bias"}
    path = save_checkpoint(tmp_path / "checkpoints", 2, weights, optimizer_state, scheduler,
                           keep=1)

    fresh, fresh_optimizer, fresh_scheduler = _trained(1)
    assert load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler) == 2
    for name, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0)
    restored = fresh_optimizer.state_dict()["state"]
    for index, saved in optimizer.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(restored[index][key], saved[key], rtol=0, atol=0)
    # and the next step is the one the run would have taken
    for trained, its_optimizer in ((model, optimizer), (fresh, fresh_optimizer)):
        trained(torch.ones(2, 3)).square().sum().backward()
        its_optimizer.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0)
