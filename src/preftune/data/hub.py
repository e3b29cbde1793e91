"""Where a data path points: a file, a dataset directory (``save_to_disk``, or data files as on
the Hugging Face hub), a hub-cache folder, or ``ORG/NAME`` found in the local hub cache.

Any of them may end in ``:SPLIT``. Nothing is ever downloaded: a dataset that is not on disk is
an error that says how to get it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .records import DataError

DATA_EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what Dataset(Dict).save_to_disk writes
METADATA = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    """A resolved data path: one data file, a saved dataset, or a split's data files."""

    kind: str  # "file" | "saved" | "files"
    path: str  # the file, or the dataset directory
    split: str | None = None
    files: tuple = ()  # kind "files": the split's files, in order
    description: str = ""  # where the rows come from, for the detection report


def locate(path: str) -> Source:
    """Resolve a data path (see the module docstring)."""
    split = None
    if not os.path.exists(path):
        base, _, maybe_split = path.rpartition(":")
        if base and maybe_split and (os.path.isdir(base) or HUB_NAME.match(base)):
            path, split = base, maybe_split
    if os.path.isfile(path):
        if split is not None:
            raise DataError(f"{path}: a single data file has no splits; drop ':{split}'.")
        return Source("file", path, description=path)
    if os.path.isdir(path):
        return _dataset_dir(path, split, path)
    if HUB_NAME.match(path) and not path.lower().endswith(DATA_EXTENSIONS):
        return _dataset_dir(_cached_dataset(path), split, f"{path} (hub cache)")
    raise DataError(f"{path}: file not found. Check the path (relative paths start at "
                    f"{os.getcwd()}).")


def hub_cache_dir() -> Path:
    """The hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                      "huggingface")
    return Path(home) / "hub"


def _cached_dataset(name: str) -> str:
    folder = hub_cache_dir() / ("datasets--" + name.replace("/", "--"))
    if not folder.is_dir():
        raise DataError(
            f"{name}: no such file or directory here, and no dataset of that name in the Hugging "
            f"Face hub cache "
            f"(looked for {folder}). preftune never downloads data: fetch it first, e.g. "
            f"`hf download --repo-type dataset {name}`, or point at a local copy."
        )
    return str(folder)


def _snapshot(folder: Path) -> Path:
    """A hub-cache folder's snapshot: the one ``refs/main`` names, else the newest."""
    ref = folder / "refs" / "main"
    if ref.is_file() and (folder / "snapshots" / ref.read_text().strip()).is_dir():
        return folder / "snapshots" / ref.read_text().strip()
    snapshots = sorted((p for p in (folder / "snapshots").iterdir() if p.is_dir()),
                       key=lambda p: p.stat().st_mtime)
    if not snapshots:
        raise DataError(f"{folder}: a hub-cache folder with no snapshot; fetch the dataset again.")
    return snapshots[-1]


def _dataset_dir(path: str, split: str | None, label: str) -> Source:
    root = Path(path)
    if (root / "snapshots").is_dir():
        root = _snapshot(root)
    if any((root / marker).is_file() for marker in SAVED_MARKERS):
        return Source("saved", str(root), split, description=f"{label} (saved with save_to_disk)"
                      + (f", split {split!r}" if split else ""))
    splits = _split_files(root)
    if not splits:
        raise DataError(
            f"{path}: a directory with no dataset in it: neither written by save_to_disk nor "
            f"holding data files ({', '.join(DATA_EXTENSIONS)}). Point at a data file or a "
            f"dataset directory."
        )
    if split is None:
        if len(splits) > 1 and "train" not in splits:
            raise DataError(f"{path}: the dataset has splits {', '.join(sorted(splits))}; choose "
                            f"one with '{path}:SPLIT', e.g. '{path}:{sorted(splits)[0]}'.")
        split = "train" if "train" in splits else next(iter(splits))
    if split not in splits:
        raise DataError(f"{path}: the dataset has no split {split!r} (splits: "
                        f"{', '.join(sorted(splits))}). Choose one with '{path}:SPLIT'.")
    files = tuple(str(f) for f in splits[split])
    shown = ", ".join(os.path.relpath(f, root) for f in files[:3]) + (", ..." if len(files) > 3
                                                                     else "")
    return Source("files", str(root), split, files,
                  description=f"{label}, split {split!r} ({shown})")


def _split_files(root: Path) -> dict:
    """Data files by split, named as on the hub: the file name before its first ``-`` or ``.``
    (``data/train_prefs-00000-of-00001.parquet``, ``helpful-base/train.jsonl.gz``), or the
    folder when the file name is a number (``default/train/0000.parquet``)."""
    splits: dict = {}
    for file in sorted(root.rglob("*")):
        relative = file.relative_to(root)
        if (not file.is_file() or not file.name.lower().endswith(DATA_EXTENSIONS)
                or file.name in METADATA
                or any(part.startswith(".") for part in relative.parts)):
            continue
        name = re.split(r"[-.]", file.name, maxsplit=1)[0]
        folders = [part for part in relative.parts[:-1] if part != "data"]
        if (not name or name.isdigit()) and folders:
            name = folders[-1]
        splits.setdefault(name, []).append(file)
    return splits
