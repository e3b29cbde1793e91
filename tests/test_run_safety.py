"""What a new user runs into: numeric ranges, broken --set and YAML, output directories that
are files or hold a run, --resume under changed settings, damaged checkpoints, SIGTERM."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch
from test_train_loop import crashed_run, losses, run, workspace  # noqa: F401

from preftune.cli import main
from preftune.config import ConfigError, build_config
from preftune.data.records import DataError
from preftune.train import loop, trainer
from preftune.train.logging import read_metrics
from preftune.train.stopping import TrainingStopped


@pytest.mark.parametrize("key,value,says", [
    ("train.batch_size", 0, "greater than or equal to 1"),
    ("train.learning_rate", -1e-3, "greater than or equal to 0"),
    ("train.max_steps", -1, "greater than or equal to 1"),
    ("train.max_steps", 0, "greater than or equal to 1"),
    ("train.epochs", 0, "greater than 0"),
    ("train.warmup_ratio", 1.5, "less than 1"),
    ("train.max_grad_norm", 0, "greater than 0"),
    ("train.learning_rate", float("nan"), "finite"),
    ("data.max_length", 1, "greater than or equal to 2"),
    ("model.lora.r", 0, "greater than or equal to 1"),
])
def test_numeric_keys_are_range_checked_before_any_work(key, value, says):
    tree = {"data": {"train": "pairs.jsonl"}}
    section, leaf = key.rsplit(".", 1)
    node = tree
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[leaf] = value
    with pytest.raises(ConfigError, match=rf"{key}: .*{says}"):
        build_config(tree)


@pytest.mark.parametrize("argv, key", [
    (["--set", "train.learning_rate=yes"], "train.learning_rate"),  # trained at lr 1.0
    (["--set", "train.batch_size=true"], "train.batch_size"),
    (["--set", "train.max_grad_norm=on"], "train.max_grad_norm"),
    (["--set", "model.lora={r: true}"], "model.lora.r"),
    (["--set", "objective.beta=true"], "objective.beta"),
    (["--set", "objective.beta={start: true, end: 0.1}"], "objective.beta"),
])
def test_true_or_false_for_a_number_is_refused(argv, key, tmp_path, capsys):
    """pydantic reads true as 1 and false as 0 for a number, and YAML reads yes/no/on/off as
    true/false: ``learning_rate: yes`` trained at 1.0 without a word."""
    assert main(["train", *argv, "--set", f"data.train={tmp_path / 'none.jsonl'}",
                 "--set", f"output_dir={tmp_path / 'run'}"]) == 2
    got = "false" if argv[1].endswith("=false") else "true"
    assert f"  {key}: expected a number, got {got} (YAML reads yes/no/on/off as true/false, " \
        "which is no number)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert build_config({"train": {"compile": True, "learning_rate": 1e-3}}).train.compile
    from preftune.reward.config import RewardConfig  # a reward loss's parameters too

    with pytest.raises(ConfigError, match="loss.label_smoothing: expected a number, got true"):
        RewardConfig.from_dict({"loss": {"name": "bt", "label_smoothing": True}})


def test_broken_set_values_and_yaml_files_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "--set", "train.learning_rate=[1e-3"]) == 2
    assert "the value is not valid YAML" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("train: {seed: 3}\n")
    assert main(["train", str(config), "--set", "train.seed.x=1"]) == 2
    assert "train.seed is a value (3), not a section" in capsys.readouterr().err
    config.write_text("train: [1,\n")
    assert main(["train", str(config)]) == 2
    assert "not a valid YAML config at line 2" in capsys.readouterr().err
    marker = tmp_path / "ran"
    config.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["train", str(config)]) == 2
    assert "a config is data" in capsys.readouterr().err and not marker.exists()
    # a repeated key would silently drop the first one's settings
    config.write_text("train:\n  learning_rate: 5e-5\n  max_steps: 10\ntrain:\n  seed: 2\n")
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"error: {config}: not a valid YAML config at line 4, column 1: key 'train' appears "
        "twice (also at line 1), and the second would silently replace the first; merge them; "
        "nothing was run\n")
    config.write_text("train: {seed: 1, seed: 2}\n")
    assert main(["train", str(config)]) == 2
    assert "key 'seed' appears twice" in capsys.readouterr().err
    # saved as UTF-16 (a Windows editor) or with Latin-1 bytes: named, not a traceback
    config.write_bytes("train: {seed: 1}\n".encode("utf-16"))
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr().err == (f"error: {config}:1: not valid UTF-8 (invalid start byte "
                                       "at byte 0); re-save the config as UTF-8; nothing was "
                                       "run\n")
    template = tmp_path / "chat.jinja"
    template.write_bytes("# caf\xe9\n{{ messages }}".encode("latin-1"))
    assert main(["train", "--plan", "--set", f"model.chat_template={template}"]) == 2
    assert f"{template}:1: not valid UTF-8 (invalid continuation byte at byte 5); re-save " \
        "the template as UTF-8 (model.chat_template)" in capsys.readouterr().err
    config.write_text("base: &b {seed: 1}\ntrain:\n  <<: *b\n  seed: 2\n")  # a merge key may
    from preftune.config_tree import read_tree  # be overridden

    assert read_tree(str(config))["train"] == {"seed": 2}
    config.write_text("# nothing set yet\n")
    assert main(["train", str(config)]) == 2
    assert f"config file {config} is empty: it sets nothing" in capsys.readouterr().err


def test_an_output_dir_that_is_a_file_or_unwritable_is_named(workspace, tmp_path):  # noqa: F811
    afile = tmp_path / "file"
    afile.write_text("keep me")
    with pytest.raises(ConfigError, match="output_dir .*file is a file"):
        run(workspace, "x", output_dir=str(afile))
    with pytest.raises(ConfigError, match="output_dir .*cannot be written"):
        run(workspace, "x", output_dir=str(afile / "below"))
    assert afile.read_text() == "keep me"
    # the reference cache is checked before the reference pass, not after it
    with pytest.raises(ConfigError, match=rf"reference.cache_dir {afile / 'cache'} cannot be "
                                          r"written \(Not a directory\)"):
        run(workspace, "y", reference__cache_dir=str(afile / "cache"))
    assert not (workspace / "runs" / "y" / "metrics.jsonl").exists()


def test_a_run_directory_is_never_reused_silently(workspace, monkeypatch):  # noqa: F811
    first = run(workspace, "twice", train__max_steps=2)
    assert not (first / ".preftune.lock").exists()  # released (and removed) when a run ends
    before = (first / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"already holds a run; it finished \(run.json "
                                          r"written\): --resume keeps it and trains nothing "
                                          r"\(in Python: resume=True\); start over with "
                                          r"--overwrite \(in Python: overwrite=True; the old "
                                          r"run is moved aside"):
        run(workspace, "twice", train__max_steps=2)
    assert (first / "metrics.jsonl").read_text() == before  # nothing lost
    early = workspace / "runs" / "failed-early"  # stopped before its first checkpoint
    early.mkdir(parents=True)
    (early / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"already holds a run; it has no checkpoint to "
                                          r"continue from; start over with --overwrite"):
        run(workspace, "failed-early", train__max_steps=2)
    again = loop.train(build_config(_saved(first)), show_progress=False, overwrite=True)
    moved = [p for p in first.parent.iterdir() if p.name.startswith("twice.old-")]
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").read_text() == before
    assert again == first and (first / "model" / "model.safetensors").exists()
    # an overwrite in the same second as the last one (its name taken) takes the next name
    from preftune.train import output

    monkeypatch.setattr(output.time, "strftime", lambda _: moved[0].name.split(".old-")[1])
    trained = (first / "metrics.jsonl").read_text()
    loop.train(build_config(_saved(first)), show_progress=False, overwrite=True)
    assert (moved[0] / "metrics.jsonl").read_text() == before
    assert (Path(f"{moved[0]}-2") / "metrics.jsonl").read_text() == trained


def test_a_refused_run_leaves_no_directory_and_an_overwrite_puts_the_old_run_back(
        workspace, capsys):  # noqa: F811
    """A run stopped by its data before writing anything (here record 2 lacks 'rejected')
    takes back what it did to output_dir: the directory it made, and the run that
    --overwrite moved aside for it."""
    bad = workspace / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n'
                   '{"prompt": "2+2=", "chosen": "4"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'rejected'"):
        run(workspace, "never-made", data__train=str(bad))
    assert not (workspace / "runs" / "never-made").exists()
    kept = run(workspace, "kept", train__max_steps=2)
    before = sorted(p.name for p in kept.iterdir())
    metrics = (kept / "metrics.jsonl").read_text()
    tree = {**_saved(kept), "data": {"train": str(bad)}}
    capsys.readouterr()
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'rejected'"):
        loop.train(build_config(tree), show_progress=False, overwrite=True)
    assert sorted(p.name for p in kept.iterdir()) == before
    assert (kept / "metrics.jsonl").read_text() == metrics
    assert not [p for p in kept.parent.iterdir() if p.name.startswith("kept.old-")]
    out = capsys.readouterr().out
    assert f"the previous run in {kept} was moved to {kept}.old-" in out
    assert f"was moved back to {kept}: the new run wrote nothing" in out


def test_resume_without_a_checkpoint_stops_before_anything_loads(workspace, monkeypatch):  # noqa: F811
    monkeypatch.setattr(loop, "policy_task", lambda *a, **k: pytest.fail("the model loaded"))
    fresh = workspace / "runs" / "never-started"
    tree = {"output_dir": str(fresh), "model": {"path": str(workspace / "model")},
            "data": {"train": str(workspace / "pairs.jsonl")}}
    with pytest.raises(ConfigError, match=f"^--resume: {fresh} does not exist, so there is no "
                                          "run to continue.* or start the run without "
                                          "--resume"):
        loop.train(build_config(tree), resume=True, show_progress=False)
    assert not fresh.exists()  # nothing made that the next try would trip over
    # a relative output_dir read from another directory than the run's: where it was looked
    monkeypatch.chdir(workspace)
    with pytest.raises(ConfigError, match=rf"^--resume: runs/elsewhere \(from the working "
                                          rf"directory {workspace}\) does not exist.* Run from "
                                          "the directory the run was started in, or give "
                                          "output_dir as an absolute path"):
        loop.train(build_config({**tree, "output_dir": "runs/elsewhere"}), resume=True,
                   show_progress=False)
    fresh.mkdir(parents=True)  # a run that failed before its first checkpoint
    (fresh / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match=f"--resume: {fresh} holds no checkpoint to continue "
                                          "from .* start over with --overwrite"):
        loop.train(build_config(tree), resume=True, show_progress=False)


def _saved(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_resume_refuses_changed_settings_and_allows_safe_ones(workspace, monkeypatch):  # noqa: F811
    settings = dict(train__max_steps=4, train__save_every=2, train__batch_size=4)
    crashed_run(workspace, "changed", monkeypatch, 2, **settings)
    tree = _saved(workspace / "runs" / "changed")
    tree["train"]["learning_rate"] = 1.0
    with pytest.raises(ConfigError, match=r"train.learning_rate: 0.005 -> 1.0"):
        loop.train(build_config(tree), resume=True, show_progress=False)
    tree["train"]["learning_rate"] = 0.005
    tree["train"]["log_every"] = 2  # safe: what is logged, not what is trained
    # a run written before train.compile existed: a missing key counts as its default
    saved_file = workspace / "runs" / "changed" / "config.yaml"
    older = yaml.safe_load(saved_file.read_text())
    del older["train"]["compile"]
    saved_file.write_text(yaml.safe_dump(older))
    # the same settings on another number of processes change the global batch (4 -> 8)
    from preftune.train.output import check_resume

    with pytest.raises(ConfigError, match=r"the global batch would be 8 \(batch_size 4 x "
                                          r"accumulation 1 x 2 processes\), and the run started "
                                          r"with 4; .* set train.batch_size so that the product "
                                          r"is 4 again"):
        check_resume(build_config(tree), processes=2)
    tree["train"]["batch_size"] = 2  # 2 x 2 processes: the global batch is kept
    check_resume(build_config(tree), processes=2)
    tree["train"]["batch_size"] = 4
    # without config.yaml nothing says how the run started: refused, not waved through
    saved_file.rename(saved_file.with_name("kept.yaml"))
    with pytest.raises(ConfigError, match=r"its config.yaml, the settings the run started "
                                          r"with, is gone"):
        check_resume(build_config({**tree, "train": {**tree["train"], "learning_rate": 1.0}}))
    saved_file.with_name("kept.yaml").rename(saved_file)
    resumed = loop.train(build_config(tree), resume=True, show_progress=False)
    assert (resumed / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("objective, data, run_split, resumed_split, refused", [
    ({"name": "bco"}, {"data__convert": "unpaired"}, (2, 2), (4, 1, 1), True),  # its state
    ({"name": "kto"}, {"data__convert": "unpaired"}, (2, 2), (4, 1, 1), True),  # z_ref
    ({"name": "kto"}, {"data__convert": "unpaired"}, (4, 1), (2, 1, 2), False),  # (gathered)
    # with accumulation, a micro-batch holds other examples on other processes (0, 1 | 2, 3
    # on one; 0, 2 | 1, 3 on two)
    ({"name": "kto"}, {"data__convert": "unpaired"}, (2, 2), (1, 2, 2), True),
    ({"name": "aot_pair"}, {}, (4, 1), (2, 1, 2), True),  # its sort: per process
    ({"name": "dpo"}, {}, (2, 2), (4, 1, 1), False),  # each example on its own
])
def test_resume_keeps_the_split_of_objectives_that_read_the_micro_batch(
        workspace, monkeypatch, objective, data, run_split, resumed_split, refused):  # noqa: F811
    """A split of the same global batch was all --resume checked: a resumed bco run of
    batch 2 x accumulation 2 as 4 x 1 trained other steps than the run."""
    from preftune.train.output import check_resume

    name = f"split-{objective['name']}-{'-'.join(map(str, run_split + resumed_split))}"
    crashed_run(workspace, name, monkeypatch, 2, train__max_steps=4, train__save_every=2,
                train__batch_size=run_split[0], train__gradient_accumulation_steps=run_split[1],
                objective=objective, **data)
    tree = _saved(workspace / "runs" / name)
    batch, accumulation, processes = resumed_split
    tree["train"].update(batch_size=batch, gradient_accumulation_steps=accumulation)
    if refused:
        with pytest.raises(ConfigError, match=rf"{objective['name']} reads each micro-batch as "
                                              rf"a whole, so batch_size {batch} x accumulation "
                                              rf"{accumulation} would train other steps than the "
                                              rf"run's batch_size {run_split[0]} x accumulation "
                                              rf"{run_split[1]}"):
            check_resume(build_config(tree), processes=processes)
    else:
        check_resume(build_config(tree), processes=processes)


def test_resume_refuses_data_that_changed_since_the_run_started(workspace, monkeypatch,  # noqa: F811
                                                                 tmp_path):
    """The settings alone allowed a resume onto an edited data file: the resumed steps
    trained on other examples than the run's. The examples' fingerprint (data_report.json)
    is compared before the model loads; the same data read again resumes."""
    data = tmp_path / "pairs.jsonl"
    data.write_text((workspace / "pairs.jsonl").read_text())
    crashed_run(workspace, "edited", monkeypatch, 2, train__max_steps=4, train__save_every=2,
                train__batch_size=4, data__train=str(data))
    out = workspace / "runs" / "edited"
    tree = _saved(out)
    original = data.read_text()
    data.write_text(original.replace('What is', 'Tell me: what is'))  # every prompt
    monkeypatch.setattr(loop, "load_policy", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ConfigError, match=rf"--resume: the training data read now differs from "
                                          rf"what {out} started on \(\d+ examples then, \d+ "
                                          r"now, other tokens\)"):
        loop.train(build_config(tree), resume=True, show_progress=False)
    monkeypatch.undo()
    data.write_text(original)
    resumed = loop.train(build_config(tree), resume=True, show_progress=False)
    assert (resumed / "model" / "model.safetensors").exists()


def test_resume_of_a_finished_run_trains_nothing_and_keeps_it(workspace, monkeypatch,  # noqa: F811
                                                                capsys):
    finished = run(workspace, "finished", train__max_steps=2, train__save_every=1,
                   train__batch_size=4)
    before = {p.name: p.stat().st_mtime_ns for p in (finished / "model").iterdir()}
    metrics = (finished / "metrics.jsonl").read_text()
    report = (finished / "data_report.json").read_text()
    monkeypatch.setattr(loop, "policy_task", lambda *a, **k: pytest.fail("the model loaded"))
    assert loop.train(build_config(_saved(finished)), resume=True,
                      show_progress=False) == finished
    assert "holds a finished run (run.json, its model saved); nothing is left to train" in \
        capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (finished / "model").iterdir()} == before
    assert (finished / "metrics.jsonl").read_text() == metrics
    data = Path(_saved(finished)["data"]["train"])
    original = data.read_text()
    data.write_text(original.replace("?", "??"))  # the run's data edited since it finished
    with pytest.raises(ConfigError, match=rf"--resume: the training data read now differs from "
                                          rf"what {finished} trained on \(\d+ examples then, "
                                          r"\d+ now, other tokens\); its finished model was "
                                          r"trained on other examples than these"):
        loop.train(build_config(_saved(finished)), resume=True, show_progress=False)
    data.write_text(original)
    (finished / "data_report.json").write_text('{"train": ')  # damaged: no silent pass
    with pytest.raises(ConfigError, match="data_report.json, what the run trained on, cannot "
                                          "be read"):
        loop.train(build_config(_saved(finished)), resume=True, show_progress=False)
    (finished / "data_report.json").write_text(report)
    changed = _saved(finished)
    changed["train"]["learning_rate"] = 1.0  # a finished run is not continued differently
    with pytest.raises(ConfigError, match="train.learning_rate: 0.005 -> 1.0"):
        loop.train(build_config(changed), resume=True, show_progress=False)
    monkeypatch.undo()
    weights = (finished / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(finished / "model")  # its model deleted: finished again from the checkpoint
    loop.train(build_config(_saved(finished)), resume=True, show_progress=False)
    assert (finished / "model" / "model.safetensors").read_bytes() == weights


def test_a_run_stopped_while_writing_its_model_card_is_not_finished(workspace,  # noqa: F811
                                                                      monkeypatch):
    """run.json marks a run finished, so it is written last: a stop before it leaves a run
    that --resume finishes, model card included."""
    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "write_model_cards", stopped)
    with pytest.raises(KeyboardInterrupt):
        run(workspace, "card", train__max_steps=2, train__save_every=1, train__batch_size=4)
    out = workspace / "runs" / "card"
    assert (out / "model").is_dir() and not (out / "run.json").exists()
    monkeypatch.undo()
    loop.train(build_config(_saved(out)), resume=True, show_progress=False)
    assert (out / "run.json").is_file() and (out / "model" / "README.md").is_file()


@pytest.mark.parametrize("save_merged", [True, False])
def test_a_lora_run_missing_the_model_it_writes_last_finishes_again(workspace,  # noqa: F811
                                                                     save_merged):
    """A LoRA run writes adapter/ and then (save_merged) model/: with model/ deleted it is not
    finished, whatever adapter/ holds; without save_merged, adapter/ is what it writes last."""
    name = f"lora-{save_merged}"
    done = run(workspace, name, train__max_steps=2, train__save_every=1, train__batch_size=4,
               model__lora={"r": 4, "save_merged": save_merged})
    last = done / ("model" if save_merged else "adapter")
    written = {p.name: p.read_bytes() for p in last.iterdir() if p.suffix == ".safetensors"}
    shutil.rmtree(last)
    loop.train(build_config(_saved(done)), resume=True, show_progress=False)
    assert {p.name: p.read_bytes() for p in last.iterdir()
            if p.suffix == ".safetensors"} == written


def _empty_weights(checkpoint: Path) -> None:
    (checkpoint / "trainable.safetensors").write_bytes(b"")


def _empty_state(checkpoint: Path) -> None:
    (checkpoint / "state.json").write_text("")


def _no_state(checkpoint: Path) -> None:
    (checkpoint / "state.json").unlink()


def _emptied(checkpoint: Path) -> None:
    shutil.rmtree(checkpoint)
    checkpoint.mkdir()


@pytest.mark.parametrize("damage", [_empty_weights, _empty_state, _no_state, _emptied])
def test_a_damaged_checkpoint_is_passed_over_for_the_previous_one(workspace, monkeypatch,  # noqa: F811
                                                                  capsys, damage):
    """Whatever the damage (a file cut short, state.json empty or gone, an empty folder), the
    checkpoint is named and the one before it resumed: also by the check of the resumed
    run's global batch, which reads state.json before the trainer does."""
    settings = dict(train__max_steps=6, train__save_every=2, train__batch_size=4,
                    train__keep_checkpoints=3)
    straight = workspace / "runs" / "intact"
    if not (straight / "run.json").is_file():
        run(workspace, "intact", **settings)
    crashed_run(workspace, f"damaged{damage.__name__}", monkeypatch, 4, **settings)
    damaged = workspace / "runs" / f"damaged{damage.__name__}"
    damage(damaged / "checkpoints" / "step-00000004")
    resumed = loop.train(build_config(_saved(damaged)), resume=True, show_progress=False)
    out = capsys.readouterr().out
    assert "skipped" in out and "step-00000004" in out and "step-00000002 (step 2)" in out
    assert losses(resumed) == losses(straight)
    assert_identical_weights(straight, resumed)


