"""One run per output directory at a time: a lock file in it that the run's process holds
from the moment it claims the directory until the run ends, however it ends (the lock is
removed when the run function returns or raises, and the operating system releases an flock
when its process dies, so a killed run never leaves a stale lock).

Another process that starts a run, a ``--resume`` or an ``--overwrite`` on that directory
meanwhile is refused by name. The same process may claim a directory again (a notebook that
resumes its own run)."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import time
from pathlib import Path

from ..config import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not guarded there
    fcntl = None

LOCK = ".preftune.lock"
_HELD: dict[Path, int] = {}  # resolved directory -> the open, locked file
# resolved directory this process made for a run -> (it as given, the run moved aside for it)
_MADE: dict[Path, tuple[Path, Path | None]] = {}
# what a run writes before its work starts: a run that stops with nothing else written trained
# nothing, and a directory it made is taken back with these in it
HEADER = frozenset({"config.yaml", "data_report.json"})


def claim(out: Path, made: bool = False, aside: Path | None = None) -> None:
    """Hold ``out``'s lock for the rest of this process, or refuse: another process runs there.
    ``made``: this process made ``out`` (after moving the run there to ``aside``), so a run
    that stops before writing anything removes it again (and puts ``aside`` back)."""
    key = out.resolve()
    if fcntl is None or key in _HELD:
        return
    handle = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(handle, 300).decode(errors="replace").strip() or "another process"
        os.close(handle)
        raise _in_use(out, owner) from None
    os.ftruncate(handle, 0)
    os.write(handle, f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    _HELD[key] = handle
    if made:
        _MADE[key] = (out, aside)


def check_free(out: Path) -> None:
    """Refuse when another process holds ``out``'s lock (before moving or reusing it)."""
    path = out / LOCK
    if fcntl is None or out.resolve() in _HELD or not path.is_file():
        return
    handle = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(out, path.read_text().strip() or "another process") from None
    finally:
        os.close(handle)


def release(out: Path) -> None:
    """Let go of ``out``'s lock, and remove the file, if this process holds it; then undo
    ``claim``'s making of ``out`` if nothing but the run's header (``HEADER``) and empty
    folders were written there: a refused run (bad data, a missing model, a model that cannot
    take the data, a scorer that does not load)."""
    key = out.resolve()
    handle = _HELD.pop(key, None)
    if handle is not None:
        (key / LOCK).unlink(missing_ok=True)  # still held: no other process took it meanwhile
        os.close(handle)
    if key in _MADE:
        given, aside = _MADE.pop(key)
        if key.is_dir() and {path.name for path in key.iterdir()
                             if not _empty_folder(path)} <= HEADER:
            for path in key.iterdir():
                if path.is_dir():
                    _remove_empty(path)
                else:
                    path.unlink()
        with contextlib.suppress(OSError):  # not empty: it holds what the run wrote
            key.rmdir()
            if aside is not None:
                aside.rename(given)
                print(f"{aside} was moved back to {given}: the new run wrote nothing")


def _empty_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding nothing but (nested) empty folders."""
    return path.is_dir() and not path.is_symlink() and all(
        _empty_folder(inner) for inner in path.iterdir())


def _remove_empty(folder: Path) -> None:
    for inner in folder.iterdir():
        _remove_empty(inner)
    folder.rmdir()


def holding_output_dirs(run):
    """``run`` releases the output directories it claimed when it returns or raises (and
    only those: an online run's rounds release theirs, the run keeps its own)."""

    @functools.wraps(run)
    def wrapped(*args, **kwargs):
        before = set(_HELD)
        try:
            return run(*args, **kwargs)
        finally:
            for key in set(_HELD) - before:
                release(key)

    return wrapped


def _in_use(out: Path, owner: str) -> ConfigError:
    return ConfigError(f"output_dir {out} is in use by another preftune run ({owner}); wait for "
                       "it to end (or stop it: it writes a checkpoint), or choose another "
                       "output_dir.")
