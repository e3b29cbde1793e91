"""The output directory of a training run: checked before any work, never silently reused.

A directory that already holds a run (metrics, checkpoints or a saved model) is continued only
with ``--resume`` (and only under the same settings, see ``check_resume``) or replaced with
``--overwrite``, which moves the old run aside instead of deleting it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from ..config import ConfigError
from ..config_model import Term
from .run_lock import check_free, claim, release

RUN_MARKERS = ("metrics.jsonl", "checkpoints", "run.json", "model")
# settings a resumed run may change: they decide what is logged or kept, not what is trained
SAFE_TO_CHANGE = {"train.log_every", "train.eval_every", "train.save_every",
                  "train.keep_checkpoints", "reference.cache_dir", "output_dir",
                  "train.report_to", "train.tracking_dir", "train.run_name",
                  # how the same numbers are computed (tested equal to eager, unpadded, not
                  # recomputed, unchunked, unpacked): a run short of memory may resume with less
                  "train.compile", "train.compile_mode", "train.pad_to_multiple_of",
                  "train.gradient_checkpointing", "train.checkpoint_every",
                  "train.lean_activations", "train.logps_chunk_tokens", "train.max_row_tokens"}


def holds_run(out: Path) -> bool:
    return out.is_dir() and any((out / name).exists() for name in RUN_MARKERS)


def one_of(resume: bool, overwrite: bool) -> None:
    """Refuse ``--resume`` with ``--overwrite``, before anything is moved or read."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite replaces it; "
                          "give one of them.")


def prepare_output_dir(path: str, resume: bool = False, overwrite: bool = False,
                       aside: Path | None = None) -> Path:
    """``path`` ready to write into, or a ``ConfigError`` naming ``output_dir`` and what to do.
    ``aside``: where the caller moved a previous run (``move_aside``), put back if the new run
    writes nothing."""
    out = Path(path)
    one_of(resume, overwrite)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file, not a directory; choose another "
                          "output_dir (the file is left as it is).")
    if out.is_dir():
        check_free(out)
    if holds_run(out) and not resume:
        if not overwrite:
            from .checkpoint import checkpoints

            resumable_here = (
                "it finished (run.json written): --resume keeps it and trains nothing (in "
                "Python: resume=True); " if (out / "run.json").is_file() else
                "continue it with --resume (in Python: resume=True), "
                if checkpoints(out / "checkpoints") else "it has no checkpoint to continue from; ")
            raise ConfigError(
                f"output_dir {out} already holds a run; {resumable_here}start over with "
                "--overwrite (in Python: overwrite=True; the old run is moved aside, not "
                "deleted), or choose another output_dir.")
        aside = move_aside(out)
    made = not out.exists()
    check_writable(out, "output_dir")
    claim(out, made, aside)
    return out


def replacing_problem(path: Path, named: str, marker: str, kind: tuple[str, str],
                      example: str) -> str | None:
    """Why a command may not write its file at ``path`` (``named``: the flag or what gave it),
    or None: a folder (``example``: a file to name in it), or a file that holds something else
    than an earlier one of its ``kind`` (what one is, and what writes it; ``marker`` is in the
    first 2 KiB of each): a run's metrics, a config, the user's data, left as they are."""
    if path.is_dir():
        return f"{named} {path} is a folder; name the file to write, e.g. {path / example}."
    if path.is_file():
        with open(path, encoding="utf-8", errors="replace") as handle:
            if marker not in handle.read(2048):
                return (f"{named} {path} exists and is not {kind[0]}; {kind[1]} replaces only "
                        "an earlier one: choose another file (this one is left as it is).")
    return None