def test_a_damaged_line_in_a_run_log_is_named_on_resume(workspace, monkeypatch):  # noqa: F811
    out = crashed_run(workspace, "torn-log", monkeypatch, 2, train__max_steps=4,
                      train__save_every=2, train__batch_size=4)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0][:20], *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=rf"{out / 'metrics.jsonl'}:1: not valid JSON \(.*\); "
                                        "the run writes one record per line: fix or delete "
                                        "that line, then run again."):
        loop.train(build_config(_saved(out)), resume=True, show_progress=False)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resumes(workspace, monkeypatch):  # noqa: F811
    settings = dict(train__max_steps=4, train__batch_size=4)
    straight = run(workspace, "no-signal", **settings)
    real_step = trainer.Trainer.step

    def step_with_signal(self, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 2
        return real_step(self, step)

    monkeypatch.setattr(trainer.Trainer, "step", step_with_signal)
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM after step 2 of 4") \
            as stopped:
        run(workspace, "signalled", **settings)
    assert stopped.value.exit_code == 143  # what a shell reports for a SIGTERM
    monkeypatch.setattr(trainer.Trainer, "step", real_step)
    signalled = workspace / "runs" / "signalled"
    assert (signalled / "checkpoints" / "step-00000002").is_dir()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers put back
    resumed = loop.train(build_config(_saved(signalled)), resume=True, show_progress=False)
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3, 4]
    assert_identical_weights(straight, resumed)
    assert not (straight / "alarms.jsonl").exists()  # no alarm: no file (a resume made one)
    assert not (resumed / "alarms.jsonl").exists()


