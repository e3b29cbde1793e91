"""One profiled DPO step of preftune: device kernel time against wall time.

    python benchmarks/profile_step.py --cases smollm2-long --device cuda --dtype bfloat16
    python benchmarks/profile_step.py --cases tiny-short --steps 4      # CPU dry run

Trains ``--steps`` steps (compilation and caches warm up), then profiles the next one with
torch.profiler and prints: the step's wall seconds, the summed time of the kernels it ran on
the device (on CUDA; the operator time on CPU), their ratio (how busy the device was), the
number of kernel launches, and device-to-host copies and synchronizations (each a wait of the
host for the device). Appends the table to ``--results`` when given, with ``--top N`` the N
operators that took the most host time (and device time on CUDA).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, prepare_case  # noqa: E402

RUN_SIZE = {"default": (8, 8), "tiny": (8, 8), "llama1b": (6, 8)}


def profile_case(name: str, args, root: Path) -> dict:
    import torch
    from accelerate import Accelerator
    from torch.profiler import ProfilerActivity, profile

    from preftune.config import build_config
    from preftune.train import loop
    from preftune.train.trainer import Trainer

    case = prepare_case(name, root, RUN_SIZE, args.steps + 1, args.batch_size, 42,
                        args.default_model)
    config = build_config({
        "output_dir": str(root / f"{name}-{args.tool}"),
        "model": {"path": case["model_dir"], "dtype": args.dtype},
        "data": {"train": case["data_path"], "format": "conversational",
                 "max_length": case["max_length"], "max_prompt_length": case["max_prompt_length"]},
        "reference": {"cache_dir": str(root / "reference-cache")},
        "train": {"learning_rate": 1e-6, "batch_size": case["batch_size"],
                  "max_steps": case["steps"], "warmup_ratio": 0.0, "seed": 42,
                  "compile": args.tool in ("compile", "gc-compile"),
                  "gradient_checkpointing": args.tool in ("gc", "gc-compile"),
                  "layout": "padded" if args.tool == "padded" else "auto"},
    })
    accelerator = Accelerator(cpu=args.device == "cpu")
    task, steps = loop.policy_task(config, accelerator)
    trainer = Trainer(task, config.train, Path(config.output_dir), accelerator, steps,
                      show_progress=False)
    for step in range(steps - 1):
        trainer.step(step)
    cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        trainer.step(steps - 1)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    events = prof.key_averages()
    if cuda:
        kernel_us = sum(e.self_device_time_total for e in events
                        if e.device_type == torch.autograd.DeviceType.CUDA)
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel",
                                                              "cuLaunchKernel",
                                                              "cudaLaunchKernelExC"))
        waits = sum(e.count for e in events if e.key in ("cudaStreamSynchronize",
                                                          "cudaDeviceSynchronize",
                                                          "cudaEventSynchronize"))
        copies = sum(e.count for e in events if "DtoH" in e.key or "Device -> Pageable" in e.key
                     or "Device -> Pinned" in e.key)
    else:
        kernel_us = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::"))
        launches = sum(e.count for e in events if e.key.startswith("aten::"))
        waits = copies = 0
    top = "\n\n".join(
        f"Top {args.top} by {label}:\n\n```\n{events.table(sort_by=key, row_limit=args.top)}\n```"
        for label, key in (("host time", "self_cpu_time_total"),
                           *((("device time", "self_device_time_total"),) if cuda else ())))
    return {"case": name, "tool": args.tool, "layout": trainer.task.layout, "wall_s": wall,
            "kernel_s": kernel_us / 1e6, "busy": kernel_us / 1e6 / wall, "launches": launches,
            "syncs": waits, "dtoh_copies": copies, "top": top if args.top else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="smollm2-long", help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--tool", choices=("auto", "padded", "compile", "gc", "gc-compile"),
                        default="auto", help="gc: train.gradient_checkpointing")
    parser.add_argument("--steps", type=int, default=3, help="warm-up steps before the profiled one")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--default-model", default=None)
    parser.add_argument("--results", default=None, help="append the table to this .md file")
    parser.add_argument("--top", type=int, default=0,
                        help="also append the N operators with the most host (and device) time")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            rows.append(profile_case(name, args, Path(tmp)))
    kernel = "device kernel s" if args.device == "cuda" else "operator s (CPU)"
    lines = [f"| case | tool | layout | step wall s | {kernel} | busy | launches | syncs | "
             "DtoH copies |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['tool']} | {r['layout']} | {r['wall_s']:.4f} | "
              f"{r['kernel_s']:.4f} | {r['busy']:.0%} | {r['launches']} | {r['syncs']} | "
              f"{r['dtoh_copies']} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.results:
        with open(args.results, "a") as handle:
            handle.write(f"\n`{' '.join(sys.argv)}`\n\n{table}\n")
            handle.writelines(f"\n{r['top']}\n" for r in rows if r["top"])


if __name__ == "__main__":
    main()