def check_output_folder(path, flag: str) -> None:
    """The folder a command writes its results into (``flag`` names it), checked before the
    work: not a file, not a new one named like a results file (``out.json``: a folder of
    that name would be made), and one this process may write in when it exists."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is a file; it names the folder the results are "
                          "written into: choose a folder (the file is left as it is).")
    if not folder.exists() and folder.suffix.lower() in (".json", ".jsonl", ".md", ".html"):
        raise ConfigError(f"{flag} {folder} names the folder the results are written into "
                          "(its files have their own names), not a file: give a folder, e.g. "
                          f"{folder.with_suffix('')}.")
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {folder} cannot be written; choose a folder you can write "
                          "to.")
    if not folder.exists():  # made when the results are written: where it would be made
        above = next(p for p in folder.absolute().parents if p.exists())
        if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {folder} cannot be made: {above} is "
                              f"{'a file' if not above.is_dir() else 'not writable'}; choose "
                              "a folder you can write to.")


def check_writable(directory: Path, key: str) -> None:
    """``directory`` made and written to once, or a ``ConfigError`` naming the config ``key``
    it comes from: before the work whose result goes there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".preftune-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"{key} {directory} cannot be written ({error.strerror or error}); "
                          "choose a directory you can write to, with free space.") from None


def on_main_process(accelerator, work):
    """``work()`` on the main process alone, its result there (None elsewhere). Under a launch,
    an error it raises is sent to every process, which raise it too: all stop alike at once,
    not the others later, waiting at a collective the main process never reaches."""
    if accelerator is None or accelerator.num_processes == 1:
        return work()
    from accelerate.utils import broadcast_object_list

    outcome, result = [None], None
    if accelerator.is_main_process:
        try:
            result = work()
        except Exception as error:  # (any kind: each process re-raises the same one)
            outcome = [error]
    broadcast_object_list(outcome)
    if outcome[0] is not None:
        raise outcome[0]
    return result


def start_run(config, accelerator, resume: bool, overwrite: bool) -> bool:
    """The output directory of ``config`` made ready (and a resume checked) by the main
    process, before any process loads anything. Returns whether ``resume`` found the run
    already finished (its ``run.json`` and its model written, under the same settings):
    nothing to train. A finished run whose model was deleted finishes again from its last
    checkpoint."""
    out = Path(config.output_dir)
    if resume and not overwrite and finished(out, config):
        def say_finished():
            check_free(out)
            check_resume(config, accelerator.num_processes)
            print(f"--resume: {out} holds a finished run (run.json, its model saved); nothing "
                  "is left to train. Start over with --overwrite, or choose another "
                  "output_dir.")
        on_main_process(accelerator, say_finished)
        accelerator.wait_for_everyone()
        return True
    on_main_process(accelerator, lambda: _prepare(config, accelerator, resume, overwrite))
    accelerator.wait_for_everyone()
    return False


def _prepare(config, accelerator, resume: bool, overwrite: bool) -> None:
    """``start_run``'s work on the main process: the output directory, a resume checked."""
    if resume and not overwrite:
        from .checkpoint import checkpoints

        out = Path(config.output_dir)
        if not out.exists():
            where = "" if out.is_absolute() else f" (from the working directory {Path.cwd()})"
            raise ConfigError(f"--resume: {out}{where} does not exist, so there is no run "
                              "to continue. Run from the directory the run was started "
                              "in, or give output_dir as an absolute path; or start the "
                              "run without --resume.")
        if out.is_dir():
            check_free(out)  # a run still going there has written no checkpoint yet
        if not checkpoints(out / "checkpoints"):
            instead = ("start over with --overwrite (the old run is moved aside, not "
                       "deleted)" if holds_run(out) else "start the run without --resume")
            raise ConfigError(f"--resume: {out} holds no checkpoint to continue from (one "
                              "is written every train.save_every steps and when a signal "
                              f"stops a run); {instead}.")
    prepare_output_dir(config.output_dir, resume, overwrite)
    if resume:
        check_resume(config, accelerator.num_processes)


def finished(out: Path, config) -> bool:
    """Whether ``out`` holds a finished run of ``config``: its ``run.json`` and the model it
    writes last (``model/``; ``adapter/`` for LoRA without the merged copy)."""
    lora = getattr(config.model, "lora", None)  # (diffusion LoRA always writes model/)
    last = "adapter" if lora is not None and not getattr(lora, "save_merged", True) else "model"
    return (out / "run.json").is_file() and (out / last).is_dir()


def resumable(config) -> bool:
    """Whether ``config.output_dir`` holds a run under ``config``'s settings that ``--resume``
    continues: one with a checkpoint, or a finished one (which it leaves as it is)."""
    from .checkpoint import checkpoints

    out = Path(config.output_dir)
    return (bool(checkpoints(out / "checkpoints")) or finished(out, config)) and \
        same_settings(config)


