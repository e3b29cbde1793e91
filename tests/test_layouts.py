"""Prefix-shared and packed layouts give the same stats and gradients as the padded path."""

import pytest
import torch

from preftune.data.layout import LAYOUTS, collate
from preftune.data.tokenize import TokenizedExample
from preftune.model.forward import LogpModel, sequence_stats
from tiny_models import tiny_llama


def examples(responses_per_example: int):
    """Prompts of different lengths; responses of different lengths, including length 1."""
    generator = torch.Generator().manual_seed(responses_per_example)

    def ids(n):
        return torch.randint(3, 100, (n,), generator=generator).tolist()

    prompt_lengths = [3, 11, 1, 7]
    return [
        TokenizedExample(
            prompt_ids=ids(p),
            response_ids=[ids(1 + (3 * e + 2 * r) % 6) + [2] for r in range(responses_per_example)],
            index=10 + e,
        )
        for e, p in enumerate(prompt_lengths)
    ]


WEIGHTS = torch.tensor([0.7, -1.3, 2.0, 0.4, -0.5, 1.1, 0.9, -2.2, 1.7, 0.3, -0.8, 1.4])


def run(layout: str, batch_examples, max_row_tokens=None):
    model = tiny_llama(seed=1)
    batch = collate(batch_examples, pad_token_id=0, layout=layout, max_row_tokens=max_row_tokens)
    token_logps, collisions = LogpModel(model, chunk_tokens=5)(batch, collisions=True)
    stats = sequence_stats(token_logps, batch, per_token=True, token_collisions=collisions)
    weights = WEIGHTS[: stats.logps.numel()].view_as(stats.logps)
    (stats.logps * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return stats, grads, batch


@pytest.mark.parametrize("responses_per_example", [1, 2, 3])  # unpaired, pairs, ranked lists
@pytest.mark.parametrize("layout", [l for l in LAYOUTS if l != "padded"])
def test_layout_matches_padded_stats_and_gradients(layout, responses_per_example):
    batch_examples = examples(responses_per_example)
    plain, plain_grads, _ = run("padded", batch_examples)
    fast, fast_grads, batch = run(layout, batch_examples, max_row_tokens=40)
    torch.testing.assert_close(fast.logps, plain.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.token_counts, plain.token_counts)
    torch.testing.assert_close(fast.token_logps, plain.token_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.token_log_sum_sq_probs, plain.token_log_sum_sq_probs,
                               atol=1e-5, rtol=1e-5)  # (WPO's alignment term)
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)
    if layout.startswith("packed"):
        assert batch.input_ids.shape[0] < len(batch_examples) * (
            1 if "prefix" in layout else responses_per_example)


def test_prefix_sharing_computes_each_prompt_once():
    batch_examples = examples(2)
    padded = collate(batch_examples, 0, "padded")
    shared = collate(batch_examples, 0, "prefix_shared")
    prompt_tokens = sum(len(ex.prompt_ids) for ex in batch_examples)
    assert padded.real_tokens - shared.real_tokens == prompt_tokens


def test_packing_removes_padding():
    batch_examples = examples(2)
    padded = collate(batch_examples, 0, "padded")
    packed = collate(batch_examples, 0, "packed", max_row_tokens=64)
    assert packed.real_tokens == padded.real_tokens
    assert packed.padding_fraction < padded.padding_fraction



@pytest.mark.parametrize("layout", ["prefix_shared", "packed", "packed_prefix_shared"])
def test_flex_attention_block_mask_equals_the_dense_mask(layout):
    """Batch.block_mask (the block-sparse FlexAttention mask used on CUDA with
    model.attn_implementation: flex_attention) attends exactly where attention_bias does.
    Checked on attention outputs with FlexAttention in eager mode (forward: torch has no
    FlexAttention backward on CPU; on CUDA the gradient is autograd's through the same op)."""
    from torch.nn.attention.flex_attention import flex_attention

    examples = [TokenizedExample([1, 5, 6, 7], [[8, 9, 2], [10, 2]], index=0),
                TokenizedExample([1, 11], [[12, 13, 14, 2], [15, 16, 2]], index=1),
                TokenizedExample([1, 20, 21, 22, 23], [[24, 2], [25, 26, 27, 2]], index=2)]
    batch = collate(examples, 0, layout, max_row_tokens=20)
    rows, width = batch.input_ids.shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(rows, 2, width, 8) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=batch.attention_bias(torch.float32))
    with torch.no_grad():
        sparse = flex_attention(q, k, v, block_mask=batch.block_mask())
    real = batch.attention_mask.bool()[:, None, :, None].expand_as(dense)
    torch.testing.assert_close(sparse[real], dense[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_host_side_counts_match_the_tensors(layout):
    """What collate records on the host (so a step never reads it back) is what the tensors
    say: tokens per response, real tokens, the longest response, the example ids."""
    batch = collate(examples(2), 0, layout, max_row_tokens=40)
    counts = torch.bincount(batch.target_response, minlength=batch.num_responses)
    assert batch.response_lengths.tolist() == counts.tolist() == [2, 4, 5, 7, 2, 4, 5, 7]
    assert batch.real_tokens == int(batch.attention_mask.sum())
    assert batch.longest_response == 7 == int(batch.target_offset.max()) + 1
    assert batch.example_ids == tuple(batch.example_indices.tolist()) == (10, 11, 12, 13)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rounded_row_widths_change_nothing(layout):
    """pad_to_multiple_of (shape buckets for compiled code, FlexAttention blocks) widens rows
    with padding only: same stats and gradients."""
    batch_examples = examples(2)
    plain, plain_grads, _ = run(layout, batch_examples, max_row_tokens=40)
    model = tiny_llama(seed=1)
    batch = collate(batch_examples, 0, layout, max_row_tokens=40, pad_to_multiple_of=32)
    unrounded = collate(batch_examples, 0, layout, max_row_tokens=40).input_ids.shape[1]
    assert batch.input_ids.shape[1] % 32 == 0 and batch.input_ids.shape[1] > unrounded
    stats = sequence_stats(LogpModel(model, chunk_tokens=5)(batch), batch, per_token=True)
    (stats.logps * WEIGHTS[: stats.logps.numel()].view_as(stats.logps)).sum().backward()
    torch.testing.assert_close(stats.logps, plain.logps, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name], atol=1e-5, rtol=1e-4)


def test_padded_rows_match_the_models_own_padding_mask():
    """Padded rows get a [rows, 1, T, T] mask built by preftune (transformers' own path would
    read the 2-D mask back from the device on every forward): the log-probs equal those from
    the model's logits under its plain 2-D padding mask."""
    batch = collate(examples(2), 0, "padded")
    model = tiny_llama(seed=1)
    logps = LogpModel(model, chunk_tokens=5)(batch)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    flat = torch.log_softmax(logits.float(), -1).reshape(-1, logits.shape[-1])
    expected = flat[batch.logit_positions, batch.target_tokens]
    torch.testing.assert_close(logps.detach(), expected, atol=1e-5, rtol=1e-5)