def test_a_signal_to_another_process_stops_this_one_under_its_name(workspace,  # noqa: F811
                                                                     monkeypatch):
    """A scheduler's SIGTERM may reach one process of a launch: the others stop after the
    same step, and say (and exit with) SIGTERM, not SIGINT's 130. Here the step's collective
    reports another process's SIGTERM."""
    real_step = trainer.Trainer.step

    def step_as_one_of_two(self, step):
        self.world = 2 if step == 1 else 1  # step 2's numbers go through the collective
        try:
            return real_step(self, step)
        finally:
            self.world = 1

    def summed_with_a_signalled_peer(self, sums):
        term, interrupt = sums["_stop"]
        return {**sums, "_stop": (torch.as_tensor(term) + 1.0, torch.as_tensor(interrupt))}

    monkeypatch.setattr(trainer.Trainer, "step", step_as_one_of_two)
    monkeypatch.setattr(trainer.Trainer, "_summed", summed_with_a_signalled_peer)
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM to another process after "
                                              "step 2 of 4") as stopped:
        run(workspace, "peer-signalled", train__max_steps=4, train__batch_size=4)
    assert stopped.value.exit_code == 143


def test_python_dash_m_preftune_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "preftune", "objectives"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "dpo" in done.stdout


def test_on_error_skip_drops_malformed_records_and_reports_them(workspace, monkeypatch):  # noqa: F811
    import json

    weights_loaded = []
    load_model = loop.load_model
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: weights_loaded.append(a[0]) or
                        load_model(*a, **k))

    lines = (workspace / "pairs.jsonl").read_text().splitlines()
    lines.insert(3, json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": 7,
                                "rejected": [{"role": "assistant", "content": "x"}]}))  # line 4
    lines.insert(6, "{broken")  # line 7
    bad = workspace / "with-bad-rows.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"with-bad-rows.jsonl:4: .*chosen"):
        run(workspace, "strict", data__train=str(bad))
    assert weights_loaded == []  # the data is checked before the weights load
    out = run(workspace, "lenient", data__train=str(bad), data__on_error="skip",
              train__max_steps=1)
    report = json.loads((out / "data_report.json").read_text())
    assert report["skipped_rows"]["count"] == 2
    assert report["skipped_rows"]["reasons"][0].startswith(f"{bad}:4:")
    assert report["train"]["records"] == 36  # the 48 valid rows, a quarter held out for eval
    assert weights_loaded == [str(workspace / "model")]


