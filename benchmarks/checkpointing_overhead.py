"""Host time of activation checkpointing: one forward and backward of a model as deep as
SmolLM2-135M (30 layers) but so thin (hidden 32) that its arithmetic is negligible, so the
step time is what the host spends per layer, as in a small model's step on a GPU.

    python benchmarks/checkpointing_overhead.py --results FILE.md

Variants, side by side in one run: plain (no checkpointing), torch's non-reentrant checkpoint
(what transformers' gradient_checkpointing_enable installs), preftune's ``recompute``
(``train.gradient_checkpointing``), and the same three with each layer compiled
(``train.compile``; --compile, needs a C++ compiler on CPU). One extra forward is the least a
checkpointed step can cost; the table shows the forward's time too. Every variant gives the
same gradients (tests/test_checkpointing.py); this only times them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

from preftune.data.layout import collate
from preftune.data.tokenize import TokenizedExample
from preftune.model.checkpointing import enable_checkpointing, torch_checkpoint
from preftune.model.compile import compile_layers
from preftune.model.forward import LogpModel, sequence_stats
from preftune.model.lean import use_lean_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, source_state  # noqa: E402


def thin_model(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         tie_word_embeddings=True, pad_token_id=0)
    model = LlamaForCausalLM(config).train()
    use_lean_layers(model)
    return model


def batch():
    """Four prompts of 24 tokens with two responses of 8 each, prefix-shared."""
    examples = [TokenizedExample(list(range(3, 27)), [list(range(30, 38)), list(range(40, 48))],
                                 index=i) for i in range(4)]
    return collate(examples, pad_token_id=0, layout="prefix_shared")


def variant(base, name: str, compiled: bool):
    model = copy.deepcopy(base)
    if name != "plain":
        enable_checkpointing(model)
    if name == "torch checkpoint":
        for layer in model.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                layer._gradient_checkpointing_func = torch_checkpoint
    if compiled:
        compile_layers(model)
    return model


def step_ms(model, rows, steps: int, backward: bool = True) -> float:
    logp_model = LogpModel(model, chunk_tokens=64)
    times = []
    for index in range(steps + 5):  # 5 warm-up steps (and compilation)
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            logps = sequence_stats(logp_model(rows), rows).logps
            if backward:
                logps.sum().backward()
        if rows.input_ids.is_cuda:
            torch.cuda.synchronize()
        if index >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all variants")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also the compiled layers")
    parser.add_argument("--results", help="write the table to this markdown file")
    args = parser.parse_args()
    args.threads = 1
    torch.set_num_threads(1)
    base = thin_model(args.layers).to(args.device)
    rows = batch().to(args.device)
    lines = [f"{args.layers} layers, hidden 32, {rows.input_ids.numel()} row tokens "
             f"(prefix-shared); the median of {args.repeats} alternating rounds, each the "
             f"median of {args.steps} steps after 5 warm-up steps; device {args.device}.", "",
             f"Machine: {machine_description(args)[0]}.", "",
             f"preftune source: {source_state()}.", "",
             "| variant | compiled | ms per step | x plain |", "|---|---|---:|---:|"]
    runs = {}  # (name, compiled) -> model; the variants alternate within each repeat
    for compiled in (False, True) if args.compile else (False,):
        for name in ("plain", "torch checkpoint", "preftune recompute"):
            runs[name, compiled] = variant(base, name, compiled)
        runs["forward alone, no gradients", compiled] = runs["plain", compiled]
    times = {key: [] for key in runs}
    for _ in range(args.repeats):
        for (name, compiled), model in runs.items():
            times[name, compiled].append(step_ms(model, rows, args.steps,
                                                 backward=not name.startswith("forward")))
    for (name, compiled), values in times.items():
        ms, plain = statistics.median(values), statistics.median(times["plain", compiled])
        lines.append(f"| {name} | {'yes' if compiled else 'no'} | {ms:.1f} | "
                     f"{ms / plain:.2f} |")
    print("\n".join(lines))
    if args.results:
        with open(args.results, "w") as out:
            out.write(f"# Host time of activation checkpointing\n\nCommand: `python "
                      f"benchmarks/checkpointing_overhead.py{' --compile' if args.compile else ''}"
                      f" --device {args.device}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
