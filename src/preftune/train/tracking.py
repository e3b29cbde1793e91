"""Experiment trackers (``train.report_to``): accelerate's TensorBoard, MLflow and W&B trackers,
fed every record that ``metrics.jsonl`` gets and, at the start, the run's config.

The tracker classes are used directly rather than through ``Accelerator(log_with=...)``:
``end_training`` would also destroy the process group, which later work in the same process
(online rounds, ``compare``, the demo's evaluation) still needs, and accelerate leaves out a
tracker whose package is missing without an error. Only the main process creates trackers.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import yaml

# tracker -> (module it imports, preftune extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
            "wandb": ("wandb", "wandb")}
EXPERIMENT = "preftune"  # MLflow experiment and W&B project (their environment variables win)


def check_installed(names) -> None:
    """A ``ValueError`` naming the extra to install for each chosen tracker that is missing."""
    missing = [name for name in names if importlib.util.find_spec(PACKAGES[name][0]) is None]
    if missing:
        extras = ",".join(PACKAGES[name][1] for name in missing)
        raise ValueError(f"train.report_to lists {', '.join(missing)}, which is not installed; "
                         f"install it with: pip install 'preftune[{extras}]' (or remove it from "
                         "train.report_to).")


def tracker_values(record: dict) -> dict:
    """A metrics record as tracker values: numbers as they are; a list of names (``alarms``)
    as ``alarms/<kind>: 1`` per alarm raised at that step. ``step`` is the tracker's step."""
    values = {}
    for name, value in record.items():
        if name == "step":
            continue
        if isinstance(value, list):
            values.update({f"{name}/{item}": 1 for item in value})
        elif isinstance(value, (int, float)):
            values[name] = value
    return values


def hyperparameters(output_dir: Path) -> dict:
    """The run's ``config.yaml`` flattened to ``section.key`` values trackers accept (lists and
    empty values as JSON text)."""
    path = Path(output_dir) / "config.yaml"
    tree = yaml.safe_load(path.read_text()) if path.exists() else {}
    flat: dict = {}

    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, (bool, int, float, str)):
            flat[prefix[:-1]] = node
        else:
            flat[prefix[:-1]] = json.dumps(node)

    walk(tree or {}, "")
    return flat


class Trackers:
    """The trackers of ``train.report_to`` (none: nothing happens), started with the run's
    hyperparameters."""

    def __init__(self, cfg, output_dir: Path):
        self.trackers = []
        if not cfg.report_to:
            return
        output_dir = Path(output_dir)
        directory = Path(cfg.tracking_dir or output_dir / "tracking").resolve()
        run_name = cfg.run_name or output_dir.resolve().name
        self.trackers = [_tracker(name, directory, run_name) for name in cfg.report_to]
        config = hyperparameters(output_dir)
        for tracker in self.trackers:
            tracker.start()
            tracker.store_init_configuration(config)

    def log(self, record: dict) -> None:
        values = tracker_values(record)
        for tracker in self.trackers:
            tracker.log(values, step=record["step"])

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _tracker(name: str, directory: Path, run_name: str):
    from accelerate import tracking

    if name == "tensorboard":  # event files under tracking_dir/tensorboard/RUN_NAME
        return tracking.TensorBoardTracker(run_name, directory / "tensorboard")
    if name == "mlflow":
        if "MLFLOW_TRACKING_URI" not in os.environ:  # offline: a file store in tracking_dir
            import mlflow

            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((directory / "mlruns").as_uri())
        return tracking.MLflowTracker(experiment_name=EXPERIMENT, run_name=run_name)
    # W&B: online unless WANDB_MODE=offline (then files under tracking_dir/wandb)
    directory.mkdir(parents=True, exist_ok=True)
    return tracking.WandBTracker(os.environ.get("WANDB_PROJECT", EXPERIMENT), name=run_name,
                                 dir=str(directory))
