"""``model.attn_implementation: varlen``: padded and packed rows with their sequence
boundaries and no mask give the padded path's stats and gradients, and train alike."""

import json

import pytest
import torch
from test_layouts import WEIGHTS, examples
from test_train_loop import assert_same_weights, losses, run, workspace  # noqa: F401

from preftune.config import ConfigError, build_config
from preftune.data.layout import collate
from preftune.model import varlen
from preftune.model.forward import LogpModel, sequence_stats
from tiny_models import tiny_llama


def stats_and_grads(layout: str, attention: str, batch_examples, max_row_tokens=None):
    model = tiny_llama(seed=1)
    model.config._attn_implementation = varlen.register() if attention == "varlen" else attention
    batch = collate(batch_examples, pad_token_id=0, layout=layout, max_row_tokens=max_row_tokens)
    stats = sequence_stats(LogpModel(model, chunk_tokens=5)(batch), batch, per_token=True)
    (stats.logps * WEIGHTS[: stats.logps.numel()].view_as(stats.logps)).sum().backward()
    return stats, {name: p.grad.clone() for name, p in model.named_parameters()}, batch


def test_sequence_boundaries_are_each_unit_and_each_stretch_of_padding():
    batch_examples = examples(2)  # responses of lengths 2..7 after prompts of 3, 11, 1, 7
    padded = collate(batch_examples, pad_token_id=0, layout="padded")
    width = padded.input_ids.shape[1]
    lengths = padded.attention_mask.sum(1).tolist()
    expected = [n for length in lengths for n in (length, width - length) if n]
    assert torch.diff(padded.cu_seqlens()).tolist() == expected
    assert padded.max_seqlen == max(expected)
    packed = collate(batch_examples, pad_token_id=0, layout="packed", max_row_tokens=40)
    units = [[int(u) for u in row if u >= 0] for row in packed.unit_ids]
    expected = []
    for row, row_units in zip(packed.unit_ids.tolist(), units):
        expected += [row_units.count(u) for u in sorted(set(row_units))]
        if row.count(-1):
            expected.append(row.count(-1))
    assert torch.diff(packed.cu_seqlens()).tolist() == expected
    assert packed.cu_seqlens().dtype == torch.int32
    assert int(packed.cu_seqlens()[-1]) == packed.input_ids.numel()
    assert collate(batch_examples, pad_token_id=0, layout="prefix_shared").cu_seqlens() is None


@pytest.mark.parametrize("responses_per_example", [1, 2, 3])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_varlen_matches_the_padded_sdpa_path(layout, responses_per_example):
    batch_examples = examples(responses_per_example)
    plain, plain_grads, _ = stats_and_grads("padded", "sdpa", batch_examples)
    fast, fast_grads, batch = stats_and_grads(layout, "varlen", batch_examples, 40)
    torch.testing.assert_close(fast.logps, plain.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.token_logps, plain.token_logps, atol=1e-5, rtol=1e-5)
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)


def test_the_attention_function_hands_each_sequence_to_the_kernel(monkeypatch):
    """The kernel sees the flattened rows and the boundaries; masks play no part."""
    seen, one_by_one = [], varlen.sequences_one_by_one

    def kernel(query, key, value, cu_seqlens, max_seqlen, scale):
        seen.append((query.shape, key.shape, cu_seqlens.tolist(), max_seqlen))
        return one_by_one(query, key, value, cu_seqlens, max_seqlen, scale)

    monkeypatch.setattr(varlen, "sequences_one_by_one", kernel)
    _, _, batch = stats_and_grads("packed", "varlen", examples(2), 40)
    rows, width = batch.input_ids.shape
    # tiny_llama: 4 heads, 2 kv heads, 8 dims each; one call per layer (2 layers)
    assert seen == [((rows * width, 4, 8), (rows * width, 2, 8), batch.cu_seqlens().tolist(),
                     batch.max_seqlen)] * 2


def test_varlen_training_equals_sdpa_training(workspace):  # noqa: F811
    plain = run(workspace, "sdpa-padded", train__layout="padded", train__max_steps=3)
    fast = run(workspace, "varlen-auto", model__attn_implementation="varlen", train__max_steps=3)
    assert json.loads((fast / "run.json").read_text())["layout"] == "packed"  # auto packs
    assert losses(fast) == pytest.approx(losses(plain), rel=1e-5)
    assert_same_weights(fast, plain, atol=1e-5)


def test_varlen_refuses_prefix_shared_layouts(workspace):  # noqa: F811
    tree = {"model": {"path": str(workspace / "model"), "attn_implementation": "varlen"},
            "data": {"train": str(workspace / "pairs.jsonl")},
            "train": {"layout": "packed_prefix_shared"}}
    with pytest.raises(ConfigError, match="'varlen' runs padded and packed rows"):
        build_config(tree)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_varlen_in_float32_on_cuda_is_refused_before_any_work(workspace, dtype):  # noqa: F811
    """FlashAttention's variable-length kernel takes bf16 and fp16: a float32 model with varlen
    attention on CUDA is stopped with what to change, the same run on CPU (one sequence at a
    time through SDPA) or in bf16 is not."""
    from preftune.model.verify import check_attention_device

    config = build_config({"model": {"path": str(workspace / "model"), "dtype": dtype,
                                     "attn_implementation": "varlen"},
                           "data": {"train": str(workspace / "pairs.jsonl")}})
    check_attention_device(config.model, torch.device("cpu"))
    if dtype == "bfloat16":
        check_attention_device(config.model, torch.device("cuda"))
        return
    with pytest.raises(ConfigError, match="set model.dtype: bfloat16, or use 'flex_attention' "
                                          "or 'sdpa' for float32"):
        check_attention_device(config.model, torch.device("cuda"))
