"""Lean layers: the same forward as transformers' Llama-style RMSNorm and SiLU-gated MLP, bit
for bit, gradients equal to autograd's through them (bit for bit for the MLP), exactly the
bytes named less kept for backward, and only classes they reproduce are switched."""

import copy

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from preftune.data.layout import collate
from preftune.model.forward import LogpModel, sequence_stats
from preftune.model.lean import kept_for_backward, use_lean_layers
from test_forward import _examples
from tiny_models import tiny_llama


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                     reason="needs a CUDA device"))


def outputs_and_grads(modules, x, upstream):
    """Each module's output on ``x`` and the gradients of ``(output * upstream).sum()`` with
    respect to ``x`` and its parameters."""
    outputs, grads = [], []
    for module in modules:
        inp = x.clone().requires_grad_()
        out = module(inp)
        (out * upstream).sum().backward()
        outputs.append(out)
        grads.append([inp.grad] + [p.grad for p in module.parameters()])
    return outputs, grads


def norm_pair(dtype, hidden=48, device="cpu"):
    torch.manual_seed(0)
    plain = LlamaRMSNorm(hidden, eps=1e-5).to(device, dtype)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(hidden))
    lean = copy.deepcopy(plain)
    assert use_lean_layers(lean) == {"RMSNorm": 1, "MLP": 0}
    return plain, lean


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_bitwise_the_same_and_gradients_match_autograd(dtype, device):
    plain, lean = norm_pair(dtype, device=device)
    x = (torch.randn(5, 7, 48) * 4).to(device, dtype)
    upstream = torch.randn(5, 7, 48).to(device, dtype)
    outputs, grads = outputs_and_grads((plain, lean), x, upstream)
    assert torch.equal(outputs[0], outputs[1])
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else \
        {"atol": 2e-2, "rtol": 2e-2}
    assert len(grads[0]) == 2  # the input's and the weight's
    for mine, reference in zip(grads[1], grads[0]):
        torch.testing.assert_close(mine, reference, **tolerance)


def test_keeps_four_bytes_per_element_less_for_backward_in_bf16():
    """transformers' norm keeps the fp32 copy of its input (4 bytes an element) and its bf16
    normalized values (2); the lean one keeps the bf16 input (2). Both keep the weight and one
    fp32 scale per token."""
    def saved_bytes(module, x):
        return kept_for_backward(lambda: module(x))

    plain, lean = norm_pair(torch.bfloat16)
    x = torch.randn(4, 10, 48, dtype=torch.bfloat16, requires_grad=True)
    elements, tokens = x.numel(), 40
    assert saved_bytes(plain, x) == 6 * elements + 4 * tokens + 2 * 48
    assert saved_bytes(lean, x) == 2 * elements + 4 * tokens + 2 * 48


