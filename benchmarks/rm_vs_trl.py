"""Speed and memory of reward-model training: preftune against TRL's RewardTrainer on identical inputs.

    pip install -e ".[bench]"                       # trl==1.16.0
    python benchmarks/rm_vs_trl.py --threads 1      # all cases, CPU, fp32
    python benchmarks/rm_vs_trl.py --cases tiny-long,tiny-short --repeats 3
    python benchmarks/rm_vs_trl.py --device cuda --dtype bfloat16 --repeats 3

The cases, data, child-process machinery and memory sampling are those of dpo_vs_trl.py
(benchmarks/cases.py, benchmarks/common.py). Every run is its own subprocess and the tools
alternate inside each repeat (trl, preftune, trl-nogc, preftune-padded, preftune-gc). Both
tools start from the same model directory loaded as AutoModelForSequenceClassification with one
output (the score head is new and random in both), train on the same JSONL records in the same
step order (TRL reads them through datasets.Dataset.from_list with a sequential sampler), with
the same batch size, max_length (data chosen so nothing is filtered or truncated), step count,
lr 1e-5 with linear decay and no warmup, AdamW without weight decay, gradient clipping at 1.0,
the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), seed and dtype; neither evaluates,
saves checkpoints or logs more than once. TRL's default gradient_checkpointing=True is kept for
"trl"; "trl-nogc" turns it off (TRL's fastest setting). preftune: layout auto (prefix sharing
when prompts are longer than responses: one row per pair, prompt encoded once, the reward read
at each response's last token); "preftune-padded": layout padded (one row per prompt+response,
like TRL); "preftune-gc": preftune with train.gradient_checkpointing; "preftune-inbw": preftune
with train.optimizer_in_backward (each weight's AdamW update runs in backward and its gradient
is freed at once; it cannot clip, so max_grad_norm is off for this tool only).

On a busy CPU, pass --threads 1: with OMP threads competing against other processes a step can
be 10x slower and timings become meaningless.

Definitions (identical for every tool):

- trained tokens: real (non-padding) tokens of prompt+chosen and prompt+rejected of the pairs of
  steps 2..N, counted once from preftune's tokenization of the data (TRL's own tokenization is
  reported beside it: it keeps the template's newline after <|im_end|>, one token per response).
- tokens/s: trained tokens / wall seconds from the end of step 1 (warmup) to the end of step N.
  Model loading and data preparation are outside this window.
- e2e s: wall seconds from the start of the child process (imports included) to the end of the
  last step; the final model save is skipped for both (preftune's RewardTask.save is a no-op
  here; TRL is told save_strategy="no" and is never asked to save).
- peak MB: peak RSS of the child process (os.wait4) on CPU; torch.cuda.max_memory_allocated on
  CUDA (the whole child). "base MB" is the RSS after imports, before the model is loaded;
  "setup / train" are the largest RSS samples (every 20 ms) while loading model and data and
  while training (from the optimizer's creation on); on CUDA the peak allocated CUDA memory of
  those phases.
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

TOOLS = ("trl", "preftune", "trl-nogc", "preftune-padded", "preftune-gc", "preftune-inbw")
LEARNING_RATE = 1e-5  # preftune's reward-model default (a fresh head needs more than 1e-6)

# (steps, batch size) per case or model on each device; --steps/--batch-size override. On CPU,
# one smollm2-long step of TRL takes about a minute on one thread.
RUN_SIZE = {
    "cpu": {"smollm2-long": (3, 4), "smollm2-short": (6, 4), "tiny": (10, 8)},
    "cuda": {"default": (20, 8), "tiny": (40, 8)},
}


# ---------------------------------------------------------------------------------------------
# children: one training run each; they write a JSON result file


def child_preftune(case: dict, tool: str, args, workdir: Path) -> dict:
    import torch

    import preftune.reward.train as reward_train
    from preftune.reward.config import build_reward_config
    from preftune.train.trainer import Trainer

    base_mb = rss_mb()
    memory = PhaseMemory(memory_kind(args))
    step_ends: list[float] = []
    trainer_init, trainer_step = Trainer.__init__, Trainer.step

    def init_in_train_phase(self, *a, **k):  # model and data are loaded: optimizer, then steps
        memory.enter("train")
        trainer_init(self, *a, **k)

    def timed_step(self, step):
        record = trainer_step(self, step)
        if args.device == "cuda":
            torch.cuda.synchronize()
        step_ends.append(time.perf_counter())
        return record

    Trainer.__init__, Trainer.step = init_in_train_phase, timed_step
    # the final save is not part of the benchmark (TRL saves nothing)
    reward_train.RewardTask.save = lambda self, module, output_dir: None
    config = build_reward_config({
        "output_dir": str(workdir / "out"),
        "model": {"path": case["model_dir"], "dtype": args.dtype},
        "data": {"train": case["data_path"], "format": "conversational",
                 "max_length": case["max_length"], "max_prompt_length": case["max_prompt_length"]},
        "loss": {"name": "bt"},
        "train": {"learning_rate": LEARNING_RATE, "batch_size": case["batch_size"],
                  "gradient_accumulation_steps": 1, "max_steps": case["steps"],
                  "warmup_ratio": 0.0, "schedule": "linear", "weight_decay": 0.0,
                  "max_grad_norm": None if tool == "preftune-inbw" else 1.0,
                  "seed": case["seed"], "log_every": 1,
                  "layout": "padded" if tool == "preftune-padded" else "auto",
                  "gradient_checkpointing": tool == "preftune-gc",
                  "optimizer_in_backward": tool == "preftune-inbw"},
    }, source="rm_vs_trl.py")
    reward_train.train_reward_model(config, show_progress=False)
    phase_peaks = memory.stop()
    run = json.loads((workdir / "out" / "run.json").read_text())
    metrics = [json.loads(line) for line in (workdir / "out" / "metrics.jsonl").read_text().splitlines()]
    return {"step_ends": step_ends, "base_mb": base_mb, "phase_peaks": phase_peaks,
            "layout": run["layout"], "losses": [m["loss"] for m in metrics],
            "accuracies": [m.get("rewards/accuracies") for m in metrics],
            "padding_fraction": [m["padding_fraction"] for m in metrics],
            "step_seconds": [m["step_seconds"] for m in metrics]}


def child_trl(case: dict, tool: str, args, workdir: Path) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    base_mb = rss_mb()
    memory = PhaseMemory(memory_kind(args))
    checkpointing = not tool.endswith("-nogc")  # TRL's default is gradient_checkpointing=True

    tokenizer = AutoTokenizer.from_pretrained(case["model_dir"])
    records = [json.loads(line) for line in Path(case["data_path"]).read_text().splitlines()]
    # the same records in preftune's step order; the sampler below keeps that order
    dataset = Dataset.from_list([records[i] for i in case["order"]])
    config = RewardConfig(
        output_dir=str(workdir / "out"), per_device_train_batch_size=case["batch_size"],
        gradient_accumulation_steps=1, max_steps=case["steps"], learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_length=case["max_length"], gradient_checkpointing=checkpointing,
        train_sampling_strategy="sequential", model_init_kwargs={"dtype": args.dtype},
        save_strategy="no", eval_strategy="no", logging_steps=case["steps"], report_to=[],
        seed=case["seed"], data_seed=case["seed"], dataloader_num_workers=0,
        use_cpu=args.device == "cpu", bf16=False, fp16=False, disable_tqdm=True,
    )
    clock = trl_step_clock(memory, cuda=args.device == "cuda")
    # a model path: TRL loads it as AutoModelForSequenceClassification with num_labels=1
    trainer = RewardTrainer(model=case["model_dir"], args=config, train_dataset=dataset,
                            processing_class=tokenizer, callbacks=[clock])
    rows = trainer.train_dataset
    lengths = [len(c) + len(r) for c, r in zip(rows["chosen_ids"], rows["rejected_ids"])]
    longest = max(max(len(c), len(r)) for c, r in zip(rows["chosen_ids"], rows["rejected_ids"]))
    if len(rows) != len(case["order"]) or longest > case["max_length"]:
        raise SystemExit(f"TRL dropped or truncated data: {len(rows)} rows, longest {longest}")
    trainer.train()
    phase_peaks = memory.stop()
    return {"step_ends": clock.step_ends, "base_mb": base_mb, "phase_peaks": phase_peaks,
            "losses": clock.losses, "layout": "padded",
            "trl_timed_tokens": sum(lengths[case["batch_size"]:])}


# ---------------------------------------------------------------------------------------------
# parent: tables


def table_rows(runs: dict) -> dict:
    """Per tool: medians over the repeats, the tokens/s range, and the ratios against TRL."""
    rows = {}
    for tool, results in runs.items():
        speeds = [r["tokens_per_second"] for r in results]
        rows[tool] = {key: median([r[key] for r in results]) for key in
                      ("tokens_per_second", "peak_mb", "base_mb", "e2e_seconds", "timed_seconds")}
        rows[tool].update(
            layout=results[0]["layout"], low=min(speeds), high=max(speeds),
            setup_mb=median([r["phase_peaks"].get("setup") for r in results]),
            train_mb=median([r["phase_peaks"].get("train") for r in results]))
    trl_tools = [t for t in rows if t.startswith("trl")]
    fastest = max(trl_tools, key=lambda t: rows[t]["tokens_per_second"], default=None)
    leanest = min(trl_tools, key=lambda t: rows[t]["peak_mb"], default=None)
    for row in rows.values():
        for name, other, key in (("x_trl", "trl", "tokens_per_second"),
                                 ("x_fastest", fastest, "tokens_per_second"),
                                 ("mem_x_trl", "trl", "peak_mb"), ("mem_x_leanest", leanest, "peak_mb")):
            row[name] = row[key] / rows[other][key] if other in rows else None
    return {"rows": rows, "fastest": fastest, "leanest": leanest}


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def summarize(case: dict, runs: dict, args) -> str:
    mem_label = f"peak {memory_label(args)} MB"
    table = table_rows(runs)
    lines = [
        f"### {case['name']}",
        "",
        f"model `{Path(case['model_dir']).name}`, {case['data_summary']}; {case['steps']} steps x "
        f"batch {case['batch_size']} pairs, max_length {case['max_length']}; timed: steps "
        f"2..{case['steps']} = {case['timed_tokens']} trained tokens.",
        "",
        f"| tool | layout | tokens/s | min-max | x TRL | x fastest TRL | {mem_label} | x TRL "
        f"| x leanest TRL | base MB | {memory_label(args)} setup / train MB "
        "| steps s | e2e s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tool, row in table["rows"].items():
        phases = " / ".join("-" if v is None else f"{v:.0f}" for v in (row["setup_mb"], row["train_mb"]))
        lines.append(
            f"| {tool} | {row['layout']} | {row['tokens_per_second']:.1f} | {row['low']:.0f}-"
            f"{row['high']:.0f} | {_ratio(row['x_trl'])} | {_ratio(row['x_fastest'])} | "
            f"{row['peak_mb']:.0f} | {_ratio(row['mem_x_trl'])} | {_ratio(row['mem_x_leanest'])} | "
            f"{row['base_mb']:.0f} | {phases} | {row['timed_seconds']:.1f} | {row['e2e_seconds']:.1f} |")
    if table["fastest"]:
        lines += ["", f"Fastest TRL setting here: {table['fastest']}; leanest: {table['leanest']}."]
    trl_tokens = next((r[0].get("trl_timed_tokens") for t, r in runs.items() if t.startswith("trl")), None)
    if trl_tokens:
        lines += ["", f"TRL's own tokenization of the same timed pairs: {trl_tokens} tokens "
                      f"({trl_tokens / case['timed_tokens'] - 1:+.1%}); tokens/s above use "
                      f"{case['timed_tokens']} for every tool."]
    return "\n".join(lines)


def targets(collected: list, args) -> str:
    """Each preftune tool against the targets: >= 2x TRL's tokens/s on long prompts, never
    slower than TRL's fastest setting, no more peak memory than TRL (its default setting)."""
    lines = ["### Against the targets", "",
             "Speed: x `trl` (TRL defaults) / x fastest TRL setting; memory: x `trl` / x leanest "
             "TRL setting. Targets: >= 2x on long prompts, never below 1x the fastest TRL "
             "setting, peak memory <= `trl`.", "",
             "| case | tool | tokens/s x TRL / x fastest | 2x on long | never slower "
             "| peak x TRL / x leanest | no more memory |",
             "|---|---|---:|---|---|---:|---|"]
    for case, runs in collected:
        rows = table_rows(runs)["rows"]
        if "trl" not in rows:
            continue
        for tool, row in rows.items():
            if not tool.startswith("preftune"):
                continue
            long = case["name"].endswith("-long")
            doubled = ("met" if min(row["x_trl"], row["x_fastest"]) >= 2 else
                       "met vs `trl` only" if row["x_trl"] >= 2 else "not met") if long else "(n/a)"
            lines.append(
                f"| {case['name']} | {tool} | {row['x_trl']:.2f} / {row['x_fastest']:.2f} | {doubled} | "
                f"{'met' if row['x_fastest'] >= 1 else 'not met'} | {row['mem_x_trl']:.2f} / "
                f"{row['mem_x_leanest']:.2f} | {'met' if row['mem_x_trl'] <= 1 else 'not met'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = make_parser(__doc__.split("\n")[0], f"comma list of {', '.join(TOOLS)} (default: all)")
    args = parser.parse_args(argv)
    if args.child:
        run_child(args, lambda tool: child_trl if tool.startswith("trl") else child_preftune,
                  T_PROCESS_START)
        return

    cases = split_names(parser, args.cases, CASES, "case")
    tools = split_names(parser, args.tools, TOOLS, "tool") if args.tools else list(TOOLS)
    run_benchmark(
        args, argv, script=__file__, title="preftune vs TRL reward-model training", cases=cases,
        tools=tools, run_size=RUN_SIZE, summarize=summarize, closing=targets, file_suffix="-rm",
        progress_line=lambda r: (
            f"{r['tokens_per_second']:8.1f} tok/s  peak {r['peak_mb']:7.0f} MB  steps "
            f"{r['timed_seconds']:6.1f} s  e2e {r['e2e_seconds']:6.1f} s  layout {r['layout']}  "
            f"loss {r['losses'][0]:.3f}..{r['losses'][-1]:.3f}"))


if __name__ == "__main__":
    main()
