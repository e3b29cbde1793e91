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
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

import yaml

# tracker -> (module it imports, preftune extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
            "wandb": ("wandb", "wandb")}
EXPERIMENT = "preftune"  # MLflow experiment and W&B project (their environment variables win)


def check_installed(names) -> None:
    """A ``ValueError`` for a tracker listed twice, naming the extra to install for each chosen
    tracker that is missing, or saying how to run W&B without a login."""
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"train.report_to lists {', '.join(twice)} more than once; list each "
                         "tracker once.")
    missing = [name for name in names if importlib.util.find_spec(PACKAGES[name][0]) is None]
    if missing:
        extras = ",".join(PACKAGES[name][1] for name in missing)
        raise ValueError(f"train.report_to lists {', '.join(missing)}, which is not installed; "
                         f"install it with: pip install 'preftune[{extras}]' (or remove it from "
                         "train.report_to).")
    if "wandb" in names and not _wandb_can_log():
        raise ValueError("train.report_to lists wandb, but W&B has no API key here (neither "
                         "WANDB_API_KEY nor a `wandb login`); log in, or set WANDB_MODE=offline "
                         "to write the run under the tracking directory and upload it later "
                         "with `wandb sync`.")


def _wandb_can_log() -> bool:
    """Whether W&B runs offline (or disabled), or has an API key: the environment's, or the
    ``~/.netrc`` entry that ``wandb login`` writes for its server."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled") \
            or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


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
    hyperparameters. What they change in the process (MLflow's tracking URI) is undone by
    ``finish``, so the next run in the process (an online round, ``compare``'s next
    objective, a script's next ``train``) gets its own store."""

    def __init__(self, cfg, output_dir: Path, resumed_from: int = 0):
        self.trackers, self.undo = [], []
        if not cfg.report_to:
            return
        output_dir = Path(output_dir)
        directory = Path(cfg.tracking_dir or output_dir / "tracking").resolve()
        run_name = cfg.run_name or output_dir.resolve().name
        config = hyperparameters(output_dir)
        try:
            for name in cfg.report_to:
                tracker = self._tracker(name, directory, run_name, resumed_from)
                tracker.start()
                self.trackers.append(tracker)
                tracker.store_init_configuration(config)
        except BaseException:
            self.finish("FAILED")
            raise

    def log(self, record: dict) -> None:
        values = tracker_values(record)
        for tracker in self.trackers:
            tracker.log(values, step=record["step"])

    def finish(self, status: str = "FINISHED") -> None:
        """End every tracker's run; MLflow's with ``status`` (FINISHED, FAILED when the run
        raised, KILLED when a signal stopped it)."""
        for tracker in self.trackers:
            if tracker.name == "mlflow":
                import mlflow

                mlflow.end_run(status=status)
            else:
                tracker.finish()
        self.trackers = []
        while self.undo:
            self.undo.pop()()

    def _tracker(self, name: str, directory: Path, run_name: str, resumed_from: int):
        from accelerate import tracking

        if name == "tensorboard":  # event files under tracking_dir/tensorboard/RUN_NAME
            # resumed (from the checkpoint of step resumed_from): the steps the stopped run
            # logged after it are purged (TensorBoard hides them), so each step shows once
            purge = {"purge_step": resumed_from + 1} if resumed_from else {}
            return tracking.TensorBoardTracker(run_name, directory / "tensorboard", **purge)
        if name == "mlflow":
            parent = self._mlflow_store(directory)
            return tracking.MLflowTracker(experiment_name=parent or EXPERIMENT,
                                          run_name=run_name, nested_run=parent is not None)
        # W&B: online unless WANDB_MODE=offline (then files under tracking_dir/wandb)
        directory.mkdir(parents=True, exist_ok=True)
        return tracking.WandBTracker(os.environ.get("WANDB_PROJECT", EXPERIMENT), name=run_name,
                                     dir=str(directory))

    def _mlflow_store(self, directory: Path) -> str | None:
        """Point MLflow at a file store in ``directory``, unless the user chose a tracking URI
        (MLFLOW_TRACKING_URI, ``mlflow.set_tracking_uri``) or runs this inside a run of their
        own, which then gets the run as a child, in their store and experiment (whose name
        is returned)."""
        import mlflow

        parent = mlflow.active_run()
        if parent is not None:
            return mlflow.get_experiment(parent.info.experiment_id).name
        if not mlflow.is_tracking_uri_set():
            if "MLFLOW_ALLOW_FILE_STORE" not in os.environ:
                os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
                self.undo.append(lambda: os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None))
            mlflow.set_tracking_uri((directory / "mlruns").as_uri())
            self.undo.append(lambda: mlflow.set_tracking_uri(None))
        return None
