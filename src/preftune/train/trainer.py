"""The optimization loop every trainer shares: setup, one step, finish.

A ``Task`` says what is trained and how a batch becomes per-example losses (a policy under a
preference objective, a reward model under a reward loss, one online round ...). ``Trainer``
does everything else the same way for all of them: AdamW (or AdamW inside backward), the
learning-rate schedule, gradient accumulation and clipping, skipping non-finite steps, metrics,
alarms, evaluation, atomic checkpoints and resume, and the final save.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ..config import TrainConfig
from .alarms import Alarms, WeightProbe
from .batches import MicroBatches
from .checkpoint import (checkpoints, gather_training_state, latest_checkpoint, load_checkpoint,
                         save_checkpoint)
from .engines import SHARDED, check_engine, configure_deepspeed, whole_models
from .gradients import clipped_norm
from .logging import MetricsLog, progress_bar
from .memory import return_freed_tensors_to_the_os
from .model_card import write_model_cards
from .output import write_json
from .optimizers import embedding_weights, make_optimizer
from .stopping import (LATE_STOPS, SkippedSteps, StopRequests, TrainingStopped,
                       out_of_memory, stopped_in_last_step)
from .schedule import example_stream, lr_lambda
from .tracking import Trackers


class Task(Protocol):
    """What a trainer trains. ``module`` holds the trainable parameters; ``losses`` runs it on
    one micro-batch and returns per-example losses [E] plus ``{name: (sum, count)}`` metrics.
    A task whose reference moves with the policy (TR-DPO) has a ``reference_sync``
    (``model.reference_sync.ReferenceSync``): the trainer calls it after every update and
    keeps its state in checkpoints; likewise an ``objective_state`` (an objective's running
    statistics: ``objectives.compose.Objective``), which the task updates itself."""

    name: str
    module: torch.nn.Module
    train_examples: list
    eval_examples: list
    make_batch: Callable
    needs_reference: bool
    batches_ahead: bool  # make_batch depends only on its examples: build the next one early

    def losses(self, module, batch, step: int) -> tuple[torch.Tensor, dict]: ...

    def evaluate(self, module, step: int) -> dict: ...

    def save(self, module, output_dir: Path) -> None: ...

    def run_info(self) -> dict: ...


def add_metrics(totals: dict, new: dict) -> None:
    """Add ``{name: (sum, count)}`` into ``totals``; values may be numbers or device tensors."""
    for name, (value, count) in new.items():
        old_value, old_count = totals.get(name, (0.0, 0.0))
        totals[name] = (old_value + value, old_count + count)


def read_values(values: list, device=None) -> list[float]:
    """Numbers and tensors -> floats, with one read of the device for all the tensors."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    read = iter(torch.stack([t.detach().double().reshape(()) for t in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


def means(totals: dict) -> dict:
    """sum / count of each metric (one read of the device for all of them)."""
    flat = read_values([v for pair in totals.values() for v in pair])
    return {name: flat[2 * k] / flat[2 * k + 1] for k, name in enumerate(totals)
            if flat[2 * k + 1]}


