"""Speed and memory of DPO training: preftune against TRL's DPOTrainer on identical inputs.

    pip install -e ".[bench]"                       # trl==1.16.0
    python benchmarks/dpo_vs_trl.py --threads 1     # all cases, CPU, fp32 (~25 min on 2 cores)
    python benchmarks/dpo_vs_trl.py --cases tiny-long,tiny-short --repeats 3
    python benchmarks/dpo_vs_trl.py --device cuda --dtype bfloat16 --repeats 3

Every run is its own subprocess (clean peak memory) and the tools alternate inside each repeat
(trl, preftune, trl-precompute, preftune-padded, trl-precompute-nogc), so slow drift of the
machine hits all of them alike. All get the same model directory, the same JSONL records in the
same step order (TRL reads them through datasets.Dataset.from_list with a sequential sampler),
batch size, max_length, step count, lr, beta=0.1, sigmoid loss, seed and dtype; none evaluates,
saves checkpoints or logs more than once. TRL's own default gradient_checkpointing=True is kept
for "trl" and "trl-precompute"; "trl-precompute-nogc" turns it off (preftune has no activation
checkpointing), so "x fastest TRL" compares against TRL's best setting on that case.

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
  allocated CUDA memory of those phases.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_PROCESS_START = time.perf_counter()
HERE = Path(__file__).resolve().parent
# trl: TRL defaults (reference = second model in memory, gradient checkpointing on);
# trl-precompute: precompute_ref_log_probs=True; trl-precompute-nogc: that and
# gradient_checkpointing=False (TRL's fastest setting); preftune: reference precomputed, layout
# auto; preftune-padded: the same with layout padded (no prefix sharing); preftune-gc: preftune
# with train.gradient_checkpointing (opt-in there, on by default in TRL); preftune-lean: that plus
# train.optimizer_in_backward (each weight's AdamW update runs as its gradient completes, so no
# full set of gradients is held; this mode cannot clip by the global norm, so it runs without
# max_grad_norm while every other tool clips at 1.0).
# trl-mmap: TRL defaults with glibc's mmap threshold fixed through MALLOC_MMAP_THRESHOLD_, the
# allocator setting preftune applies to itself on CPU (train/memory.py), so peak memory can be
# compared without it. preftune-flex (CUDA only): preftune with model.attn_implementation
# flex_attention, so prefix-shared and packed rows run block-sparse instead of with a dense mask.
TOOLS = ("trl", "preftune", "trl-precompute", "preftune-padded", "trl-precompute-nogc",
         "preftune-gc", "preftune-lean", "trl-mmap", "preftune-flex")

# name -> model ("default" = bundled SmolLM2-135M-Instruct, "tiny" = small random Llama) and data
CASES = {
    "smollm2-long": {"model": "default", "data": "long"},
    "smollm2-short": {"model": "default", "data": "short"},
    "tiny-long": {"model": "tiny", "data": "long"},
    "tiny-short": {"model": "tiny", "data": "short"},
}
DATA = {  # data kind -> max_length, max_prompt_length (preftune; TRL has max_length only)
    "long": {"max_length": 640, "max_prompt_length": 560},
    "short": {"max_length": 256, "max_prompt_length": 160},
}
# (steps, batch size) per model on each device; --steps/--batch-size override
RUN_SIZE = {
    "cpu": {"default": (3, 2), "tiny": (6, 4)},
    "cuda": {"default": (20, 8), "tiny": (40, 8)},
}


# ---------------------------------------------------------------------------------------------
# synthetic data: multi-turn dialogue with long prompts, or single questions; short responses

_WORDS = {
    "subject": ["the engineer", "my neighbour", "a small team", "the teacher", "our client",
                "the committee", "a student", "the pilot", "my sister", "the old farmer",
                "the new manager", "a traveller", "the chef", "the doctor", "a volunteer"],
    "verb": ["checked", "repaired", "described", "ordered", "planted", "measured", "painted",
             "cleaned", "explained", "moved", "tested", "counted", "delivered", "compared"],
    "object": ["the garden fence", "three wooden chairs", "a broken radio", "the weekly report",
               "two bags of rice", "the kitchen window", "an old bicycle", "the river map",
               "a box of letters", "the training plan", "the spare tyres", "a long cable"],
    "tail": ["before lunch", "after the storm", "on Tuesday morning", "in the north field",
             "without any help", "for the second time", "near the station", "late at night",
             "with great care", "as quickly as possible", "during the holiday", "at the market"],
    "topic": ["the weather", "cooking rice", "fixing a bicycle", "saving money", "learning French",
              "growing tomatoes", "planning a trip", "writing a letter", "training a dog",
              "painting a room", "buying a laptop", "running a meeting", "keeping bees"],
}


def _sentence(rng: random.Random) -> str:
    w = {k: rng.choice(v) for k, v in _WORDS.items()}
    return f"{w['subject'].capitalize()} {w['verb']} {w['object']} {w['tail']}."


def _text(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(sentences))


def _question(rng: random.Random) -> str:
    return f"What should I know about {rng.choice(_WORDS['topic'])}? {_sentence(rng)}"


def make_records(kind: str, count: int, seed: int) -> list[dict]:
    """Conversational preference records. long: 3-4 earlier exchanges (prompt ~250-400 tokens
    with the template), responses ~10-40 tokens; short: one question, responses ~10-40 tokens."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        prompt = []
        if kind == "long":
            for _turn in range(rng.randint(3, 4)):
                prompt.append({"role": "user", "content": _question(rng) + " " + _text(rng, rng.randint(1, 2))})
                prompt.append({"role": "assistant", "content": _text(rng, rng.randint(2, 4))})
        prompt.append({"role": "user", "content": _question(rng)})
        chosen = _text(rng, rng.randint(1, 3))
        rejected = _text(rng, rng.randint(1, 3))
        records.append({"prompt": prompt,
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}]})
    return records


