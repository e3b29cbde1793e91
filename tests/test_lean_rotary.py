"""The lean rotary embedding: transformers' ``q * cos + rotate_half(q) * sin`` (and k's) with the
same bits forward and backward in fewer operators, on every family whose function it
reproduces, and transformers' own function wherever it does not apply."""

import copy

import pytest
import torch
from transformers import (GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, PhiConfig, PhiForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from host_reads import HostReads
from preftune.model.lean import use_lean_layers

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                     reason="needs a CUDA device"))
SHAPES = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def attention_run(model, x, positions, upstream):
    """Layer 0's attention on ``x``: its output, the gradients of ``(output * upstream).sum()``
    for x and the projections, and the operators its backward ran."""
    attention = model.model.layers[0].self_attn
    x = x.clone().requires_grad_()
    cos_sin = model.model.rotary_emb(x, positions)
    out = attention(x, position_embeddings=cos_sin, attention_mask=None)[0]
    with HostReads() as backward:
        (out * upstream).sum().backward()
    return out, [x.grad] + [p.grad for p in attention.parameters()], backward


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_output_and_gradients_are_bitwise_the_same(dtype, device):
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(**SHAPES)).to(device, dtype)
    lean = copy.deepcopy(plain)
    assert use_lean_layers(lean)["rotary"] == 2
    x = torch.randn(2, 7, 64).to(device, dtype)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 2, 3, 4]], device=device)
    upstream = torch.randn(2, 7, 64).to(device, dtype)
    (out, grads, _), (lean_out, lean_grads, _) = (
        attention_run(model, x, positions, upstream) for model in (plain, lean))
    assert torch.equal(out, lean_out)
    assert len(grads) == 5  # x, q, k, v, o
    for mine, reference in zip(lean_grads, grads, strict=True):
        assert torch.equal(mine, reference)


def test_backward_runs_half_the_operators_and_copies_nothing():
    """Through transformers' rotate_half, backward takes for each of q and k two products, a
    negation, two slice gradients (a zero fill and a copy each) and two sums, and then a copy
    of the gradient, which comes back contiguous in [batch, heads, tokens, dim], into the
    projection's [batch, tokens, heads x dim]: 8 operators. The lean backward takes 4: two
    products, a roll and a sum written straight into the projection's layout."""
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(**SHAPES))
    lean = copy.deepcopy(plain)
    use_lean_layers(lean)
    x, upstream = torch.randn(2, 7, 64), torch.randn(2, 7, 64)
    positions = torch.arange(7).expand(2, -1)
    plain_ops, lean_ops = (attention_run(m, x, positions, upstream)[2] for m in (plain, lean))
    assert plain_ops.calls["slice_backward"] == 4 and plain_ops.calls["clone"] == 2
    assert lean_ops.calls["slice_backward"] == 0 and lean_ops.calls["clone"] == 0
    assert lean_ops.calls["roll"] == 2
    assert plain_ops.ops - lean_ops.ops == 2 * (8 - 4), (plain_ops.calls, lean_ops.calls)


@pytest.mark.parametrize("family", [
    (Qwen2ForCausalLM, Qwen2Config), (Qwen3ForCausalLM, Qwen3Config),
    (MistralForCausalLM, MistralConfig), (GemmaForCausalLM, GemmaConfig)])
def test_every_llama_style_family_gets_it_with_the_same_logits(family):
    model_class, config_class = family
    torch.manual_seed(0)
    plain = model_class(config_class(**SHAPES))
    lean = copy.deepcopy(plain)
    assert use_lean_layers(lean)["rotary"] == 2
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(plain(ids).logits, lean(ids).logits)


def test_a_partial_rotary_width_gets_it_too():
    """Phi rotates a quarter of each head's dims here and hands the rotary function only
    those: the lean one applies, and logits and gradients are transformers' bit for bit."""
    torch.manual_seed(0)
    plain = PhiForCausalLM(PhiConfig(**SHAPES, partial_rotary_factor=0.25))
    lean = copy.deepcopy(plain)
    assert use_lean_layers(lean)["rotary"] == 2
    ids = torch.randint(0, 64, (2, 9))
    outputs = [model(ids).logits for model in (plain, lean)]
    assert torch.equal(outputs[0], outputs[1])
    for logits in outputs:
        logits.sum().backward()
    for (name, p), q in zip(plain.named_parameters(), lean.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_calls_it_does_not_cover_run_transformers_own_function(monkeypatch):
    """Another argument (here q and k as [batch, tokens, heads, dim]) or cos narrower than the
    heads goes to transformers' function, not the lean one."""
    from transformers.models.llama import modeling_llama

    from preftune.model import lean as lean_module

    model = LlamaForCausalLM(LlamaConfig(**SHAPES))
    use_lean_layers(model)
    function = model.model.layers[0].self_attn._kernel_funcs["rotary_pos_emb"]
    monkeypatch.setattr(lean_module.LeanRotary, "apply", None)  # would fail if called
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    expected = modeling_llama.rotate_half(q) * sin.unsqueeze(2) + q * cos.unsqueeze(2)
    torch.testing.assert_close(function(q, k, cos, sin, unsqueeze_dim=2)[0], expected)
    with pytest.raises(RuntimeError, match="size of tensor"):  # Llama's own: no partial width
        function(q.transpose(1, 2), k.transpose(1, 2), cos[..., :8], sin[..., :8])