class Trainer:
    """Setup in ``__init__``, ``step(k)`` runs optimizer step k, ``finish()`` saves; ``run()``
    does all three. The task's module is trained in place."""

    def __init__(self, task: Task, cfg: TrainConfig, output_dir: Path, accelerator: Accelerator,
                 total_steps: int, resume: bool = False, show_progress: bool = True,
                 shuffle: bool = True, started: float | None = None):
        self.started = time.perf_counter() if started is None else started  # setup's start
        self.task, self.cfg, self.output_dir = task, cfg, Path(output_dir)
        self.accelerator, self.total_steps = accelerator, total_steps
        # several processes (accelerate launch): each trains on its own share of every step's
        # examples; the step's global batch is batch_size x accumulation x processes
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.main = accelerator.is_main_process
        self.local_per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        self.examples_per_step = self.local_per_step * self.world
        if self.main and self.examples_per_step > len(task.train_examples):
            print(f"note: a step takes {self.examples_per_step} examples (batch_size x "
                  f"accumulation x processes) and the data has {len(task.train_examples)}: "
                  "some examples appear twice in each step.")
        self.trainable = [p for p in task.module.parameters() if p.requires_grad]
        if cfg.optimizer_in_backward and accelerator.device.type == "cpu":
            return_freed_tensors_to_the_os()  # let freed gradients leave the process
        optimizer = make_optimizer(cfg, self.trainable, embedding_weights(task.module))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total_steps, int(cfg.warmup_ratio * total_steps), cfg.schedule))
        check_engine(accelerator, cfg, task)
        self.sharded = accelerator.distributed_type in SHARDED
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:  # clipping and the update run inside DeepSpeed's step
            configure_deepspeed(accelerator, cfg, task.module)
        self.module, self.optimizer = accelerator.prepare(task.module, optimizer)
        # FSDP replaces the parameters by sharded ones (accelerate re-points the optimizer)
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.in_backward = optimizer if cfg.optimizer_in_backward else None
        self.reference_sync = getattr(task, "reference_sync", None)
        # what else moves in training and resumes from checkpoints, as tensors
        self.states = {name: holder for name, holder in
                       (("reference", self.reference_sync),
                        ("objective", getattr(task, "objective_state", None)))
                       if holder is not None}

        self.start_step, self.resumed_state = 0, {}
        self.stop_signal, self.stop_requested = None, None  # set by run(), step()
        self.checkpoint_dir = self.output_dir / "checkpoints"
        if resume:
            self.start_step = self._resume()
        # (not DeepSpeed: its loss scaler skips the first steps of a float16 run by design)
        self.skipped = None if self.deepspeed else SkippedSteps(total_steps - self.start_step)
        self.log = MetricsLog(self.output_dir / "metrics.jsonl", keep_through_step=self.start_step,
                              trackers=Trackers(cfg, self.output_dir, self.start_step)
                              ) if self.main else None
        # a reference synced to the policy (TR-DPO) makes implied rewards 0 by design: only
        # the weights tell whether the policy moves
        self.alarms = Alarms(self.output_dir / "alarms.jsonl",
                             task.needs_reference and self.reference_sync is None,
                             WeightProbe(self.trainable))
        if resume and self.main:
            self.alarms.resume(self.resumed_state.get("alarms"), self.start_step)
        self.order = example_stream(len(task.train_examples), self.examples_per_step,
                                    total_steps, cfg.seed, shuffle=shuffle)
        self.batches = MicroBatches(task, self.order, self.examples_per_step, self.rank,
                                    cfg.batch_size, cfg.gradient_accumulation_steps, total_steps,
                                    accelerator.device, ahead=task.batches_ahead)
        self.bar = progress_bar(total_steps, f"train {task.name}", initial=self.start_step,
                                disable=not (show_progress and self.main), unit="step")

    def _resume(self) -> int:
        """Load the newest checkpoint that reads back whole; a damaged one (empty, truncated)
        is named and passed over for the one before it."""
        found = checkpoints(self.checkpoint_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.checkpoint_dir}")
        for checkpoint in reversed(found):
            try:
                step = load_checkpoint(checkpoint, self.module, self.optimizer,
                                       self.scheduler, self.states)
            except Exception as error:  # any damage: try the previous checkpoint
                print(f"--resume: skipped {checkpoint}, which cannot be read "
                      f"({type(error).__name__}: {str(error)[:120]})")
                continue
            print(f"resumed from {checkpoint} (step {step})")
            self.resumed_state = json.loads((checkpoint / "state.json").read_text())
            return step
        raise FileNotFoundError(f"--resume: none of the {len(found)} checkpoints under "
                                f"{self.checkpoint_dir} can be read; start over with --overwrite")

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.module)

    def run(self, before_step: Callable[[int], None] | None = None) -> Path:
        """Every remaining step, then ``finish``. SIGTERM or SIGINT (preemption, Ctrl-C) lets
        the current step end, writes a checkpoint and raises ``TrainingStopped``; the trackers'
        runs end whatever stops the loop (MLflow's as KILLED by a signal, else FAILED)."""
        LATE_STOPS.clear()  # (one left by an earlier run of this process)
        with StopRequests() as stop:
            self.stop_signal = stop
            try:
                for step in range(self.start_step, self.total_steps):
                    if before_step is not None:
                        before_step(step)
                    try:
                        self.step(step)
                    except torch.OutOfMemoryError as error:
                        raise self._out_of_memory(step, error) from None
                    if self.stop_requested and step + 1 < self.total_steps:
                        self.bar.close()
                        self.batches.close()
                        path = self.save(step + 1)
                        by = stop.signal or f"{self.stop_requested} to another process"
                        raise TrainingStopped(
                            f"stopped by {by} after step {step + 1} of {self.total_steps}; "
                            f"checkpoint written to {path}.", signal_name=self.stop_requested)
            except BaseException as error:
                if self.main:
                    self.log.close("KILLED" if getattr(error, "signal_name", None) else "FAILED")
                raise
        saved = self.finish()
        if self.stop_requested:  # in the last step: nothing is left to stop, but what follows
            stopped_in_last_step(self.stop_requested, saved)
        return saved

    def step(self, step: int) -> dict:
        """Optimizer step ``step`` (0-based): accumulate, clip, update, log, evaluate, save.

        Losses, metrics and the gradient norm stay on the device; the update is skipped there
        when the loss or the gradient is not finite; the step's numbers are read back once, at
        its end (the only wait for the device per step).
        """
        cfg, task = self.cfg, self.task
        started = time.perf_counter()
        indices = self.order[step * self.examples_per_step : (step + 1) * self.examples_per_step]
        sums: dict = {}
        real_tokens = slots = 0
        for micro in range(cfg.gradient_accumulation_steps):
            batch = self.batches.get(step, micro)
            losses, metrics = task.losses(self.module, batch, step)
            # Sum over examples / this process's examples per step, and DDP averages over
            # processes: the step's gradient is the mean over all its examples however they
            # are split into micro-batches and processes.
            self._backward(losses.sum() / self.local_per_step,
                           last=micro + 1 == cfg.gradient_accumulation_steps)
            add_metrics(sums, metrics)
            real_tokens += batch.real_tokens
            slots += batch.attention_mask.numel()
        # a signal may reach one process only: every process stops when any was signalled,
        # and says which signal (SIGTERM wins)
        mine = self.stop_signal.signal if self.stop_signal is not None else None
        sums["_tokens"] = (real_tokens, slots)
        sums["_stop"] = (float(mine == "SIGTERM"), float(mine == "SIGINT"))
        if self.world > 1:  # every process logs and decides on the whole step's numbers
            sums = self._summed(sums)
        if self.in_backward is not None:
            grad_norm = self.in_backward.grad_norm()  # its updates already ran (no clipping)
            self.optimizer.step()  # does nothing but tell the LR schedule the step happened
        elif self.deepspeed:  # DeepSpeed clipped and stepped in the last backward
            grad_norm = torch.as_tensor(self.module.get_global_grad_norm() or 0.0)
        else:
            grad_norm = clipped_norm(self.trainable, cfg.max_grad_norm,
                                     self.accelerator if self.sharded else None)
            self._update_if_finite(sums["loss"][0], grad_norm)
        learning_rate = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.reference_sync is not None:
            self.reference_sync.after_update(step)

        names = list(sums)
        flat = read_values([v for n in names for v in sums[n]] + [grad_norm])  # the one read
        values = {n: (flat[2 * k], flat[2 * k + 1]) for k, n in enumerate(names)}
        (real_tokens, slots), stop = values.pop("_tokens"), values.pop("_stop")
        self.stop_requested = "SIGTERM" if stop[0] > 0 else "SIGINT" if stop[1] > 0 else None
        seconds = time.perf_counter() - started
        record = {"step": step + 1, **{n: v / c for n, (v, c) in values.items() if c},
                  "lr": learning_rate, "grad_norm": flat[-1],
                  "tokens_per_second": real_tokens / seconds,
                  "padding_fraction": 1.0 - real_tokens / slots, "step_seconds": seconds}
        last = step + 1 == self.total_steps  # held-out data is always measured at the end
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or (last and task.eval_examples):
            record.update({f"eval/{k}": v for k, v in task.evaluate(self.module, step).items()})
        examples = [task.train_examples[i] for i in indices]
        diverged = not math.isfinite(record["loss"]) and self._weights_non_finite()
        raised = self.alarms.check(record, [ex.origin for ex in examples], examples,
                                   diverged) if self.main else []
        if raised:
            record["alarms"] = [alarm["kind"] for alarm in raised]
        if self.main and ((step + 1) % cfg.log_every == 0 or last or "eval/loss" in record
                          or raised):
            self.log.write(record)
        if diverged:
            raise self._diverged(step)
        stuck = self.skipped.after(step, record) if self.skipped is not None else None
        if stuck:
            raise self._stopped(*stuck)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}",
                             **({"acc": f"{record['rewards/accuracies']:.2f}"}
                                if "rewards/accuracies" in record else {}))
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < self.total_steps:
            self.save(step + 1)
        return record

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Gradients of ``loss``, added to the step's. DeepSpeed is told which micro-batch ends
        the step (its optimizer steps there) and that the loss is already scaled."""
        if not self.deepspeed:
            self.accelerator.backward(loss)
            return
        self.accelerator.gradient_state._set_sync_gradients(last)
        self.accelerator.backward(loss, scale_wrt_gas=False)
        self.accelerator.gradient_state._set_sync_gradients(True)

    def _update_if_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """``optimizer.step()``, unless the loss or the gradient norm is not finite (a NaN
        would poison the weights). Torch's fused AdamW takes the decision on the device, as
        under a GradScaler (``found_inf`` skips weights, moments and step count alike); other
        optimizers need it read on the host."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        found_inf = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
        if inner.defaults.get("fused"):
            inner.found_inf = found_inf
            self.optimizer.step()
        elif not found_inf.item():
            self.optimizer.step()

    def save(self, step: int) -> Path:
        """A checkpoint after ``step`` steps, written by the main process only (under FSDP
        every process helps gather the weights and optimizer state)."""
        path = self.checkpoint_dir / f"step-{step:08d}"
        if self.main or self.sharded:
            weights, optimizer_state = gather_training_state(self.module, self.optimizer,
                                                             keep=self.main)
        if self.main:
            path = save_checkpoint(self.checkpoint_dir, step, weights, optimizer_state,
                                   self.scheduler, self.cfg.keep_checkpoints,
                                   global_batch=self.examples_per_step,
                                   states=self.states,
                                   alarms=self.alarms.state(),
                                   train_seconds=self.train_seconds())
        self.accelerator.wait_for_everyone()
        return path

    def train_seconds(self) -> float:
        """Wall seconds from setup to now, the earlier runs' of a resumed one included."""
        return self.resumed_state.get("train_seconds", 0.0) + time.perf_counter() - self.started

    def _out_of_memory(self, step: int, error: Exception) -> TrainingStopped:
        """After the device ran out of memory in ``step``: its partial gradients dropped, the
        steps done since the start (or the resumed checkpoint) checkpointed, when one process
        trains (several would wait on each other's collectives), and what to change."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bar.close()
        self.batches.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        path = None
        if self.world == 1 and step > self.start_step:
            path = self.save(step)
        return out_of_memory(step, self.total_steps, path or latest_checkpoint(
            self.checkpoint_dir), error)

    def _weights_non_finite(self) -> bool:
        """Whether any process's trainable weights hold NaN or inf (every process asks: they
        all read the same non-finite loss)."""
        count = self.alarms.weights.non_finite().to(self.accelerator.device)
        if self.world > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return bool(count.item())

    def _diverged(self, step: int) -> TrainingStopped:
        """The run stops: its weights are NaN or inf, so no later step can train, and the
        model is not saved as if it had finished."""
        return self._stopped(
            f"stopped in step {step + 1} of {self.total_steps}: the trainable weights became NaN "
            "or inf (see the weights_non_finite alarm); the model was not saved.",
            "Lower train.learning_rate and train again (--overwrite), or --resume from a "
            "checkpoint written before it went wrong.")

    def _stopped(self, message: str, advice: str) -> TrainingStopped:
        self.bar.close()
        self.batches.close()
        return TrainingStopped(message, advice, code=1)

    def _summed(self, sums: dict) -> dict:
        """Metric sums, token counts and stop requests added up over all processes: one
        collective, whose result stays on the device."""
        device = self.accelerator.device
        names = list(sums)
        table = torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                                          for v in sums[n]]) for n in names])
        table = self.accelerator.reduce(table, reduction="sum")
        return {n: (table[k, 0], table[k, 1]) for k, n in enumerate(names)}

    def finish(self) -> Path:
        """Save the trained model and ``run.json`` (main process); returns the output dir."""
        self.bar.close()
        self.batches.close()
        module = self.unwrapped
        if self.sharded:  # gathered (every process takes part), loaded into a plain copy
            state = self.accelerator.get_state_dict(self.module)
            if self.main:
                with whole_models(self.accelerator):
                    module = self.task.unsharded(state)
        if self.main:
            self.log.close()
            self.task.save(module, self.output_dir)
            info = {**self.task.run_info(), "device": self.accelerator.device.type,
                    "processes": self.world, "engine": self.accelerator.distributed_type.value,
                    "steps": self.total_steps, "train_seconds": round(self.train_seconds(), 1),
                    "train_examples": len(self.task.train_examples),
                    "eval_examples": len(self.task.eval_examples)}
            write_model_cards(self.output_dir, info)
            write_json(self.output_dir / "run.json", info)  # last: it marks the run finished
        self.accelerator.wait_for_everyone()
        return self.output_dir
