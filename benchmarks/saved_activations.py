"""Bytes a forward keeps for backward, per token: transformers' layers against preftune's lean
RMSNorm and SiLU-gated MLP. A GPU keeps the same tensors but for the attention kernel's own
statistics, so a CPU run predicts the activation part of GPU memory.

    python benchmarks/saved_activations.py --model-dir DIR --rows 2 --width 436

DIR is any model folder with a ``config.json`` (only the config is read: the model gets random
weights, in --dtype). Tensors kept by autograd are counted once per storage, parameters left
out.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from preftune.model.lean import kept_for_backward, use_lean_layers


def kept_bytes(model, ids: torch.Tensor) -> int:
    return kept_for_backward(lambda: model.model(input_ids=ids), leave_out=model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True, help="a folder with config.json")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--width", type=int, default=436)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args()
    config = AutoConfig.from_pretrained(args.model_dir)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config).to(getattr(torch, args.dtype)).train()
    lean = copy.deepcopy(plain)
    switched = use_lean_layers(lean)
    ids = torch.randint(0, config.vocab_size, (args.rows, args.width))
    tokens = ids.numel()
    print(f"{args.model_dir}, {args.dtype}, {args.rows} rows x {args.width} tokens; switched: "
          + ", ".join(f"{count} {kind}" for kind, count in switched.items()))
    sizes = {name: kept_bytes(model, ids) for name, model in
             (("transformers' layers", plain), ("lean layers", lean))}
    for name, size in sizes.items():
        print(f"| {name} | {size / 2**20:.1f} MiB | {size / tokens / 1024:.1f} KiB per token |")
    plain_size, lean_size = sizes.values()
    print(f"lean / plain: {lean_size / plain_size:.3f}")


if __name__ == "__main__":
    main()
