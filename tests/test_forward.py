import copy

import pytest
import torch
from common import PhaseMemory

from preftune.data.layout import collate_padded
from preftune.data.tokenize import TokenizedExample
from preftune.model.chunked_logps import (Head, chunked_token_logps,
                                           chunked_token_logps_and_kl)
from preftune.model.forward import LogpModel, sequence_stats
from tiny_models import tiny_llama


def test_chunked_logps_match_full_logits_values_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.randn(37, dtype=torch.float64)

    chunked = chunked_token_logps(hidden.float(), weight.float(), targets, chunk_tokens=8)
    (chunked * upstream.float()).sum().backward()
    grads_chunked = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    full = torch.log_softmax(hidden.float() @ weight.float().T, dim=-1)
    plain = full[torch.arange(37), targets]
    (plain * upstream.float()).sum().backward()

    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads_chunked[0], hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads_chunked[1], weight.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", [Head(), Head(scale=0.5, softcap=3.0)])
def test_chunked_collisions_match_full_logits_and_leave_the_log_probs_as_they_were(head):
    """WPO's alignment term log sum_v pi(v)^2, computed chunk by chunk with the log-probs (and
    in the KL path), equals the full softmax's; asking for it changes neither the log-probs
    nor their gradients, and it carries no gradient itself."""
    torch.manual_seed(1)
    hidden = torch.randn(29, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (29,))
    full = torch.log_softmax(head.logits(hidden, weight), dim=-1)
    expected = torch.log((full.exp() ** 2).sum(-1))  # the sum itself, not logsumexp
    logps, collisions = chunked_token_logps(hidden, weight, targets, 8, head, collisions=True)
    torch.testing.assert_close(collisions, expected.detach(), atol=1e-5, rtol=1e-5)
    assert not collisions.requires_grad
    plain = chunked_token_logps(hidden, weight, targets, 8, head)
    assert torch.equal(logps, plain)
    logps.sum().backward()
    with_collisions = hidden.grad.clone()
    hidden.grad = None
    plain.sum().backward()
    assert torch.equal(with_collisions, hidden.grad)
    reference = (torch.randn(29, 16), torch.randn(40, 16))
    *_, kl_path = chunked_token_logps_and_kl(hidden, weight, targets, *reference, 8, head,
                                             collisions=True)
    torch.testing.assert_close(kl_path, expected.detach(), atol=1e-5, rtol=1e-5)
    assert len(chunked_token_logps_and_kl(hidden, weight, targets, *reference, 8, head)) == 2


def _examples():
    return [
        TokenizedExample(prompt_ids=[1, 5, 6, 7], response_ids=[[8, 9, 2], [10, 2]], index=0),
        TokenizedExample(prompt_ids=[1, 11], response_ids=[[12, 13, 14, 2], [15, 2]], index=1),
    ]


def test_sequence_stats_match_plain_model_logits():
    model = tiny_llama()
    batch = collate_padded(_examples(), pad_token_id=0)
    stats = sequence_stats(LogpModel(model, chunk_tokens=3)(batch), batch, per_token=True)

    for e, example in enumerate(_examples()):
        for r, response in enumerate(example.response_ids):
            ids = torch.tensor([example.prompt_ids + response])
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            start = len(example.prompt_ids)
            expected = [logprobs[start - 1 + t, tok] for t, tok in enumerate(response)]
            expected = torch.stack(expected)
            torch.testing.assert_close(stats.logps[e, r], expected.sum(), atol=1e-5, rtol=1e-5)
            assert stats.token_counts[e, r] == len(response)
            torch.testing.assert_close(stats.token_logps[e, r, : len(response)], expected,
                                       atol=1e-5, rtol=1e-5)
            assert stats.token_mask[e, r].sum() == len(response)


