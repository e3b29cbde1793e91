"""What the benchmarks against TRL share, independent of the tool and the training task.

``dpo_vs_trl.py`` and ``rm_vs_trl.py`` import this module. It holds per-phase memory sampling in
the child, the subprocess-per-run launcher (peak RSS from ``os.wait4``), the alternating driver
over the cases of ``cases.py``, the command line and the machine description. Each script keeps
its own tools, its children (how one tool trains and where its clock ticks) and its tables.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cases import CASES, prepare_case

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------
# children: one training run each; they write a JSON result file


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PhaseMemory:
    """This process's peak memory per phase (setup, reference, train), to say where the peak
    happens. ``kind`` (``memory_kind(args)``) picks what is counted:

    - ``"rss"``: the RSS, polled every 20 ms (the exact peak is the parent's os.wait4 ru_maxrss);
    - ``"cuda"``: torch's peak allocated CUDA memory, reset at each phase change;
    - ``"tensors"``: on CPU, the bytes of tensors alive, as torch.cuda.max_memory_allocated counts
      them on a GPU: every allocation and free of the CPU allocator from here on, recorded by
      torch.profiler's memory profiling. Exact, and free of the C library's caching that makes
      RSS noisy, but the profiler slows every op, so such a run's tokens/s are no speed figure.
      Allocations on other threads than this one are not seen: ``launch`` has transformers load
      weights on the main thread (HF_DEACTIVATE_ASYNC_LOAD), and what stays unseen is preftune's
      next batch, a few KB of token ids built on its collate thread."""

    def __init__(self, kind: str = "rss"):
        import threading

        self.phase, self.kind, self.peaks = "setup", kind, {}
        if kind == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        if kind == "tensors":
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.start()
        if kind == "rss":
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _poll(self):
        while not self._stop.is_set():
            self._fold_peak()
            self._stop.wait(0.02)

    def _fold_peak(self):
        """Folds what the current phase reached so far into its peak (RSS, CUDA; polled and at
        each phase change); the profiler's records are read once, at ``stop``."""
        if self.kind == "tensors":
            return
        if self.kind == "rss":
            peak = rss_mb()
        else:
            import torch

            peak = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), peak)

    def enter(self, phase: str):
        self._fold_peak()
        self.phase = phase
        if self.kind == "tensors":  # an event on the profiler's own clock
            import torch

            with torch.profiler.record_function(f"phase:{phase}"):
                pass

    def stop(self) -> dict:
        """Peaks per phase in MB: RSS, CUDA or tensor bytes, by ``kind``."""
        self._fold_peak()
        if self.kind == "rss":
            self._stop.set()
            self._thread.join()
        if self.kind == "tensors":
            self._profiler.stop()
            return self._tensor_peaks()
        return self.peaks

    def _tensor_peaks(self) -> dict:
        """Replays the recorded allocations and frees in time order and keeps, per phase, the
        largest total alive; ``enter`` left a ``phase:<name>`` event where each phase begins."""
        events = sorted(((e.start_ns(), e.name(), e.nbytes()) for e in
                         self._profiler.profiler.kineto_results.events()
                         if e.name() == "[memory]" or e.name().startswith("phase:")))
        peaks, alive, phase = {}, 0, "setup"
        for _, name, nbytes in events:
            if name != "[memory]":
                phase = name.removeprefix("phase:")
                continue
            alive += nbytes
            peaks[phase] = max(peaks.get(phase, 0), alive)
        return {phase: nbytes / 2**20 for phase, nbytes in peaks.items()}


def memory_kind(args) -> str:
    """What PhaseMemory counts for a benchmark's command line."""
    if args.device == "cuda":
        return "cuda"
    return "tensors" if args.tensor_memory else "rss"


def memory_label(args) -> str:
    return {"cuda": "CUDA", "tensors": "tensor", "rss": "RSS"}[memory_kind(args)]


