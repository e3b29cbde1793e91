"""Experiment trackers (train.report_to): TensorBoard event files, an MLflow file store and an
offline W&B run hold exactly what metrics.jsonl holds, plus the config as hyperparameters."""

import json
import re
import shutil
import shlex
from pathlib import Path

import pytest
import yaml

from preftune.cli import main
from preftune.config import ConfigError, build_config
from preftune.train import tracking
from preftune.train.logging import read_metrics
from tiny_models import yes_no_workspace

pytestmark = pytest.mark.filterwarnings("ignore")
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    return yes_no_workspace(root, pairs=16)


def readme_tracker_command() -> list[str]:
    """The first command of the README's tracker section."""
    section = README.read_text().split("### Experiment tracking", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return shlex.split(block.splitlines()[0].split("#")[0])


@pytest.fixture(scope="module")
def tracked_run(workspace, monkeypatch_module):
    """The README's command on the tiny model: learning rate 0 (so the policy_not_moving alarm
    fires at step 3) and an eval every 2 steps."""
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch_module.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    command = readme_tracker_command()
    assert command[:3] == ["preftune", "train", "examples/dpo.yaml"]
    out = workspace / "run"
    command[2] = str(README.parent / command[2])  # whatever the working directory
    assert main(command[1:] + tiny_settings(workspace, out)) == 0
    return out


def tiny_settings(workspace: Path, out: Path) -> list[str]:
    """--set arguments: the tiny model, lr 0, 4 steps, an eval every 2."""
    tiny = [f"model.path={workspace / 'model'}", f"data.train={workspace / 'pairs.jsonl'}",
            "data.eval_fraction=0.25", f"reference.cache_dir={workspace / 'cache'}",
            f"output_dir={out}", "train.learning_rate=0.0", "train.batch_size=4",
            "train.gradient_accumulation_steps=1", "train.max_steps=4", "train.eval_every=2"]
    return [item for setting in tiny for item in ("--set", setting)]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def expected_values(out: Path) -> dict:
    """{name: {step: value}} as the trackers should hold them, from metrics.jsonl."""
    expected: dict = {}
    for record in read_metrics(out / "metrics.jsonl"):
        for name, value in tracking.tracker_values(record).items():
            expected.setdefault(name, {})[record["step"]] = value
    return expected


def test_tensorboard_event_files_hold_the_metrics_of_metrics_jsonl(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = read_metrics(tracked_run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[2]["alarms"] == ["policy_not_moving"]
    assert "eval/loss" in records[1] and "eval/loss" in records[3]
    expected = expected_values(tracked_run)
    assert expected["alarms/policy_not_moving"] == {3: 1}
    run_dir = tracked_run / "tracking" / "tensorboard" / "run"
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for name, by_step in expected.items():
        logged = {event.step: event.value for event in events.Scalars(name)}
        assert logged == pytest.approx(by_step, rel=1e-6), name
    (hparams,) = run_dir.glob("*/hparams.yml")
    config = yaml.safe_load(hparams.read_text())
    assert config["train.learning_rate"] == 0.0 and config["train.max_steps"] == 4
    assert json.loads(config["train.report_to"]) == ["tensorboard", "mlflow"]
    assert config["model.path"] == str(tracked_run.parent / "model")


def test_mlflow_file_store_holds_the_metrics_and_the_config(tracked_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tracked_run / "tracking" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("preftune")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    expected = expected_values(tracked_run)
    assert sorted(run.data.metrics) == sorted(expected)
    for name, by_step in expected.items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert history == pytest.approx(by_step, rel=1e-12), name
    assert run.data.params["train.learning_rate"] == "0.0"
    assert run.data.params["objective"] == json.dumps([{"name": "dpo", "weight": 1.0,
                                                        "beta": 0.1}])


def test_wandb_offline_run_holds_the_metrics_and_the_config(workspace, monkeypatch):
    pytest.importorskip("wandb")
    from wandb.proto.wandb_internal_pb2 import Record

    for name in ("WANDB_PROJECT", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = workspace / "wandb-run"
    argv = ["train", str(README.parent / "examples" / "dpo.yaml"), "--set",
            "train.report_to=[wandb]"] + tiny_settings(workspace, out)
    assert main(argv) == 0
    (path,) = (out / "tracking" / "wandb").glob("offline-run-*/run-*.wandb")
    logged, config, names = {}, {}, set()
    for data in wandb_records(path):  # the records `wandb sync` would upload
        record = Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "run":
            names.add((record.run.project, record.run.display_name))
        elif record.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif record.WhichOneof("record_type") == "history":
            # (a key is ``key``, or in newer wandb ``nested_key``'s parts)
            values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                      for item in record.history.item}
            for name, value in values.items():
                if not name.startswith("_"):
                    logged.setdefault(name, {})[values["_step"]] = value
    assert names == {("preftune", "wandb-run")}
    expected = expected_values(out)
    assert sorted(logged) == sorted(expected)
    for name, by_step in expected.items():
        assert logged[name] == pytest.approx(by_step, rel=1e-12), name
    assert config["train.learning_rate"] == 0.0 and config["train.max_steps"] == 4
    assert json.loads(config["train.report_to"]) == ["wandb"]


def wandb_records(path: Path):
    """The records of an offline W&B run file: after a 7-byte header (":W&B", magic,
    version), LevelDB's log format, 32 KiB blocks of chunks each headed by a checksum (4
    bytes), a length (2, little-endian) and a type (1 whole, 2 first, 3 middle, 4 last).
    Read here because wandb's own reader left its Python package (0.31)."""
    data, block, position, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            yield pending
            pending = b""


def test_alarm_lists_become_one_indicator_per_kind():
    record = {"step": 7, "loss": 0.5, "alarms": ["no_signal", "non_finite_loss"]}
    assert tracking.tracker_values(record) == {"loss": 0.5, "alarms/no_signal": 1,
                                               "alarms/non_finite_loss": 1}


def test_a_missing_tracker_package_names_the_extra(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name: None if name == "tensorboard" else real(name))
    with pytest.raises(ConfigError) as error:
        build_config({"train": {"report_to": ["tensorboard", "mlflow"]}})
    assert "train.report_to lists tensorboard" in str(error.value)
    assert "pip install 'preftune[tensorboard]'" in str(error.value)


def test_report_to_may_change_on_resume_and_an_unknown_tracker_is_refused():
    from preftune.train.output import SAFE_TO_CHANGE

    assert {"train.report_to", "train.tracking_dir", "train.run_name"} <= SAFE_TO_CHANGE
    with pytest.raises(ConfigError, match="train.report_to"):
        build_config({"train": {"report_to": ["tensorbored"]}})
    assert build_config({"train": {"report_to": "mlflow"}}).train.report_to == ["mlflow"]


def mlflow_runs(store: Path, experiment: str = "preftune") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.as_uri())
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_each_run_in_a_process_gets_its_own_mlflow_store(workspace, monkeypatch):
    """A script (or online rounds, or compare) that trains twice: each run's store is its own
    tracking dir, and the process's MLflow setting is as it was before (no tracking URI left
    behind for the next run, or the user's own MLflow calls, to inherit)."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    base = ["train", str(README.parent / "examples" / "dpo.yaml"), "--set",
            "train.report_to=[mlflow]"]
    for name in ("first", "second"):
        settings = tiny_settings(workspace, workspace / name)
        assert main(base + settings[:-4] + ["--set", "train.max_steps=1"]) == 0
        assert "MLFLOW_TRACKING_URI" not in tracking.os.environ
        assert "MLFLOW_ALLOW_FILE_STORE" not in tracking.os.environ
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name in ("first", "second"):
        (run,) = mlflow_runs(workspace / name / "tracking" / "mlruns")
        assert run.info.run_name == name and run.info.status == "FINISHED"
    assert mlflow.get_tracking_uri() != (workspace / "first" / "tracking" / "mlruns").as_uri()


def test_a_run_inside_the_users_mlflow_run_is_its_child(workspace, tmp_path, monkeypatch):
    """``with mlflow.start_run(): train(...)`` (a sweep's parent run): the run is logged as a
    nested run in the user's store and experiment, not started beside the active one (which
    MLflow refuses), nor in an experiment of preftune's own, where the parent's view misses
    it."""
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = tmp_path / "user-store"
    mlflow.set_tracking_uri(store.as_uri())
    try:
        mlflow.set_experiment("my-sweep")
        with mlflow.start_run(run_name="sweep") as parent:
            settings = tiny_settings(workspace, tmp_path / "child")
            assert main(["train", str(README.parent / "examples" / "dpo.yaml"), "--set",
                         "train.report_to=[mlflow]"] + settings[:-4]
                        + ["--set", "train.max_steps=1"]) == 0
            assert mlflow.active_run().info.run_id == parent.info.run_id
    finally:
        mlflow.set_tracking_uri(None)
    runs = {run.info.run_name: run for run in mlflow_runs(store, "my-sweep")}
    assert sorted(runs) == ["child", "sweep"] and not mlflow_runs(store)
    assert runs["child"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "loss" in runs["child"].data.metrics
    assert not (tmp_path / "child" / "tracking" / "mlruns").exists()


def test_a_run_that_fails_ends_its_mlflow_run_as_failed(workspace, monkeypatch):
    from preftune.train.trainer import Trainer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real_step = Trainer.step

    def failing_step(self, step):
        if step == 1:
            raise RuntimeError("the data loader broke")
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "step", failing_step)
    out = workspace / "failing"
    with pytest.raises(RuntimeError, match="the data loader broke"):
        main(["train", str(README.parent / "examples" / "dpo.yaml"), "--set",
              "train.report_to=[mlflow]"] + tiny_settings(workspace, out))
    assert "MLFLOW_TRACKING_URI" not in tracking.os.environ
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (run,) = mlflow_runs(out / "tracking" / "mlruns")
    assert run.info.status == "FAILED"
    assert [m.step for m in __import__("mlflow").tracking.MlflowClient(
        (out / "tracking" / "mlruns").as_uri()).get_metric_history(run.info.run_id, "loss")] == [1]


def test_a_tracker_listed_twice_and_wandb_without_a_login_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="train.report_to lists mlflow more than once"):
        build_config({"train": {"report_to": ["mlflow", "tensorboard", "mlflow"]}})
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",  # as if wandb were installed
                        lambda name: object() if name == "wandb" else real(name))
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine example.org login a password b\n")
    monkeypatch.setenv("NETRC", str(netrc_file))
    with pytest.raises(ConfigError, match="W&B has no API key here .* set WANDB_MODE=offline"):
        build_config({"train": {"report_to": "wandb"}})
    netrc_file.write_text("machine api.wandb.ai login user password k\n")
    netrc_file.chmod(0o600)
    assert build_config({"train": {"report_to": "wandb"}}).train.report_to == ["wandb"]
    netrc_file.unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert build_config({"train": {"report_to": "wandb"}}).train.report_to == ["wandb"]


def test_a_resumed_run_shows_each_step_once_in_tensorboard(workspace):
    """A run stopped after logging steps 3 and 4, resumed from its step-2 checkpoint, logs
    them again: the first run's later steps are purged, so TensorBoard shows each step once,
    with the values the resumed run wrote to metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = workspace / "resumed-tb"
    argv = ["train", str(README.parent / "examples" / "dpo.yaml"), "--set",
            "train.report_to=[tensorboard]", "--set", "train.save_every=2",
            "--set", "train.keep_checkpoints=2"] + tiny_settings(workspace, out)
    argv[argv.index("train.learning_rate=0.0")] = "train.learning_rate=0.01"
    assert main(argv) == 0
    for name in ("model", "checkpoints/step-00000004"):  # as if killed after step 4 logged
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "run.json").unlink()
    assert main(argv + ["--resume"]) == 0
    events = EventAccumulator(str(out / "tracking" / "tensorboard" / "resumed-tb"))
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("loss")}
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3, 4]
    assert logged == pytest.approx(expected_values(out)["loss"], rel=1e-6)