KILLER = """
import os, signal, sys
from preftune.train import checkpoint, trainer
where, at = sys.argv[2], int(sys.argv[3])
if where == "save":  # die with half a checkpoint written: weights there, the rest not
    real = checkpoint.save_file
    def save_file(tensors, path, *args, **kwargs):
        real(tensors, path, *args, **kwargs)
        if f"step-{at:08d}" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save_file = save_file
else:  # die in the middle of a step
    real_step = trainer.Trainer.step
    def step(self, number):
        if number == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self, number)
    trainer.Trainer.step = step
from preftune.cli import main
sys.exit(main(["train", sys.argv[1]]))
"""


def assert_identical_weights(a, b):
    from test_train_loop import final_weights

    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[name], wb[name]) for name in wa)  # bit for bit


@pytest.mark.parametrize("where,at", [("save", 4), ("step", 3)])
def test_sigkill_anywhere_then_resume_gives_bit_identical_weights(workspace, tmp_path,  # noqa: F811
                                                                  where, at):
    import yaml

    settings = dict(train__max_steps=6, train__save_every=2, train__batch_size=4)
    straight = run(workspace, f"kill-straight-{where}", **settings)
    tree = _saved(straight)
    tree["output_dir"] = str(workspace / "runs" / f"killed-{where}")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    done = subprocess.run([sys.executable, str(script), str(config), where, str(at)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    killed = workspace / "runs" / f"killed-{where}"
    if where == "save":  # the half-written checkpoint never became a checkpoint
        assert (killed / "checkpoints" / ".staging-step-00000004").is_dir()
        assert not (killed / "checkpoints" / "step-00000004").exists()
    resumed = loop.train(build_config(tree), resume=True, show_progress=False)
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert_identical_weights(straight, resumed)


def test_pickle_only_model_weights_are_refused_unless_allowed(workspace, tmp_path):  # noqa: F811
    from tiny_models import char_tokenizer, tiny_llama

    directory = tmp_path / "pickled"
    tokenizer = char_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "model.safetensors").unlink()  # the weights only as a pickle, as old dirs have
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    assert [p.name for p in directory.glob("*.bin")] and not list(directory.glob("*.safetensors"))
    with pytest.raises(ConfigError, match="opt in with model.allow_pickle: true"):
        run(workspace, "pickled", model__path=str(directory), train__max_steps=1)
    assert not (workspace / "runs" / "pickled").exists()  # made by the run, left empty: removed
    (workspace / "runs" / "mine").mkdir()  # a directory the user made stays, empty or not
    with pytest.raises(ConfigError, match="opt in with model.allow_pickle: true"):
        run(workspace, "mine", model__path=str(directory), train__max_steps=1)
    assert list((workspace / "runs" / "mine").iterdir()) == []
    out = run(workspace, "pickled-allowed", model__path=str(directory), model__allow_pickle=True,
              train__max_steps=1)
    assert (out / "model" / "model.safetensors").exists()  # and what it writes is safetensors


def test_a_tokenizer_that_does_not_fit_the_model_is_refused_before_training(workspace, tmp_path):  # noqa: F811
    from tiny_models import char_tokenizer, tiny_llama

    directory = tmp_path / "mismatch"
    tiny_llama(vocab_size=20).save_pretrained(directory)  # far fewer rows than the tokenizer
    char_tokenizer().save_pretrained(directory)
    with pytest.raises(ConfigError, match=r"tokenizer has \d+ tokens but the model embeds only 20"):
        run(workspace, "mismatch", model__path=str(directory))


def test_pairs_whose_responses_are_identical_warn_and_raise_the_no_signal_alarm(workspace,  # noqa: F811
                                                                                 capsys):
    import json

    same = workspace / "same.jsonl"
    same.write_text("".join(json.dumps({"prompt": f"q{k}", "chosen": "same answer",
                                        "rejected": "same answer"}) + "\n" for k in range(16)))
    out = run(workspace, "no-signal-data", data__train=str(same), train__max_steps=2)
    # 16 records, a quarter held out for eval: all 12 training records carry no signal
    assert re.search(r"warning: 12 of 12 training records have identical responses \(chosen "
                     r"== rejected, as written or once cut to data.max_length\) \(e\.g\. \S+same\.jsonl:\d+, \S+same\.jsonl:\d+, "
                     r"\S+same\.jsonl:\d+\)", capsys.readouterr().out)  # the first three named
    alarms = [json.loads(line) for line in (out / "alarms.jsonl").read_text().splitlines()]
    assert [a["kind"] for a in alarms if a["kind"] == "no_signal"] == ["no_signal", "no_signal"]
    assert "identical responses" in alarms[0]["message"] and "same.jsonl:" in alarms[0]["message"]


def test_a_directory_another_process_runs_in_is_refused(tmp_path, workspace):  # noqa: F811
    """A second run, a --resume or an --overwrite while the first still runs would interleave
    two runs' metrics and checkpoints; the lock goes with the process, however it ends."""
    from preftune.train.output import prepare_output_dir

    out = tmp_path / "busy"
    tree = {"output_dir": str(out), "model": {"path": str(workspace / "model")},
            "data": {"train": str(workspace / "pairs.jsonl")}}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from preftune.train.output import prepare_output_dir; "
         f"prepare_output_dir({str(out)!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        (out / "metrics.jsonl").write_text("")  # it holds a run
        for resume, overwrite in ((False, False), (True, False), (False, True)):
            with pytest.raises(ConfigError, match=rf"output_dir {out} is in use by another "
                                                  rf"preftune run \(pid {holder.pid} on "):
                prepare_output_dir(str(out), resume=resume, overwrite=overwrite)
        # before its first checkpoint too: not "holds no checkpoint ... without --resume"
        with pytest.raises(ConfigError, match=rf"output_dir {out} is in use by another "
                                              rf"preftune run \(pid {holder.pid} on "):
            loop.train(build_config(tree), resume=True, show_progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # nothing moved aside
    finally:
        holder.kill()
        holder.wait()
    assert prepare_output_dir(str(out), resume=True) == out  # killed: the lock went with it
    assert prepare_output_dir(str(out), resume=True) == out  # this process may claim it again


def test_alarms_fire_once_across_a_resume(workspace, monkeypatch):  # noqa: F811
    """Each kind fires once per run: the checkpoint keeps what the checks remember, and
    alarms.jsonl loses the alarms of the steps a resume replays."""
    settings = dict(train__max_steps=6, train__save_every=2, train__batch_size=4,
                    train__learning_rate=0.0, train__keep_checkpoints=3)  # nothing moves
    straight = run(workspace, "alarm-straight", **settings)
    expected = [json.loads(line) for line in (straight / "alarms.jsonl").read_text().splitlines()]
    assert [(a["kind"], a["step"]) for a in expected] == [("policy_not_moving", 3)]
    out = crashed_run(workspace, "alarm-resumed", monkeypatch, 4, **settings)
    monkeypatch.undo()
    loop.train(build_config(_saved(out)), resume=True, show_progress=False)  # from step 4
    assert (out / "alarms.jsonl").read_text() == (straight / "alarms.jsonl").read_text()
    assert [r.get("alarms") for r in read_metrics(out / "metrics.jsonl") if "alarms" in r] == \
        [["policy_not_moving"]]
    # from the step-2 checkpoint, step 3 is replayed: its alarm is written once, not twice
    out = crashed_run(workspace, "alarm-replayed", monkeypatch, 4, **settings)
    monkeypatch.undo()
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    loop.train(build_config(_saved(out)), resume=True, show_progress=False)
    assert (out / "alarms.jsonl").read_text() == (straight / "alarms.jsonl").read_text()


def test_a_checkpoint_that_cannot_be_written_is_named_and_removed(workspace,  # noqa: F811
                                                                 monkeypatch):
    """A full disk mid-checkpoint (torch reports it as "unexpected pos"): the error names the
    step, the directory and the free space, the partial checkpoint is removed, and --resume
    continues from the one before."""
    from preftune.train import checkpoint as checkpoint_module

    settings = dict(train__max_steps=6, train__save_every=2, train__batch_size=4)
    straight = run(workspace, "disk-straight", **settings)
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt") and "step-00000004" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2888320 "
                               "vs 2888208")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(ConfigError, match=r"the checkpoint of step 4 could not be written to "
                                          r".*checkpoints \(\[enforce fail .* unexpected pos "
                                          r"2888320 vs 2888208; \d+ MB free there\); the partial "
                                          r"checkpoint was removed. .* --resume"):
        run(workspace, "disk-full", **settings)
    monkeypatch.undo()
    out = workspace / "runs" / "disk-full"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    resumed = loop.train(build_config(_saved(out)), resume=True, show_progress=False)
    assert losses(resumed) == losses(straight)


def test_a_run_refused_after_its_model_loaded_takes_back_its_header_too(workspace,  # noqa: F811
                                                                       capsys):
    """A refusal that comes once the model has loaded (here: a listwise objective on pairs)
    follows config.yaml and data_report.json: the directory the run made goes, and the run
    --overwrite moved aside comes back."""
    with pytest.raises(DataError, match="listwise_pl trains on ranked data"):
        run(workspace, "refused-late", objective__name="listwise_pl")
    assert not (workspace / "runs" / "refused-late").exists()
    kept = run(workspace, "kept-late", train__max_steps=2)
    before = {p.name: p.stat().st_mtime_ns for p in kept.iterdir()}
    capsys.readouterr()
    with pytest.raises(DataError, match="listwise_pl trains on ranked data"):
        loop.train(build_config({**_saved(kept), "objective": {"name": "listwise_pl"}}),
                   show_progress=False, overwrite=True)
    assert {p.name: p.stat().st_mtime_ns for p in kept.iterdir()} == before
    assert f"was moved back to {kept}: the new run wrote nothing" in capsys.readouterr().out


def test_no_training_data_is_said_before_a_model_loads(tmp_path, capsys, monkeypatch):
    """(the bundled model's first use converts it, half a minute, before the run said so)"""
    import preftune.reward.train as reward_train
    import preftune.train.loop as loop

    monkeypatch.setattr(loop, "load_tokenizer", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(reward_train, "backbone_tokenizer",
                        lambda *a, **k: pytest.fail("a model loaded"))
    for command in (["train"], ["rm", "train"]):
        assert main([*command, "--set", f"output_dir={tmp_path / 'run'}"]) == 2
        assert "error: data.train is empty: name a preference data file" in \
            capsys.readouterr().err
