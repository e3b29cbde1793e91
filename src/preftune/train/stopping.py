"""Stopping on a signal: SIGTERM or Ctrl-C lets the current step finish, a checkpoint is
written, and ``TrainingStopped`` says how to continue (a second signal stops at once)."""

from __future__ import annotations

import signal
import threading


class TrainingStopped(Exception):
    """A signal stopped training after a checkpoint: ``summary`` says where, ``advice`` how
    to continue."""

    def __init__(self, summary: str,
                 advice: str = "Run the same command with --resume to continue.",
                 signal_name: str | None = None):
        super().__init__(f"{summary} {advice}")
        self.summary, self.signal_name = summary, signal_name

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal: 143 for SIGTERM, 130 for SIGINT
        (also when another process was signalled)."""
        return 128 + getattr(signal, self.signal_name or "SIGINT")


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training steps: raised, as Ctrl-C raises KeyboardInterrupt, so that
    the command ends with a message instead of dying without a word."""


def raise_terminated(number, frame):
    raise Terminated


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