# ---------------------------------------------------------------------------------------------
# case preparation (parent process)


def save_random_model(target: Path, config, tokenizer_source: str) -> str:
    """Random weights (seed 0) for ``config`` with ``tokenizer_source``'s tokenizer, saved once."""
    if (target / "config.json").exists():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(target)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(target)
    return str(target)


def tiny_model_dir(root: Path, default_dir: str) -> str:
    """A small random Llama with SmolLM2's tokenizer (and vocabulary)."""
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(default_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return save_random_model(root / "tiny-llama", config, default_dir)


def random_init_dir(root: Path, source: str) -> str:
    """The architecture of ``source`` (its config.json and tokenizer, no weights needed) with
    random weights. Speed and memory depend on the shapes only, so this stands in for the real
    checkpoint where its weights cannot be installed."""
    from transformers import AutoConfig

    return save_random_model(root / f"{Path(source).name}-random-init",
                             AutoConfig.from_pretrained(source), source)


def example_order(num_examples: int, batch_size: int, steps: int, seed: int) -> list[int]:
    from preftune.train.trainer import example_stream

    return example_stream(num_examples, batch_size, steps, seed)[: steps * batch_size]


def prepare_case(name: str, root: Path, device: str, steps: int | None, batch_size: int | None,
                 seed: int, default_model: str | None = None) -> dict:
    from preftune.data.sources import load_records
    from preftune.data.tokenize import TokenizeSettings, tokenize_records
    from preftune.model.load import load_tokenizer, resolve_model_dir

    spec = CASES[name]
    default_steps, default_batch = RUN_SIZE[device][spec["model"]]
    steps, batch_size = steps or default_steps, batch_size or default_batch
    default_dir = resolve_model_dir(default_model or "default")
    if not any(Path(default_dir).glob("*.safetensors")) and not any(Path(default_dir).glob("*.bin")):
        default_dir = random_init_dir(root, default_dir)
    model_dir = default_dir if spec["model"] == "default" else tiny_model_dir(root, default_dir)
    limits = DATA[spec["data"]]
    case_dir = root / name
    case_dir.mkdir(parents=True, exist_ok=True)
    data_path = case_dir / "pairs.jsonl"
    records = make_records(spec["data"], steps * batch_size, seed)
    data_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    tokenizer = load_tokenizer(model_dir)
    examples, report = tokenize_records(load_records(str(data_path)), tokenizer,
                                        TokenizeSettings(**limits))
    if report.kept != len(records) or report.prompt_truncated or report.response_truncated:
        raise SystemExit(f"{name}: data does not fit the limits {limits}: {report.as_dict()}")
    tokens = {ex.index: sum(len(ex.prompt_ids) + len(r) for r in ex.response_ids) for ex in examples}
    order = example_order(len(records), batch_size, steps, seed)
    step_tokens = [sum(tokens[i] for i in order[s * batch_size:(s + 1) * batch_size])
                   for s in range(steps)]
    prompt_mean = statistics.mean(len(ex.prompt_ids) for ex in examples)
    response_mean = statistics.mean(len(r) for ex in examples for r in ex.response_ids)
    longest = max(len(ex.prompt_ids) + max(len(r) for r in ex.response_ids) for ex in examples)
    return {
        "name": name, "model_dir": model_dir, "data_path": str(data_path), "steps": steps,
        "batch_size": batch_size, "seed": seed, "order": order, "step_tokens": step_tokens,
        "timed_tokens": sum(step_tokens[1:]), **limits,
        "data_summary": f"{len(records)} pairs, prompt {prompt_mean:.0f} tok, response "
                        f"{response_mean:.0f} tok (mean), longest sequence {longest} tok",
    }


# ---------------------------------------------------------------------------------------------
# children: one training run each; they write a JSON result file


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PhaseMemory:
    """Polls this process's RSS every 20 ms and keeps the maximum per phase (setup, reference,
    train), to say where the peak happens. The exact peak is the parent's os.wait4 ru_maxrss.
    With ``cuda``, it also keeps torch's peak allocated CUDA memory per phase (reset at each
    phase change, so the largest of them is the run's peak)."""

    def __init__(self, cuda: bool = False):
        import threading

        self.phase, self.peaks, self.cuda, self.cuda_peaks = "setup", {}, cuda, {}
        if cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.02)

    def sample(self):
        rss = _rss_mb()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)

    def close_phase(self):
        if self.cuda:
            import torch

            peak = torch.cuda.max_memory_allocated() / 2**20
            self.cuda_peaks[self.phase] = max(self.cuda_peaks.get(self.phase, 0.0), peak)
            torch.cuda.reset_peak_memory_stats()

    def enter(self, phase: str):
        self.sample()
        self.close_phase()
        self.phase = phase
        self.sample()

    def stop(self) -> dict:
        """RSS peaks per phase on CPU; CUDA peaks per phase with ``cuda``."""
        self.sample()
        self.close_phase()
        self._stop.set()
        self._thread.join()
        return self.cuda_peaks if self.cuda else self.peaks