def test_stats_gradients_match_plain_model():
    model = tiny_llama()
    batch = collate_padded(_examples(), pad_token_id=0)
    stats = sequence_stats(LogpModel(model, chunk_tokens=2)(batch), batch)
    (stats.logps * torch.tensor([[1.0, -2.0], [0.5, 3.0]])).sum().backward()
    chunked_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    total = 0
    weights = [[1.0, -2.0], [0.5, 3.0]]
    for e, example in enumerate(_examples()):
        for r, response in enumerate(example.response_ids):
            ids = torch.tensor([example.prompt_ids + response])
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            start = len(example.prompt_ids)
            seq = sum(logprobs[start - 1 + t, tok] for t, tok in enumerate(response))
            total = total + weights[e][r] * seq
    total.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(chunked_grads[name], param.grad, atol=1e-5, rtol=1e-4)


def test_decoder_forward_and_its_checkpointed_recomputation_leave_cudnn_attention_out():
    """Every decoder layer runs with cuDNN's SDPA kernel disallowed (its host time per call on
    Hopper GPUs, see ``attention_kernels``) and the other kernels allowed, also when activation
    checkpointing recomputes the layer in backward; outside the decoder torch's setting is
    untouched."""
    from preftune.model.checkpointing import enable_checkpointing

    model = tiny_llama()
    enable_checkpointing(model)
    model.train()
    seen = []

    def record(module, args):
        seen.append((torch.is_grad_enabled(), torch.backends.cuda.cudnn_sdp_enabled(),
                     torch.backends.cuda.flash_sdp_enabled(),
                     torch.backends.cuda.mem_efficient_sdp_enabled(),
                     torch.backends.cuda.math_sdp_enabled()))

    model.model.layers[0].self_attn.register_forward_pre_hook(record)
    batch = collate_padded(_examples(), pad_token_id=0)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    logps = sequence_stats(LogpModel(model)(batch), batch).logps
    assert len(seen) == 1  # the forward
    logps.sum().backward()
    assert len(seen) == 2  # and its recomputation in backward
    # the forward runs without gradients (``recompute`` keeps the layer's inputs only), the
    # recomputation with them
    assert seen == [(False, False, True, True, True), (True, False, True, True, True)]
    assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("every, recomputed", [(1, [0, 1, 2, 3, 4]), (2, [0, 2, 4]),
                                               (3, [0, 3]), (5, [0])])
def test_checkpointing_every_nth_layer_recomputes_those_and_gives_the_same_gradients(
        every, recomputed):
    """``enable_checkpointing(model, every)`` recomputes layers 0, every, 2*every, ... in
    backward (each is called twice, the others once) and the gradients equal the plain
    backward's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from preftune.model.checkpointing import enable_checkpointing

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2)
    plain = LlamaForCausalLM(config).train()
    model = copy.deepcopy(plain)
    enable_checkpointing(model, every)
    calls = [0] * 5
    for index, layer in enumerate(model.model.layers):  # (the layer's own hook runs once)
        layer.self_attn.register_forward_pre_hook(lambda module, args, i=index: calls.__setitem__(
            i, calls[i] + 1))
    batch = collate_padded(_examples(), pad_token_id=0)
    weights = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    for net in (plain, model):
        (sequence_stats(LogpModel(net)(batch), batch).logps * weights).sum().backward()
    assert calls == [2 if i in recomputed else 1 for i in range(5)]
    for (name, p), q in zip(plain.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_chunked_logps_backward_holds_no_vocab_sized_product_besides_the_fp32_gradient():
    """In bf16, the output weight's gradient is one fp32 [vocab, d] accumulator (4 bytes an
    entry) and, at the end, its bf16 copy (2): each chunk's product goes into it in place, not
    through a bf16 product and its fp32 copy (6 more). Counted from the CPU allocator."""
    vocab, d, n = 8192, 512, 64
    torch.manual_seed(0)
    hidden = torch.randn(n, d, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, d) * 0.05).to(torch.bfloat16).requires_grad_()
    logps = chunked_token_logps(hidden, weight, torch.randint(0, vocab, (n,)), chunk_tokens=32)
    memory = PhaseMemory("tensors")
    logps.sum().backward()
    peak = memory.stop()["setup"] * 2**20
    entries = vocab * d
    chunk = 32 * vocab * (2 + 4 + 4 + 2)  # logits, the CPU's fp32 copy, softmax, its cast
    assert 6 * entries <= peak <= 6 * entries + chunk + 2 * n * d + 2**16
