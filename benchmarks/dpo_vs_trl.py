"""Speed and memory of DPO training: preftune against TRL's DPOTrainer on identical inputs.

    pip install -e ".[bench]"                       # trl==1.16.0
    python benchmarks/dpo_vs_trl.py --threads 1     # all cases, CPU, fp32 (~25 min on 2 cores)
    python benchmarks/dpo_vs_trl.py --cases tiny-long,tiny-short --repeats 3
    python benchmarks/dpo_vs_trl.py --device cuda --dtype bfloat16 --repeats 3
    python benchmarks/dpo_vs_trl.py --device cuda --dtype bfloat16 --repeats 2 --once trl
    python benchmarks/dpo_vs_trl.py --tensor-memory --dtype bfloat16 --cases smollm2-long

Every run is its own subprocess (clean peak memory) and the tools alternate inside each repeat
(trl, preftune, trl-precompute, preftune-padded, trl-precompute-nogc), so slow drift of the
machine hits all of them alike. All get the same model directory, the same JSONL records in the
same step order (TRL reads them through datasets.Dataset.from_list with a sequential sampler),
batch size, max_length, step count, lr, beta=0.1, sigmoid loss, seed and dtype; none evaluates,
saves checkpoints or logs more than once. TRL's own default gradient_checkpointing=True is kept
for "trl" and "trl-precompute"; "trl-precompute-nogc" turns it off (preftune's default keeps
activations too; "preftune-gc" checkpoints them), so "x fastest TRL" compares against TRL's
best setting on that case.

On a busy CPU, pass --threads 1: with OMP threads competing against other processes a step can
be 10x slower and timings become meaningless.

Definitions (identical for every tool):

- trained tokens: real (non-padding) tokens of prompt+chosen and prompt+rejected of the pairs of
  steps 2..N, counted once from preftune's tokenization of the data (TRL's own tokenization is
  reported beside it: it keeps the template's newline after <|im_end|>, one token per response).
- tokens/s: trained tokens / wall seconds from the end of step 1 (warmup) to the end of step N.
  Model loading, data preparation and the reference pass are outside this window.
- ref s: the reference pass before training (preftune precomputed, TRL precompute_ref_log_probs,
  including each tool's model hashing for its cache key); "in steps" where the reference runs
  inside every step (TRL default: a second model in memory).
- e2e s: wall seconds from the start of the child process (imports included) to the end of the
  last step; the final model save is skipped for both.
- peak MB: peak RSS of the child process (os.wait4) on CPU; torch.cuda.max_memory_allocated on
  CUDA (the whole child: model load, reference pass, steps). "base MB" is the RSS after imports,
  before the model is loaded; "RSS in ref / train" are the largest RSS samples (every 20 ms)
  during the reference pass and during training; on CUDA, "CUDA in ref / train" are the peak
  allocated CUDA memory of those phases. With --tensor-memory on CPU, "peak tensor MB" and
  "tensor in ref / train" count the bytes of live tensors as CUDA's column does (recorded by
  torch.profiler, which slows the steps: that run's tokens/s are no speed figure).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

T_PROCESS_START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES  # noqa: E402
from common import (PhaseMemory, make_parser, median, memory_kind,  # noqa: E402
                    memory_label, rss_mb, run_benchmark, run_child, split_names, trl_step_clock)

# trl: TRL defaults (reference = second model in memory, gradient checkpointing on);
# trl-precompute: precompute_ref_log_probs=True; trl-precompute-nogc: that and
# gradient_checkpointing=False (TRL's fastest setting); preftune: reference precomputed, layout
# auto; preftune-padded: the same with layout padded (no prefix sharing); preftune-gc: preftune
# with train.gradient_checkpointing (opt-in there, on by default in TRL); preftune-gc2: the same
# with train.checkpoint_every 2 (every other layer keeps its activations); preftune-hflayers:
# preftune with train.lean_activations false (transformers' RMSNorm and MLP); preftune-lean:
# gc plus train.optimizer_in_backward (each weight's AdamW update runs as its gradient
# completes, so no full set of gradients is held; this mode cannot clip by the global norm, so
# it runs without max_grad_norm while every other tool clips at 1.0).
# trl-mmap: TRL defaults with glibc's mmap threshold fixed through MALLOC_MMAP_THRESHOLD_, the
# allocator setting preftune applies to itself on CPU (train/memory.py), so peak memory can be
# compared without it. preftune-flex (CUDA only): preftune with model.attn_implementation
# flex_attention, so prefix-shared and packed rows run block-sparse instead of with a dense mask.
# preftune-compile: preftune with train.compile (each decoder layer compiled, row widths rounded
# to 64 tokens); its first steps include the compilation, so give it enough --steps.
# preftune-gc-compile: both (each checkpointed layer's forward compiled, run without gradients
# in forward and with them in backward).
# preftune-varlen (CUDA only): model.attn_implementation varlen, so rows are packed and run with
# torch's variable-length attention and no mask (no prefix sharing).
# Adapters (run only when named in --tools): preftune-lora and trl-lora train LoRA (r 16,
# alpha 32, every linear layer, no dropout) on the model as it is; preftune-qlora and
# trl-qlora do the same on a base held in 4 bits (NF4, double quantization, computing in
# --dtype). The TRL ones keep TRL's defaults otherwise (gradient checkpointing, and with an
# adapter the reference is the model with it disabled, inside each step); preftune's reference
# is precomputed as in every preftune tool. Each is compared with the TRL tool of its kind.
# preftune-8bit and trl-8bit (by name only, too): full fine-tuning with AdamW's moments in 8
# bits (train.optimizer adamw_8bit; TRL's optim adamw_bnb_8bit), compared with each other.
TOOLS = ("trl", "preftune", "trl-precompute", "preftune-padded", "trl-precompute-nogc",
         "preftune-gc", "preftune-gc2", "preftune-hflayers", "preftune-lean", "trl-mmap",
         "preftune-flex", "preftune-compile", "preftune-gc-compile", "preftune-varlen",
         "trl-lora", "preftune-lora", "trl-qlora", "preftune-qlora", "trl-8bit", "preftune-8bit")
CUDA_ONLY = ("preftune-flex", "preftune-varlen")
BY_NAME_ONLY = ("trl-lora", "preftune-lora", "trl-qlora", "preftune-qlora", "trl-8bit",
                "preftune-8bit")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def kind(tool: str) -> str:
    """Which TRL tools a tool is compared with: full fine-tuning, LoRA, QLoRA or 8-bit AdamW."""
    return next((k for k in ("qlora", "lora", "8bit") if tool.endswith(f"-{k}")), "full")

# (steps, batch size) per model on each device; --steps/--batch-size override
RUN_SIZE = {
    "cpu": {"default": (3, 2), "tiny": (6, 4), "llama1b": (2, 1)},
    "cuda": {"default": (20, 8), "tiny": (40, 8), "llama1b": (12, 8)},
}


# ---------------------------------------------------------------------------------------------
# children: one training run each; they write a JSON result file


def child_preftune(case: dict, tool: str, args, workdir: Path) -> dict:
    import torch

    import preftune.train.loop as loop
    from preftune.config import build_config
    from preftune.train.logging import MetricsLog

    base_mb = rss_mb()
    memory = PhaseMemory(memory_kind(args))
    step_ends: list[float] = []
    reference_seconds = [0.0]
    write = MetricsLog.write

    def timed_write(self, record):  # called once per step (log_every=1), after the step
        if args.device == "cuda":
            torch.cuda.synchronize()
        step_ends.append(time.perf_counter())
        write(self, record)

    build_reference = loop.build_reference

    def timed_reference(*a, **k):
        memory.enter("reference")
        started = time.perf_counter()
        result = build_reference(*a, **k)
        reference_seconds[0] += time.perf_counter() - started
        memory.enter("train")  # from here on: LoRA/optimizer setup and the steps
        return result

    MetricsLog.write = timed_write  # the shared Trainer logs through it
    loop.build_reference = timed_reference
    loop.save_final_model = lambda *a, **k: None  # not part of the benchmark (TRL saves nothing)
    layout = "padded" if tool == "preftune-padded" else "auto"
    config = build_config({
        "output_dir": str(workdir / "out"),
        "model": {"path": case["model_dir"], "dtype": args.dtype,
                  "attn_implementation": {"preftune-flex": "flex_attention",
                                          "preftune-varlen": "varlen"}.get(tool),
                  "lora": LORA if kind(tool) in ("lora", "qlora") else None,
                  "quantize": "nf4" if kind(tool) == "qlora" else None},
        "data": {"train": case["data_path"], "format": "conversational",
                 "max_length": case["max_length"], "max_prompt_length": case["max_prompt_length"]},
        "objective": {"name": "dpo", "beta": 0.1},
        "reference": {"strategy": "precomputed", "cache_dir": str(workdir / "reference-cache")},
        "train": {"learning_rate": 1e-6, "batch_size": case["batch_size"],
                  "gradient_accumulation_steps": 1, "max_steps": case["steps"],
                  "warmup_ratio": 0.0, "schedule": "linear",
                  "max_grad_norm": None if tool == "preftune-lean" else 1.0,
                  "seed": case["seed"], "log_every": 1, "layout": layout,
                  "gradient_checkpointing": tool in ("preftune-gc", "preftune-gc2",
                                                     "preftune-lean", "preftune-gc-compile"),
                  "checkpoint_every": 2 if tool == "preftune-gc2" else 1,
                  "lean_activations": tool != "preftune-hflayers",
                  "compile": tool in ("preftune-compile", "preftune-gc-compile"),
                  "optimizer": "adamw_8bit" if kind(tool) == "8bit" else "adamw",
                  "optimizer_in_backward": tool == "preftune-lean"},
    })
    loop.train(config, show_progress=False)
    phase_peaks = memory.stop()
    run = json.loads((workdir / "out" / "run.json").read_text())
    metrics = [json.loads(line) for line in (workdir / "out" / "metrics.jsonl").read_text().splitlines()]
    return {"step_ends": step_ends, "reference_seconds": reference_seconds[0], "base_mb": base_mb,
            "phase_peaks": phase_peaks, "layout": run["layout"], "losses": [m["loss"] for m in metrics],
            "step_seconds": [m["step_seconds"] for m in metrics]}


def child_trl(case: dict, tool: str, args, workdir: Path) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import trl.trainer.dpo_trainer as dpo_module
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    base_mb = rss_mb()
    memory = PhaseMemory(memory_kind(args))
    precompute = tool.startswith("trl-precompute")
    checkpointing = not tool.endswith("-nogc")  # TRL's default is gradient_checkpointing=True
    reference_seconds = [0.0]

    def timed(function):
        def wrapper(*a, **k):
            previous = memory.phase
            memory.enter("reference")
            started = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                reference_seconds[0] += time.perf_counter() - started
                memory.enter(previous)
        return wrapper

    if precompute:  # the reference pass and the model hash that keys its cache
        DPOTrainer._precompute_ref_logps = timed(DPOTrainer._precompute_ref_logps)
        dpo_module.hash_module = timed(dpo_module.hash_module)

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(case["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapter, quantized = {}, {}
    if kind(tool) in ("lora", "qlora"):
        from peft import LoraConfig
        adapter = {"peft_config": LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"], task_type="CAUSAL_LM")}
    if kind(tool) == "qlora":
        from transformers import BitsAndBytesConfig
        quantized = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype),
            "device_map": {"": "cuda:0" if args.device == "cuda" else "cpu"}}
    model = AutoModelForCausalLM.from_pretrained(case["model_dir"], dtype=dtype, **quantized)
    records = [json.loads(line) for line in Path(case["data_path"]).read_text().splitlines()]
    # the same records in preftune's step order; the sampler below keeps that order
    dataset = Dataset.from_list([records[i] for i in case["order"]])
    config = DPOConfig(
        output_dir=str(workdir / "out"), per_device_train_batch_size=case["batch_size"],
        gradient_accumulation_steps=1, max_steps=case["steps"], learning_rate=1e-6,
        lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, beta=0.1,
        loss_type=["sigmoid"], max_length=case["max_length"], truncation_mode="keep_start",
        precompute_ref_log_probs=precompute, gradient_checkpointing=checkpointing,
        train_sampling_strategy="sequential",
        save_strategy="no", eval_strategy="no", logging_steps=case["steps"], report_to=[],
        seed=case["seed"], data_seed=case["seed"], dataloader_num_workers=0,
        use_cpu=args.device == "cpu", bf16=False, fp16=False, disable_tqdm=True,
        **({"optim": "adamw_bnb_8bit"} if kind(tool) == "8bit" else {}),  # else TRL's default
    )
    clock = trl_step_clock(memory, cuda=args.device == "cuda")
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[clock], **adapter)
    rows = trainer.train_dataset
    lengths = [2 * len(p) + len(c) + len(r)
               for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"])]
    longest = max(len(p) + max(len(c), len(r))
                  for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]))
    if len(rows) != len(case["order"]) or longest > case["max_length"]:
        raise SystemExit(f"TRL dropped or truncated data: {len(rows)} rows, longest {longest}")
    trainer.train()
    phase_peaks = memory.stop()
    return {"step_ends": clock.step_ends, "reference_seconds": reference_seconds[0],
            "base_mb": base_mb, "phase_peaks": phase_peaks, "losses": clock.losses, "layout": "padded",
            "trl_timed_tokens": sum(lengths[case["batch_size"]:])}


# ---------------------------------------------------------------------------------------------
# parent: alternate the tools, collect, report


def summarize(case: dict, runs: dict, args) -> str:
    mem_label = f"peak {memory_label(args)} MB"
    for results in runs.values():
        for r in results:
            r["train_mb"] = r["phase_peaks"].get("train")
            r["reference_mb"] = r["phase_peaks"].get("reference")
    rows = {tool: {key: median([r[key] for r in results]) for key in
                   ("tokens_per_second", "peak_mb", "base_mb", "reference_seconds", "e2e_seconds",
                    "timed_seconds", "train_mb", "reference_mb")}
            | {"layout": results[0]["layout"]}
            for tool, results in runs.items()}
    def fastest_trl(tool):
        return max((t for t in rows if t.startswith("trl") and kind(t) == kind(tool)),
                   key=lambda t: rows[t]["tokens_per_second"], default=None)

    def base(tool):
        return rows.get("trl" if kind(tool) == "full" else f"trl-{kind(tool)}")
    lines = [
        f"### {case['name']}",
        "",
        f"model `{Path(case['model_dir']).name}`, {case['data_summary']}; {case['steps']} steps x "
        f"batch {case['batch_size']} pairs, max_length {case['max_length']}; timed: steps "
        f"2..{case['steps']} = {case['timed_tokens']} trained tokens.",
        "",
        f"| tool | layout | tokens/s | x TRL | x fastest TRL | {mem_label} | x TRL | base MB "
        f"| {memory_label(args)} in ref / train MB | ref s | steps s | e2e s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tool, row in rows.items():
        trl, best = base(tool), fastest_trl(tool)
        speed = f"{row['tokens_per_second'] / trl['tokens_per_second']:.2f}" if trl else "-"
        memory = f"{row['peak_mb'] / trl['peak_mb']:.2f}" if trl else "-"
        fastest = (f"{row['tokens_per_second'] / rows[best]['tokens_per_second']:.2f}"
                   if best else "-")
        reference = ("in steps" if tool in ("trl", "trl-lora", "trl-qlora", "trl-8bit")
                     else f"{row['reference_seconds']:.1f}")
        phases = " / ".join("-" if v is None else f"{v:.0f}"
                            for v in (row["reference_mb"], row["train_mb"]))
        lines.append(
            f"| {tool} | {row['layout']} | {row['tokens_per_second']:.1f} | {speed} | {fastest} | "
            f"{row['peak_mb']:.0f} | {memory} | {row['base_mb']:.0f} | {phases} | {reference} | "
            f"{row['timed_seconds']:.1f} | {row['e2e_seconds']:.1f} |")
    trl_tokens = next((r[0].get("trl_timed_tokens") for t, r in runs.items() if t.startswith("trl")), None)
    fastest = sorted({fastest_trl(tool) for tool in rows} - {None})
    if fastest:
        lines += ["", f"Fastest TRL setting here, of each kind: {', '.join(fastest)}."]
    if trl_tokens:
        lines += ["", f"TRL's own tokenization of the same timed pairs: {trl_tokens} tokens "
                      f"({trl_tokens / case['timed_tokens'] - 1:+.1%}); tokens/s above use "
                      f"{case['timed_tokens']} for every tool."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = make_parser(__doc__.split("\n")[0],
                         f"comma list of {', '.join(TOOLS)} (default: all but the LoRA "
                         "and QLoRA ones; preftune-flex and -varlen on CUDA only)")
    args = parser.parse_args(argv)
    if args.child:
        run_child(args, lambda tool: child_trl if tool.startswith("trl") else child_preftune,
                  T_PROCESS_START)
        return

    cases = split_names(parser, args.cases, CASES, "case")
    tools = (split_names(parser, args.tools, TOOLS, "tool") if args.tools else
             [t for t in TOOLS if (args.device == "cuda" or t not in CUDA_ONLY)
              and t not in BY_NAME_ONLY])
    if "preftune-flex" in tools and args.device != "cuda":
        parser.error("preftune-flex needs --device cuda (torch has no FlexAttention backward on CPU)")
    run_benchmark(
        args, argv, script=__file__, title="preftune vs TRL DPO", cases=cases, tools=tools,
        run_size=RUN_SIZE, summarize=summarize,
        progress_line=lambda r: (
            f"{r['tokens_per_second']:8.1f} tok/s  peak {r['peak_mb']:7.0f} MB  ref "
            f"{r['reference_seconds']:5.1f} s  e2e {r['e2e_seconds']:6.1f} s  layout {r['layout']}"),
        extra_env=lambda tool: {"MALLOC_MMAP_THRESHOLD_": "131072"} if tool == "trl-mmap" else {})


if __name__ == "__main__":
    main()