def trl_step_clock(memory: PhaseMemory, cuda: bool):
    """A TRL trainer callback: enters the train phase of ``memory`` when training begins, and
    keeps the time each optimizer step ends (``step_ends``) and the logged losses."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.step_ends, self.losses = [], []

        def on_train_begin(self, args_, state, control, **kwargs):
            memory.enter("train")

        def on_step_end(self, args_, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.step_ends.append(time.perf_counter())

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    return StepClock()


def run_child(args, child_for_tool, process_start: float) -> None:
    """The child side of ``launch``: run ``child_for_tool(tool)(case, tool, args, workdir)``,
    which returns a dict with ``step_ends`` (perf_counter at the end of every step), and write
    it with the timed window (end of step 1 to end of step N) and the end-to-end seconds."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    spec = json.loads(Path(args.child).read_text())
    case, tool, workdir = spec["case"], spec["tool"], Path(spec["workdir"])
    result = child_for_tool(tool)(case, tool, args, workdir)
    ends = result["step_ends"]
    if len(ends) != case["steps"]:
        raise SystemExit(f"{tool}: expected {case['steps']} step ends, got {len(ends)}")
    result.update(timed_seconds=ends[-1] - ends[0], e2e_seconds=ends[-1] - process_start)
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# parent: alternate the tools, collect, report


def launch(script: str, case: dict, tool: str, args, root: Path, repeat: int,
           extra_env: dict | None = None) -> dict:
    """One run of ``tool`` on ``case`` as a child process of ``script``; its result dict plus
    ``peak_mb`` (peak RSS, CUDA or tensor memory, by ``memory_kind``) and ``tokens_per_second``;
    None (after printing the child's log tail) when the run failed, so that one broken tool does
    not cost the other tools' results."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{case['name']}-{tool}-{repeat}-", dir=root))
    spec_path, result_path = workdir / "spec.json", workdir / "result.json"
    spec_path.write_text(json.dumps({"case": case, "tool": tool, "workdir": str(workdir),
                                     "result": str(result_path)}))
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(workdir / "hf-datasets"))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if memory_kind(args) == "tensors":  # transformers loads weights on the calling thread, where
        env["HF_DEACTIVATE_ASYNC_LOAD"] = "1"  # the profiler sees the allocations (PhaseMemory)
    env.update(extra_env or {})
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    command = [sys.executable, script, "--child", str(spec_path), "--device", args.device,
               "--dtype", args.dtype] + (["--threads", str(args.threads)] if args.threads else [])
    command += ["--tensor-memory"] if args.tensor_memory else []
    log = open(workdir / "child.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    log.close()
    if status != 0 or not result_path.exists():
        tail = (workdir / "child.log").read_text()[-3000:]
        print(f"{case['name']} / {tool} failed (status {status}); log tail:\n{tail}", flush=True)
        return None
    result = json.loads(result_path.read_text())
    result["peak_mb"] = (usage.ru_maxrss / 1024 if memory_kind(args) == "rss" else
                         max(result["phase_peaks"].values()))
    result["rss_peak_mb"] = usage.ru_maxrss / 1024
    result["tokens_per_second"] = case["timed_tokens"] / result["timed_seconds"]
    return result


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


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


def source_state() -> str:
    """The preftune source the children import: the commit, and whether src/ has uncommitted
    changes (children import it afresh, so an edit during a run changes later runs)."""
    root = HERE.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=root, text=True,
                               capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    newest = max((f.stat().st_mtime for f in (root / "src").rglob("*.py")), default=0.0)
    stamp = _dt.datetime.fromtimestamp(newest, _dt.timezone.utc).strftime("%H:%M:%S UTC")
    return f"commit {commit}{' + uncommitted src/ changes' if dirty else ''}, newest src file {stamp}"


def make_parser(description: str, tools_help: str) -> argparse.ArgumentParser:
    """The command line both benchmarks take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--tools", default=None, help=tools_help)
    parser.add_argument("--repeats", type=int, default=None, help="default: 1 on CPU, 3 on CUDA")
    parser.add_argument("--once", default="", help="comma list of tools that run in the first "
                        "repeat only (a baseline wanted for its memory, not its speed)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default per model)")
    parser.add_argument("--tiny-steps", type=int, default=None, help="steps for the tiny model cases")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default per model)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tensor-memory", action="store_true",
                        help="CPU: report the peak bytes of live tensors (what "
                             "torch.cuda.max_memory_allocated counts on a GPU) instead of the RSS, "
                             "recorded by torch.profiler; that slows every op, so the run's "
                             "tokens/s are no speed figure")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per run (torch/OMP); default: torch's default")
    parser.add_argument("--default-model", default=None,
                        help="model dir for the smollm2 cases instead of the bundled SmolLM2; a dir "
                             "with only config.json and tokenizer files gets random weights")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--results", default=str(HERE / "results"), help="where the .md goes")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser


def split_names(parser, text: str, known, what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in known:
            parser.error(f"unknown {what} {name!r}; choose from {', '.join(known)}")
    return names


def run_benchmark(args, argv, *, script: str, title: str, cases: list[str], tools: list[str],
                  run_size: dict, summarize, progress_line, extra_env=None, closing=None,
                  file_suffix: str = "") -> Path:
    """Every case: prepare it, run every tool once per repeat (alternating), print and collect
    ``summarize(case, runs, args)``; then write the report (command, machine, load average,
    the sections and ``closing(collected, args)``, if given) and return its path.

    ``run_size`` is {device: {model kind: (steps, batch size)}}; ``progress_line(result)`` is
    the per-run line; ``extra_env(tool)`` gives environment variables for a tool's child.
    ``--results`` is a folder (the file is ``<machine>-<date><file_suffix>.md``) or a ``.md``
    file path."""
    if args.tensor_memory and args.device != "cpu":
        raise SystemExit("--tensor-memory is for CPU runs: on CUDA the peak is already torch's "
                         "allocated bytes")
    repeats = args.repeats or (1 if args.device == "cpu" else 3)
    once = {name.strip() for name in args.once.split(",") if name.strip()}
    if once - set(tools):
        raise SystemExit(f"--once {', '.join(sorted(once - set(tools)))}: not among the tools run "
                         f"({', '.join(tools)})")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="preftune-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    command = f"python benchmarks/{Path(script).name} " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:]))
    description, slug = machine_description(args)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    source_before = source_state()
    sections, collected, loads, failed = [], [], [load_before], set()
    once_note = f" ({', '.join(sorted(once))}: one)" if once and repeats > 1 else ""
    out = Path(args.results)
    if out.suffix != ".md":
        out = out / f"{slug}-{_dt.date.today().isoformat()}{file_suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write_report(cases_done: int) -> None:
        """The report so far, rewritten after every case: a run cut short keeps what it has."""
        source_after = source_state()
        source = (f"preftune source: {source_before}" if source_after == source_before else
                  f"**preftune source changed during the run** (children import it afresh): "
                  f"{source_before} at the start, {source_after} at the end")
        progress = ("" if cases_done == len(cases) else
                    f" **Incomplete: {cases_done} of {len(cases)} cases done.**")
        out.write_text("\n\n".join([
            f"# {title}: {_dt.date.today().isoformat()}",
            f"Command: `{command}`",
            source + "." + progress,
            f"Machine: {description}; device {args.device}, dtype {args.dtype}; "
            f"{repeats} repeat(s){once_note}, median shown; "
            f"total wall {time.perf_counter() - started:.0f} s; "
            f"1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} now, "
            f"{min(loads):.1f}-{max(loads):.1f} (median {median(loads):.1f}) over the runs' ends "
            f"(other processes on the machine compete for the cores).",
            *(["Memory: the peak bytes of live tensors (--tensor-memory: torch.profiler's "
               "memory events), what torch.cuda.max_memory_allocated counts on a GPU; the "
               "profiler slows every op, so tokens/s here are no speed figures."]
              if memory_kind(args) == "tensors" else []),
            *sections,
            *([closing(collected, args)] if closing and collected else []),
            *([f"**Failed runs** (left out above; their log tails are in the run's output): "
               f"{', '.join(sorted(failed))}."] if failed else []),
        ]) + "\n")
        if source_after != source_before:
            print("WARNING: " + source, flush=True)

    for done, name in enumerate(cases, 1):
        steps = args.tiny_steps if CASES[name]["model"] == "tiny" and args.tiny_steps else args.steps
        case = prepare_case(name, root, run_size[args.device], steps, args.batch_size, args.seed,
                            args.default_model)
        print(f"== {name}: {case['data_summary']}", flush=True)
        runs: dict[str, list] = {tool: [] for tool in tools}
        for repeat in range(repeats):
            for tool in [t for t in tools if repeat == 0 or t not in once]:
                result = launch(script, case, tool, args, root, repeat,
                                extra_env(tool) if extra_env else None)
                loads.append(os.getloadavg()[0])
                if result is None:
                    failed.add(f"{name} / {tool}")
                    continue
                runs[tool].append(result)
                print(f"   {tool:16s} rep {repeat + 1}: {progress_line(result)}", flush=True)
        runs = {tool: results for tool, results in runs.items() if results}
        if runs:
            section = summarize(case, runs, args)
            sections.append(section)
            collected.append((case, runs))
            print("\n" + section + "\n", flush=True)
        write_report(done)
    print(f"written to {out}")
    return out