def test_a_model_trains_the_same_through_lean_layers():
    """Every norm of a Llama (two a layer and the final one) and every MLP is switched;
    log-probs are bitwise the same and gradients match."""
    plain = tiny_llama(seed=2).train()
    lean = copy.deepcopy(plain)
    assert use_lean_layers(lean) == {"RMSNorm": 2 * 2 + 1, "MLP": 2}
    batch = collate(_examples(), 0, "prefix_shared")
    weights = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    logps = []
    for model in (plain, lean):
        stats = sequence_stats(LogpModel(model)(batch), batch)
        (stats.logps * weights).sum().backward()
        logps.append(stats.logps)
    assert torch.equal(logps[0], logps[1])
    for (name, p), q in zip(plain.named_parameters(), lean.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


class OffsetRMSNorm(nn.Module):
    """Gemma's variant: scales by (1 + weight), and its weight starts at zero."""

    def __init__(self, hidden):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        upcast = x.float()
        normed = upcast * torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


def test_norms_it_does_not_reproduce_are_left_alone():
    model = nn.Sequential(OffsetRMSNorm(16), LlamaRMSNorm(16), nn.LayerNorm(16))
    assert use_lean_layers(model) == {"RMSNorm": 1, "MLP": 0}
    assert [type(m).__name__ for m in model] == ["OffsetRMSNorm", "LeanLlamaRMSNorm", "LayerNorm"]
    assert isinstance(model[1], LlamaRMSNorm)
    assert use_lean_layers(model) == {"RMSNorm": 1, "MLP": 0}  # again: the same one


def test_a_forward_put_on_the_module_stays_and_the_class_is_probed():
    """A forward set on the module itself (what transformers does with a hub kernel) is left
    in use; the probe checks the class's own forward, so the class is still switched."""
    norm = LlamaRMSNorm(16)
    norm.forward = lambda x: x * 0  # stands in for a kernel that differs on the probe
    assert use_lean_layers(norm) == {"RMSNorm": 1, "MLP": 0}
    assert type(norm).__name__ == "LeanLlamaRMSNorm"
    assert torch.equal(norm(torch.ones(2, 16)), torch.zeros(2, 16))
    del norm.forward  # the kernel's fallback: the class's forward, now the lean one
    torch.testing.assert_close(norm(torch.ones(2, 16)), torch.ones(2, 16), atol=1e-5, rtol=0)


def test_lean_layers_outlive_train_eval_switches_of_a_loaded_model(tmp_path):
    """transformers (with the kernels package it depends on) resets per-module forwards on
    every train/eval switch of a model from from_pretrained; the lean layers stay, and a copy
    pickles."""
    import pickle

    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert use_lean_layers(model) == {"RMSNorm": 5, "MLP": 2}
    model.train()
    model.eval()
    model.train()
    assert {type(m).__name__ for m in model.modules()
            if type(m).__name__.endswith(("RMSNorm", "MLP"))} == {"LeanLlamaRMSNorm", "LeanLlamaMLP"}
    copied = pickle.loads(pickle.dumps(model))
    assert type(copied.model.norm).__name__ == "LeanLlamaRMSNorm"


def mlp_pair(dtype, act="silu", device="cpu"):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    plain = LlamaMLP(LlamaConfig(hidden_size=24, intermediate_size=40, hidden_act=act,
                                 num_attention_heads=4, num_key_value_heads=2))
    plain = plain.to(device, dtype)
    lean = copy.deepcopy(plain)
    return plain, lean, use_lean_layers(lean)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_gated_mlp_forward_and_gradients_are_bitwise_the_same(dtype, device):
    plain, lean, counts = mlp_pair(dtype, device=device)
    assert counts == {"RMSNorm": 0, "MLP": 1}
    x = torch.randn(3, 5, 24).to(device, dtype)
    upstream = torch.randn(3, 5, 24).to(device, dtype)
    outputs, grads = outputs_and_grads((plain, lean), x, upstream)
    assert torch.equal(outputs[0], outputs[1])
    assert len(grads[0]) == 4  # the input's and the three projections'
    for mine, reference in zip(grads[1], grads[0]):
        assert torch.equal(mine, reference)  # backward runs the kernel autograd runs


def test_silu_gated_mlp_keeps_one_intermediate_tensor_less():
    """silu(gate) is not kept: 40 intermediate values x 2 bytes per token in bf16."""
    def saved_bytes(module, x):
        return kept_for_backward(lambda: module(x), leave_out=module.parameters())

    plain, lean, _ = mlp_pair(torch.bfloat16)
    x = torch.randn(4, 10, 24, dtype=torch.bfloat16, requires_grad=True)
    tokens = 40  # kept by both: x (24 a token), gate, up and the product (40 each)
    assert saved_bytes(plain, x) == 2 * tokens * (24 + 4 * 40)
    assert saved_bytes(lean, x) == 2 * tokens * (24 + 3 * 40)


def test_mlps_with_another_activation_are_left_alone():
    _, lean, counts = mlp_pair(torch.float32, act="gelu")
    assert counts == {"RMSNorm": 0, "MLP": 0} and type(lean).__name__ == "LlamaMLP"