def child_preftune(case: dict, tool: str, args, workdir: Path) -> dict:
    import torch

    import preftune.train.loop as loop
    from preftune.config import build_config

    base_mb = _rss_mb()
    memory = PhaseMemory(cuda=args.device == "cuda")
    step_ends: list[float] = []
    reference_seconds = [0.0]
    write = loop.MetricsLog.write

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

    loop.MetricsLog.write = timed_write
    loop.build_reference = timed_reference
    loop.save_final_model = lambda *a, **k: None  # not part of the benchmark (TRL saves nothing)
    layout = "padded" if tool == "preftune-padded" else "auto"
    config = build_config({
        "output_dir": str(workdir / "out"),
        "model": {"path": case["model_dir"], "dtype": args.dtype,
                  "attn_implementation": "flex_attention" if tool == "preftune-flex" else None},
        "data": {"train": case["data_path"], "format": "conversational",
                 "max_length": case["max_length"], "max_prompt_length": case["max_prompt_length"]},
        "objective": {"name": "dpo", "beta": 0.1},
        "reference": {"strategy": "precomputed", "cache_dir": str(workdir / "reference-cache")},
        "train": {"learning_rate": 1e-6, "batch_size": case["batch_size"],
                  "gradient_accumulation_steps": 1, "max_steps": case["steps"],
                  "warmup_ratio": 0.0, "schedule": "linear",
                  "max_grad_norm": None if tool == "preftune-lean" else 1.0,
                  "seed": case["seed"], "log_every": 1, "layout": layout,
                  "gradient_checkpointing": tool in ("preftune-gc", "preftune-lean"),
                  "optimizer_in_backward": tool == "preftune-lean"},
    })
    loop.train(config, show_progress=False)
    phase_peaks = memory.stop()
    run = json.loads((workdir / "out" / "run.json").read_text())
    metrics = [json.loads(line) for line in (workdir / "out" / "metrics.jsonl").read_text().splitlines()]
    return {"step_ends": step_ends, "reference_seconds": reference_seconds[0], "base_mb": base_mb,
            "phase_peaks": phase_peaks, "layout": run["layout"], "losses": [m["loss"] for m in metrics],
            "step_seconds": [m["step_seconds"] for m in metrics],
            "cuda_peak_mb": max(phase_peaks.values()) if args.device == "cuda" else None}


