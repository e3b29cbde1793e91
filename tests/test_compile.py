"""train.compile: compiled decoder layers give the eager numbers (stats, losses, gradients,
trained weights), without graph breaks, and a repeated shape is not compiled again."""

import shutil

import pytest
import torch

from preftune.data.layout import collate
from preftune.data.tokenize import TokenizedExample
from preftune.model.compile import compile_layers
from preftune.model.forward import LogpModel, sequence_stats
from test_train_loop import final_weights, run, workspace  # noqa: F401  (fixture)
from tiny_models import tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore")

EXAMPLES = [TokenizedExample([1, 5, 6, 7, 8], [[8, 9, 2], [10, 2]], index=0),
            TokenizedExample([1, 11], [[12, 13, 14, 2], [15, 16, 17, 18, 2]], index=1),
            TokenizedExample([1, 20, 21], [[22, 2], [23, 24, 2]], index=2)]


def stats_and_grads(model, layout):
    batch = collate(EXAMPLES, 0, layout, max_row_tokens=24, pad_to_multiple_of=16)
    stats = sequence_stats(LogpModel(model, chunk_tokens=4)(batch), batch)
    weights = torch.tensor([[0.7, -1.3], [2.0, 0.4], [-0.5, 1.1]])
    (stats.logps * weights).sum().backward()
    return stats.logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                  if p.grad is not None}


@pytest.mark.parametrize("layout", ["padded", "prefix_shared", "packed_prefix_shared"])
def test_compiled_layers_match_eager(layout):
    """Through dynamo and AOT autograd (the aot_eager backend: the capture and the backward
    graph, without code generation, so it is fast): same log-probs and gradients as eager, one
    graph per shape, no graph break."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_logps, eager_grads = stats_and_grads(tiny_llama(seed=1).train(), layout)
    model = tiny_llama(seed=1).train()
    assert compile_layers(model, backend="aot_eager") == 2
    for _ in range(2):  # the second call reuses the first one's graph
        model.zero_grad()
        logps, grads = stats_and_grads(model, layout)
    torch.testing.assert_close(logps, eager_logps, atol=1e-5, rtol=1e-5)
    for name in eager_grads:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=1e-5, rtol=1e-4)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1  # both layers, both calls: one graph


def test_train_compile_true_trains_like_eager(workspace):  # noqa: F811
    """`train.compile: true` end to end with inductor (C++ code generation on CPU): the same
    per-step losses and final weights as the eager run, rows rounded to 64 tokens."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("inductor on CPU needs a C++ compiler")
    torch._dynamo.reset()
    eager = run(workspace, "eager-64", data__eval_fraction=0.0, train__max_steps=2,
                train__pad_to_multiple_of=64)
    compiled = run(workspace, "compiled", data__eval_fraction=0.0, train__max_steps=2,
                   train__compile=True)
    from preftune.train.logging import read_metrics
    for a, b in zip(read_metrics(eager / "metrics.jsonl"), read_metrics(compiled / "metrics.jsonl")):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["padding_fraction"] == a["padding_fraction"] > 0.5  # widths rounded to 64
    weights_eager, weights_compiled = final_weights(eager), final_weights(compiled)
    for name in weights_eager:
        torch.testing.assert_close(weights_compiled[name], weights_eager[name],
                                   atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_varlen_layers_stop_compiling_once_lengths_vary():
    """varlen on a CPU loops over each batch's own sequences: that loop runs eager, so new
    lengths stop making new graphs once the shapes are dynamic (it compiled every batch
    again), with eager's log-probs."""
    from torch._dynamo.utils import counters

    from preftune.model.varlen import transformers_name

    torch._dynamo.reset()
    counters.clear()
    batches = [[TokenizedExample([1, 30 + k], [[31] * (k + 1) + [2], [32, 2]], index=k)]
               for k in range(7)]
    eager, model = (tiny_llama(seed=1).train() for _ in range(2))
    for each in (eager, model):
        each.set_attn_implementation(transformers_name("varlen"))
    compile_layers(model, backend="aot_eager")
    graphs = []
    for examples in batches:
        batch = collate(examples, 0, "padded", pad_to_multiple_of=16)
        logps = [sequence_stats(LogpModel(m, chunk_tokens=4)(batch), batch).logps
                 for m in (eager, model)]
        torch.testing.assert_close(logps[1], logps[0], atol=1e-5, rtol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[-4]  # the last four batches compiled nothing new


@pytest.mark.parametrize("variant", ["lora", "dora", "gradient_checkpointing"])
def test_compiled_layers_with_lora_or_checkpointing_match_eager(variant):
    """Compiling the layers keeps LoRA's (or DoRA's) injected adapters and activation
    checkpointing: the same log-probs and (adapter) gradients as eager. A checkpointed layer's
    forward is what is compiled, without graph breaks: one graph without gradients (the
    forward) and one with them (its recomputation), shared by both layers."""
    import copy

    from torch._dynamo.utils import counters

    from preftune.config import LoraConfig
    from preftune.model.checkpointing import enable_checkpointing
    from preftune.model.lora import add_lora

    torch._dynamo.reset()
    counters.clear()
    base = tiny_llama(seed=1).train()
    if variant != "gradient_checkpointing":
        base = add_lora(base, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                         dora=variant == "dora"))
    else:
        enable_checkpointing(base)
    eager_logps, eager_grads = stats_and_grads(copy.deepcopy(base), "prefix_shared")
    model = copy.deepcopy(base)
    compile_layers(model, backend="aot_eager")
    logps, grads = stats_and_grads(model, "prefix_shared")
    torch.testing.assert_close(logps, eager_logps, atol=1e-5, rtol=1e-5)
    assert grads.keys() == eager_grads.keys() and len(grads) > 0
    for name in eager_grads:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=1e-5, rtol=1e-4)
    if variant == "gradient_checkpointing":
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == 2