def same_settings(config, may_change: frozenset = frozenset()) -> bool:
    """Whether ``check_resume`` lets ``config`` continue the run in its output_dir."""
    try:
        check_resume(config, may_change=may_change)
    except ConfigError:
        return False
    return True


def move_aside(out: Path) -> Path:
    """Rename a previous run to ``OUT.old-TIME`` (``-2``, ``-3``, ... after it when that
    name is taken: two overwrites in one second); never delete it. Returns the new path."""
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"{out} is the working directory (or holds it), which cannot be moved "
                          "aside; give the run its own folder (e.g. --output-dir runs/NAME), or "
                          "run from another directory.")
    check_free(out)
    release(out)
    if out.name in ("", ".", ".."):  # ('runs/..' and the like name no folder of their own)
        out = Path(os.path.abspath(out))
    stem = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    aside, number = stem, 1
    while aside.exists() or aside.is_symlink():
        number += 1
        aside = stem.with_name(f"{stem.name}-{number}")
    out.rename(aside)
    print(f"the previous run in {out} was moved to {aside} (not deleted)")
    return aside


class DataChanged(ConfigError):
    """``--resume`` read other training data than its run's."""


def check_same_data(output_dir, report: dict, finished: bool = False) -> None:
    """A run resumed in ``output_dir`` trains on the examples it started on, and a finished
    run kept by ``--resume`` was trained on the data read now: refuse when the data read
    again (``report``, its ``train_fingerprint``) differs from the saved
    ``data_report.json``'s (an edited file, another tokenizer or chat template)."""
    saved_path = Path(output_dir) / "data_report.json"
    if not saved_path.is_file() or not (finished or any(
            (Path(output_dir) / "checkpoints").glob("step-*"))):
        return  # (nothing to resume: a fresh run writes its own report)
    try:
        saved = json.loads(saved_path.read_text())
    except ValueError:
        raise ConfigError(f"--resume: {saved_path}, what the run trained on, cannot be read "
                          "(damaged?), so the data cannot be checked to be the same; restore "
                          "the file, or start over with --overwrite (the old run is moved "
                          "aside).") from None
    # (a run of an earlier version kept none, or no image fingerprint)
    changed = [what for key, what in (("train_fingerprint", "other tokens"),
                                      ("train_images_fingerprint", "other image content"))
               if saved.get(key) is not None and saved.get(key) != report.get(key)]
    if not changed:
        return
    counts = (saved.get("train", {}).get("kept"), report.get("train", {}).get("kept"))
    what = ("its finished model was trained on other examples than these" if finished else
            "the resumed steps would train on other examples than the run's")
    raise DataChanged(f"--resume: the training data read now differs from what {output_dir} "
                      f"{'trained' if finished else 'started'} on ({counts[0]} examples then, "
                      f"{counts[1]} now, {' and '.join(changed)}); {what}. Restore the data "
                      "(its images, the tokenizer), or start over with --overwrite (the old run "
                      "is moved aside).")


def _settable(keys: set, flat: dict, config) -> list[str]:
    """``keys`` that ``config`` has and reads (a diffusion run has the language-model keys of
    the train section, which it refuses), in order."""
    return sorted(key for key in keys
                  if key in flat and key not in getattr(config, "INERT_KEYS", ()))