def child_trl(case: dict, tool: str, args, workdir: Path) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import trl.trainer.dpo_trainer as dpo_module
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    base_mb = _rss_mb()
    memory = PhaseMemory(cuda=args.device == "cuda")
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

    class StepClock(TrainerCallback):
        def __init__(self):
            self.step_ends, self.losses = [], []

        def on_train_begin(self, args_, state, control, **kwargs):
            memory.enter("train")

        def on_step_end(self, args_, state, control, **kwargs):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.step_ends.append(time.perf_counter())

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(case["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(case["model_dir"], dtype=dtype)
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
    )
    clock = StepClock()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[clock])
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
            "trl_timed_tokens": sum(lengths[case["batch_size"]:]),
            "cuda_peak_mb": max(phase_peaks.values()) if args.device == "cuda" else None}


def run_child(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    spec = json.loads(Path(args.child).read_text())
    case, tool, workdir = spec["case"], spec["tool"], Path(spec["workdir"])
    run = child_trl if tool.startswith("trl") else child_preftune
    result = run(case, tool, args, workdir)
    ends = result["step_ends"]
    if len(ends) != case["steps"]:
        raise SystemExit(f"{tool}: expected {case['steps']} step ends, got {len(ends)}")
    result.update(timed_seconds=ends[-1] - ends[0], e2e_seconds=ends[-1] - T_PROCESS_START)
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# parent: alternate the tools, collect, report


def launch(case: dict, tool: str, args, root: Path, repeat: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"{case['name']}-{tool}-{repeat}-", dir=root))
    spec_path, result_path = workdir / "spec.json", workdir / "result.json"
    spec_path.write_text(json.dumps({"case": case, "tool": tool, "workdir": str(workdir),
                                     "result": str(result_path)}))
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(workdir / "hf-datasets"))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if tool == "trl-mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    command = [sys.executable, __file__, "--child", str(spec_path), "--device", args.device,
               "--dtype", args.dtype] + (["--threads", str(args.threads)] if args.threads else [])
    log = open(workdir / "child.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    log.close()
    if status != 0 or not result_path.exists():
        tail = (workdir / "child.log").read_text()[-3000:]
        raise SystemExit(f"{case['name']} / {tool} failed (status {status}); log tail:\n{tail}")
    result = json.loads(result_path.read_text())
    result["peak_mb"] = result["cuda_peak_mb"] if args.device == "cuda" else usage.ru_maxrss / 1024
    result["rss_peak_mb"] = usage.ru_maxrss / 1024
    result["tokens_per_second"] = case["timed_tokens"] / result["timed_seconds"]
    return result


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(case: dict, runs: dict, args) -> str:
    mem_label = "peak CUDA MB" if args.device == "cuda" else "peak RSS MB"
    for results in runs.values():
        for r in results:
            r["train_rss_mb"] = r["phase_peaks"].get("train")
            r["reference_rss_mb"] = r["phase_peaks"].get("reference")
    rows = {tool: {key: median([r[key] for r in results]) for key in
                   ("tokens_per_second", "peak_mb", "base_mb", "reference_seconds", "e2e_seconds",
                    "timed_seconds", "train_rss_mb", "reference_rss_mb")}
            | {"layout": results[0]["layout"]}
            for tool, results in runs.items()}
    fastest_trl = max((t for t in rows if t.startswith("trl")),
                      key=lambda t: rows[t]["tokens_per_second"], default=None)
    base = rows.get("trl")
    lines = [
        f"### {case['name']}",
        "",
        f"model `{Path(case['model_dir']).name}`, {case['data_summary']}; {case['steps']} steps x "
        f"batch {case['batch_size']} pairs, max_length {case['max_length']}; timed: steps "
        f"2..{case['steps']} = {case['timed_tokens']} trained tokens.",
        "",
        f"| tool | layout | tokens/s | x TRL | x fastest TRL | {mem_label} | x TRL | base MB "
        f"| {'CUDA' if args.device == 'cuda' else 'RSS'} in ref / train MB | ref s | steps s | e2e s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tool, row in rows.items():
        speed = f"{row['tokens_per_second'] / base['tokens_per_second']:.2f}" if base else "-"
        memory = f"{row['peak_mb'] / base['peak_mb']:.2f}" if base else "-"
        fastest = (f"{row['tokens_per_second'] / rows[fastest_trl]['tokens_per_second']:.2f}"
                   if fastest_trl else "-")
        reference = "in steps" if tool == "trl" else f"{row['reference_seconds']:.1f}"
        phases = " / ".join("-" if v is None else f"{v:.0f}"
                            for v in (row["reference_rss_mb"], row["train_rss_mb"]))
        lines.append(
            f"| {tool} | {row['layout']} | {row['tokens_per_second']:.1f} | {speed} | {fastest} | "
            f"{row['peak_mb']:.0f} | {memory} | {row['base_mb']:.0f} | {phases} | {reference} | "
            f"{row['timed_seconds']:.1f} | {row['e2e_seconds']:.1f} |")
    trl_tokens = next((r[0].get("trl_timed_tokens") for t, r in runs.items() if t.startswith("trl")), None)
    if fastest_trl:
        lines += ["", f"Fastest TRL setting here: {fastest_trl}."]
    if trl_tokens:
        lines += ["", f"TRL's own tokenization of the same timed pairs: {trl_tokens} tokens "
                      f"({trl_tokens / case['timed_tokens'] - 1:+.1%}); tokens/s above use "
                      f"{case['timed_tokens']} for every tool."]
    return "\n".join(lines)


def machine_description(args) -> tuple[str, str]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    cores = os.cpu_count()
    threads = args.threads or torch.get_num_threads()
    parts = [f"CPU {cpu}, {cores} cores ({threads} torch threads per run)",
             f"torch {torch.__version__}", f"Python {platform.python_version()}"]
    try:
        import transformers
        import trl
        parts.append(f"transformers {transformers.__version__}, trl {trl.__version__}")
    except ImportError:
        pass
    slug = f"cpu-{cores}c"
    if args.device == "cuda":
        gpu = torch.cuda.get_device_name(0)
        parts.insert(0, f"GPU {gpu}")
        slug = gpu.lower().replace(" ", "-")
    return "; ".join(parts), slug


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--tools", default=None, help=f"comma list of {', '.join(TOOLS)} (default: "
                                                         "all; preftune-flex on CUDA only)")
    parser.add_argument("--repeats", type=int, default=None, help="default: 1 on CPU, 3 on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default per model)")
    parser.add_argument("--tiny-steps", type=int, default=None, help="steps for the tiny model cases")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default per model)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per run (torch/OMP); default: torch's default")
    parser.add_argument("--default-model", default=None,
                        help="model dir for the smollm2 cases instead of the bundled SmolLM2; a dir "
                             "with only config.json and tokenizer files gets random weights")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--results", default=str(HERE / "results"), help="where the .md goes")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args)
        return

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    tools = ([t.strip() for t in args.tools.split(",") if t.strip()] if args.tools else
             [t for t in TOOLS if args.device == "cuda" or t != "preftune-flex"])
    for name in cases:
        if name not in CASES:
            parser.error(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    for tool in tools:
        if tool not in TOOLS:
            parser.error(f"unknown tool {tool!r}; choose from {', '.join(TOOLS)}")
        if tool == "preftune-flex" and args.device != "cuda":
            parser.error("preftune-flex needs --device cuda (torch has no FlexAttention backward on CPU)")
    repeats = args.repeats or (1 if args.device == "cpu" else 3)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="preftune-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/dpo_vs_trl.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    description, slug = machine_description(args)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    sections = []
    for name in cases:
        steps = args.tiny_steps if CASES[name]["model"] == "tiny" and args.tiny_steps else args.steps
        case = prepare_case(name, root, args.device, steps, args.batch_size, args.seed,
                            args.default_model)
        print(f"== {name}: {case['data_summary']}", flush=True)
        runs: dict[str, list] = {tool: [] for tool in tools}
        for repeat in range(repeats):
            for tool in tools:
                result = launch(case, tool, args, root, repeat)
                runs[tool].append(result)
                print(f"   {tool:16s} rep {repeat + 1}: {result['tokens_per_second']:8.1f} tok/s  "
                      f"peak {result['peak_mb']:7.0f} MB  ref {result['reference_seconds']:5.1f} s  "
                      f"e2e {result['e2e_seconds']:6.1f} s  layout {result['layout']}", flush=True)
        section = summarize(case, runs, args)
        sections.append(section)
        print("\n" + section + "\n", flush=True)

    date = _dt.date.today().isoformat()
    report = "\n\n".join([
        f"# preftune vs TRL DPO: {date}",
        f"Command: `{command}`",
        f"Machine: {description}; device {args.device}, dtype {args.dtype}; "
        f"{repeats} repeat(s), median shown; total wall {time.perf_counter() - started:.0f} s; "
        f"1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end "
        f"(other processes on the machine compete for the cores).",
        *sections,
    ]) + "\n"
    out = Path(args.results) / f"{slug}-{date}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
