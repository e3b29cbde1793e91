"""Activation checkpointing through ``model/checkpointing.py``'s ``recompute``: exactly the plain
backward's gradients (full weights, LoRA, frozen lower layers, every layout, dropout), only a
layer's input kept per layer, and torch's checkpoint where a keyword tensor needs a gradient."""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

from preftune.config import LoraConfig, ModelConfig
from preftune.data.layout import collate
from preftune.model.checkpointing import enable_checkpointing
from preftune.model.forward import LogpModel, sequence_stats
from preftune.model.freeze import train_only_part
from preftune.model.lean import kept_for_backward, use_lean_layers
from preftune.model.lora import add_lora
from test_layouts import examples

WEIGHTS = torch.tensor([[0.7, -1.3], [2.0, 0.4], [-0.5, 1.1], [1.5, -0.2]])


def llama(layers: int = 3, dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         attention_dropout=dropout, tie_word_embeddings=True, pad_token_id=0)
    return LlamaForCausalLM(config).train()


def logps_and_grads(model, layout, seed=0):
    batch = collate(examples(2), pad_token_id=0, layout=layout, max_row_tokens=40)
    torch.manual_seed(seed)  # dropout's random numbers
    logps = sequence_stats(LogpModel(model, chunk_tokens=7)(batch), batch).logps
    (logps * WEIGHTS).sum().backward()
    return logps.detach(), {name: p.grad for name, p in model.named_parameters()
                            if p.grad is not None}


def prepared(variant: str) -> nn.Module:
    model = llama()
    use_lean_layers(model)
    if variant == "lora":
        model = add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    elif variant == "top layer":  # the layers below get no gradient at all
        train_only_part(model, ModelConfig(path="unused", train_layers=1))
    return model


@pytest.mark.parametrize("layout", ["padded", "prefix_shared", "packed"])
@pytest.mark.parametrize("variant", ["full", "lora", "top layer"])
def test_recomputed_layers_give_the_plain_backward_exactly(layout, variant):
    plain = prepared(variant)
    checkpointed = copy.deepcopy(plain)
    enable_checkpointing(checkpointed)
    plain_logps, plain_grads = logps_and_grads(plain, layout)
    logps, grads = logps_and_grads(checkpointed, layout)
    assert torch.equal(logps, plain_logps)
    assert grads.keys() == plain_grads.keys()
    expected = {"full": 3 * 9 + 2, "lora": 3 * 4, "top layer": 9}[variant]
    assert len(grads) == expected  # (full: 3 layers x 9 tensors, the final norm, embeddings)
    for name, grad in plain_grads.items():
        assert torch.equal(grads[name], grad), name


def test_dropout_is_recomputed_with_the_forwards_random_numbers():
    """With dropout kept (train.keep_dropout), the recomputation draws the forward's random
    numbers: the same gradients as the plain backward under the same seed (and not under
    another: the dropout does act)."""
    plain = llama(dropout=0.5)
    checkpointed = copy.deepcopy(plain)
    enable_checkpointing(checkpointed)
    _, plain_grads = logps_and_grads(plain, "padded", seed=3)
    _, grads = logps_and_grads(checkpointed, "padded", seed=3)
    for name, grad in plain_grads.items():
        assert torch.equal(grads[name], grad), name
    plain.zero_grad()
    _, other_seed = logps_and_grads(plain, "padded", seed=4)
    assert not torch.equal(other_seed["model.layers.0.self_attn.q_proj.weight"],
                           plain_grads["model.layers.0.self_attn.q_proj.weight"])


def test_a_checkpointed_layer_keeps_only_its_input_for_backward():
    """Each further layer adds its input ([rows, width, hidden] in fp32) to what autograd
    keeps, where a plain layer keeps its every intermediate."""
    batch = collate(examples(2), pad_token_id=0, layout="padded")
    rows, width = batch.input_ids.shape

    def kept(layers, checkpoint):
        model = llama(layers)
        if checkpoint:
            enable_checkpointing(model)
        return kept_for_backward(lambda: sequence_stats(LogpModel(model)(batch), batch).logps,
                                 list(model.parameters()))

    assert kept(5, True) - kept(3, True) == 2 * rows * width * 32 * 4
    assert kept(5, False) - kept(3, False) > 10 * (kept(5, True) - kept(3, True))


class Scaled(GradientCheckpointingLayer):
    """A layer whose keyword input needs a gradient: ``x * scale`` through a linear map."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, scale=None):
        return torch.tanh(self.linear(x * scale))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Scaled(), Scaled()])

    def forward(self, x, scale):
        for layer in self.layers:
            x = layer(x, scale=scale)
        return x


def test_a_keyword_tensor_that_needs_a_gradient_goes_through_torchs_checkpoint():
    """``recompute`` hands back gradients of positional inputs and weights only; a layer
    called with a keyword tensor that needs one is checkpointed by torch instead, so that
    tensor's gradient is whole."""
    from preftune.model.checkpointing import recompute

    torch.manual_seed(0)
    plain, x = Stack(), torch.randn(3, 4)
    checkpointed = copy.deepcopy(plain)
    for layer in checkpointed.layers:
        layer.gradient_checkpointing, layer._gradient_checkpointing_func = True, recompute
    grads = []
    for model in (plain, checkpointed):
        scale = torch.full((4,), 0.5, requires_grad=True)
        model(x, scale).sum().backward()
        grads.append((scale.grad, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
    for ours, theirs in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


class Noting(nn.Module):
    """A layer that notes whether each of its calls builds a graph."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.grad_enabled = []

    def forward(self, x, *, scale):
        self.grad_enabled.append(torch.is_grad_enabled())
        return torch.tanh(self.linear(x)) * scale


@pytest.mark.parametrize("hooked", [False, True])
def test_a_layer_handed_over_as_its_call_recomputes_with_the_plain_gradients(hooked):
    """transformers before 5.23 hands ``recompute`` ``partial(layer.__call__, **kwargs)``: the
    layer is found there and recomputed (its forward without a graph); a layer with hooks
    (FSDP2's) goes through torch's checkpoint, which builds the graph in its forward."""
    import functools

    from preftune.model.checkpointing import recompute

    torch.manual_seed(0)
    layer, x = Noting(), torch.randn(3, 2, requires_grad=True)
    if hooked:
        layer.register_forward_pre_hook(lambda module, args: None)
    plain = layer(x, scale=2.0)
    plain.square().sum().backward()
    expected = [x.grad.clone(), *(p.grad.clone() for p in layer.parameters())]
    x.grad = None
    layer.zero_grad()
    layer.grad_enabled.clear()
    out = recompute(functools.partial(layer.__call__, scale=2.0), x)
    out.square().sum().backward()
    assert layer.grad_enabled == [hooked, True]  # the forward, then its recomputation
    for got, want in zip([x.grad, *(p.grad for p in layer.parameters())], expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