def check_resume(config, processes: int = 1, may_change: frozenset = frozenset()) -> None:
    """Refuse ``--resume`` when settings of ``config`` that change training differ from its
    run's ``config.yaml``; name them, and the ones that may change (``SAFE_TO_CHANGE`` and the
    caller's ``may_change``). The per-process batch may change with the number of processes as
    long as the global batch (batch_size x accumulation x processes, recorded in the
    checkpoint) stays the same. A key the saved file lacks (added by a later preftune version)
    counts as its default in ``config``'s class."""
    out = Path(config.output_dir)
    safe = SAFE_TO_CHANGE | may_change
    saved_file = out / "config.yaml"
    if not saved_file.exists():
        from .checkpoint import checkpoints

        if checkpoints(out / "checkpoints"):  # a run's checkpoints without its settings
            raise ConfigError(f"--resume in {out}: its config.yaml, the settings the run "
                              "started with, is gone, so a resumed run cannot be checked to "
                              "train as it started; put the file back (a copy of the run's "
                              "config), or start over with --overwrite.")
        return
    defaults = type(config).model_construct().model_dump()
    try:
        given = yaml.safe_load(saved_file.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"--resume in {out}: {saved_file}, the settings the run started with, "
                          "is not valid YAML (damaged or edited), so a resumed run cannot be "
                          "checked to train as it started; restore the file (a copy of the "
                          "run's config), or start over with --overwrite.") from None
    saved = {**_flat(defaults), **_flat(_terms_with_defaults(given, config))}
    now = _flat(_terms_with_defaults(config.model_dump(), config))
    changed = sorted(key for key in set(saved) | set(now)
                     if saved.get(key) != now.get(key) and key not in safe)
    split = {"train.batch_size", "train.gradient_accumulation_steps"}
    if changed and not set(changed) <= split:
        shown = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        raise ConfigError(
            f"--resume in {out}: the settings differ from the run's config.yaml ({shown}"
            f"{'; ...' if len(changed) > 6 else ''}). A resumed run must train as it started; "
            f"only {', '.join(_settable(safe, now, config))} may change, and the per-process batch "
            "if the global batch (batch_size x accumulation x processes) stays the same. Start "
            "a new run with another output_dir (or --overwrite) to train differently.")
    batch, steps = now["train.batch_size"], now.get("train.gradient_accumulation_steps", 1)
    started = _recorded_global_batch(out, saved)
    if batch * steps * processes != started:
        raise ConfigError(
            f"--resume in {out}: the global batch would be {batch * steps * processes} "
            f"(batch_size {batch} x accumulation {steps} x {processes} process"
            f"{'es' if processes > 1 else ''}), and the run started with {started}; a resumed "
            "run must train as it started. Launch the run's number of processes, or set "
            f"train.batch_size so that the product is {started} again.")
    was = (saved["train.batch_size"], saved.get("train.gradient_accumulation_steps", 1))
    # (with accumulation, the examples of a micro-batch depend on the processes too)
    from ..objectives.compose import Objective

    names = Objective.split_by_config(config, steps != was[1] or (steps > 1 and batch != was[0]),
                                      batch != was[0])
    if names:
        raise ConfigError(
            f"--resume in {out}: {' and '.join(names)} reads each micro-batch as a whole, so "
            f"batch_size {batch} x accumulation {steps} would train other steps than the "
            f"run's batch_size {was[0]} x accumulation {was[1]}; keep those (launch the run's "
            "number of processes).")


def _recorded_global_batch(out: Path, saved: dict) -> int:
    """The global batch of the newest checkpoint whose ``state.json`` reads (the trainer
    passes over a damaged one too; older checkpoints: one process assumed)."""
    import json

    from .checkpoint import checkpoints

    for checkpoint in reversed(checkpoints(out / "checkpoints")):
        try:
            state = json.loads((checkpoint / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("global_batch"):
            return state["global_batch"]
        break
    return saved["train.batch_size"] * saved.get("train.gradient_accumulation_steps", 1)


def _terms_with_defaults(tree: dict, config) -> dict:
    """``tree`` (a dump of ``config``'s kind) with the parameters its objective terms (or
    reward loss) leave out at their defaults, so that giving a default explicitly is no change."""
    tree = dict(tree)
    for key in type(config).model_fields:
        value = getattr(config, key)
        kind = type(value[0] if isinstance(value, list) and value else value)
        if key not in tree or not issubclass(kind, Term):
            continue
        terms = tree[key] if isinstance(tree[key], list) else [tree[key]]
        terms = [kind.with_defaults({"name": term} if isinstance(term, str) else term)
                 if isinstance(term, (str, dict)) else term for term in terms]
        tree[key] = terms if isinstance(value, list) else terms[0]
    return tree


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(_flat(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def write_json(path: Path, value) -> None:
    """``value`` as JSON in ``path``, written whole or not at all (staged, then renamed)."""
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(value, indent=2))
    os.replace(staging, path)
