"""Stopping on a signal: SIGTERM or Ctrl-C lets the current step finish, a checkpoint is
written, and ``TrainingStopped`` says how to continue (a second signal stops at once); and
stopping a run whose steps are all skipped."""

from __future__ import annotations

import math
import signal
import threading


class TrainingStopped(Exception):
    """A signal (or the device's memory) stopped training after a checkpoint: ``summary`` says
    where, ``advice`` how to continue."""

    def __init__(self, summary: str,
                 advice: str = "Run the same command with --resume to continue.",
                 signal_name: str | None = None, code: int | None = None):
        super().__init__(f"{summary} {advice}")
        self.summary, self.signal_name, self.code = summary, signal_name, code

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal (its own, or the one another
        process of the launch got): 143 for SIGTERM, 130 for SIGINT; ``code`` when no signal
        stopped it."""
        if self.code is not None:
            return self.code
        return 128 + getattr(signal, self.signal_name or "SIGINT")


LESS_MEMORY = ("train.gradient_checkpointing=true, or a smaller train.batch_size with "
               "train.gradient_accumulation_steps raised to keep the global batch (batch_size x "
               "accumulation), or LoRA; `--plan` (preftune train, rm train, online, diffusion "
               "train) estimates a run's memory before it starts.")


def first_line(error: Exception) -> str:
    """The first line of ``error``'s message (an allocator's runs on), or its type's name."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def out_of_memory(step: int, total: int, checkpoint, error: Exception) -> TrainingStopped:
    """What to say when the device ran out of memory in ``step`` (0-based) of ``total``, with
    the run's last ``checkpoint`` (None: none written yet)."""
    cause = first_line(error)
    if checkpoint is None:
        return TrainingStopped(
            f"out of memory in step {step + 1} of {total} ({cause}); no checkpoint was written "
            "yet.", f"Start again with --overwrite and less memory: --set {LESS_MEMORY}",
            code=1)
    return TrainingStopped(
        f"out of memory in step {step + 1} of {total} ({cause}); the last checkpoint is "
        f"{checkpoint}.", f"Continue from it with less memory: the same command with --resume "
        f"--set {LESS_MEMORY}", code=1)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training steps: raised, as Ctrl-C raises KeyboardInterrupt, so that
    the command ends with a message instead of dying without a word."""


def raise_terminated(number, frame):
    raise Terminated


# a signal that came during a run's last step (training then finished and saved its model):
# a run of several phases stops at the next one (``stop_if_asked``)
LATE_STOPS: list[str] = []


def stopped_in_last_step(signal_name: str, saved) -> None:
    """A signal came during the last step: training finished (``saved``); what follows stops."""
    print(f"{signal_name} came during the last step: training finished and its model is saved "
          f"in {saved}.")
    LATE_STOPS.append(signal_name)


def stop_if_asked(where: str) -> None:
    """Raise ``TrainingStopped`` for a signal that came during the last step of the training
    just finished and recorded (``where``: after what)."""
    if LATE_STOPS:
        name = LATE_STOPS.pop()
        LATE_STOPS.clear()
        raise TrainingStopped(f"stopped by {name} {where} (it came during the last step).",
                              signal_name=name)


class StopRequests:
    """While active, the first SIGTERM or SIGINT is remembered (``signal`` names it) instead of
    killing the process; a second one stops at once. Outside the main thread it does nothing."""

    def __init__(self):
        self.signal, self._previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._request)
        return self

    def _request(self, number, frame):
        if self.signal is not None:  # asked twice: stop now
            raise Terminated if number == signal.SIGTERM else KeyboardInterrupt
        self.signal = signal.Signals(number).name
        print(f"\n{self.signal}: finishing this step, then writing a checkpoint "
              "(send it again to stop at once)")

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        return False


class SkippedSteps:
    """Steps skipped for a loss or gradient that is not finite, in a row: ``after`` says why
    the run stops (message, advice) once 10 are (or every step of a shorter run), for nothing
    trains in them, and a run that went on would save its starting model as if trained."""

    LIMIT = 10

    def __init__(self, steps_left: int):
        self.limit, self.in_a_row = min(self.LIMIT, steps_left), 0

    def after(self, step: int, record: dict) -> tuple[str, str] | None:
        finite = math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if self.in_a_row < self.limit:
            return None
        return (f"stopped in step {step + 1}: the last {self.in_a_row} steps were all skipped, "
                "their loss or gradient not finite (see the alarms), so nothing trains; the "
                "model was not saved.",
                "Lower train.learning_rate (or the objective's beta), train in float32 or "
                "bfloat16 rather than float16, or check the data the alarms name; then train "
                "again (--overwrite), or --resume from a checkpoint written before.")
