"""`preftune compare`: every objective trained and evaluated alike, a leaderboard, resumable."""

import json

import pytest
import torch
import yaml

from preftune.cli import main
from preftune.compare import _with_base_params
from tiny_models import save_tiny_model_dir

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    save_tiny_model_dir(root / "model")
    pairs = [{"prompt": f"{a}+{a}=", "chosen": f" {2 * a}", "rejected": f" {2 * a + 1}!"}
             for a in range(10)]
    (root / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:8]))
    (root / "eval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[8:]))
    config = {"model": {"path": str(root / "model")},
              "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"),
                       "max_length": 32, "max_prompt_length": 16},
              "reference": {"cache_dir": str(root / "cache")},
              "train": {"learning_rate": 1e-2, "batch_size": 4, "max_steps": 2, "seed": 3}}
    (root / "base.yaml").write_text(yaml.safe_dump(config))
    return root


def _compare(base, objectives):
    return main(["compare", "--objectives", objectives, "--config", str(base / "base.yaml"),
                 "--output-dir", str(base / "out"), "--samples", "1", "--max-new-tokens", "3"])


def test_compare_trains_evaluates_and_ranks_then_skips_finished_entries(base, capsys):
    # kto trains on the pairs split into labelled completions; triple_po needs a gold response
    # this data lacks, so it fails on its own without costing the others (the exit code says so)
    assert _compare(base, "dpo,kto,triple_po") == 1
    assert capsys.readouterr().err.endswith(
        f"compare: 1 of 3 objectives failed (triple_po); see {base / 'out' / 'leaderboard.md'}\n")
    out = base / "out"
    board = (out / "leaderboard.md").read_text()
    for name in ("dpo", "kto"):
        assert (out / name / "model" / "model.safetensors").exists()
        assert (out / name / "eval.json").exists() and (out / name / "report.html").exists()
        assert f"| {name} |" in board and f"[report]({name}/report.html)" in board
        assert json.loads((out / name / "run.json").read_text())["steps"] == 2
    assert "| triple_po | failed: " in board and "gold" in board
    # a script learns of it too: raised once the leaderboard is written (the rerun skips the
    # finished objectives and fails triple_po again)
    from preftune import api

    with pytest.raises(api.ObjectivesFailed, match=r"^compare: 1 of 3 objectives failed "
                                                   r"\(triple_po\)") as failure:
        api.compare("dpo,kto,triple_po", str(base / "base.yaml"), output_dir=out, samples=1,
                    max_new_tokens=3)
    assert failure.value.failed == ["triple_po"] and failure.value.output_dir == out
    entries = {e["objective"]: e for e in json.loads((out / "leaderboard.json").read_text())}
    assert entries["dpo"]["rewards/accuracy"] == pytest.approx(
        json.loads((out / "dpo" / "eval.json").read_text())["rewards/accuracy"])
    assert (out / "leaderboard.png").stat().st_size > 1000
    model_time = (out / "dpo" / "model" / "model.safetensors").stat().st_mtime
    capsys.readouterr()

    assert _compare(base, "dpo,kto") == 0  # a rerun trains nothing that already finished
    printed = capsys.readouterr().out
    assert "dpo: finished earlier" in printed and "kto: finished earlier" in printed
    assert (out / "dpo" / "model" / "model.safetensors").stat().st_mtime == model_time

    # only the evaluation changes (more new tokens): evaluated again, the runs kept as they
    # were (they were trained again, the old ones moved aside)
    minutes = entries["dpo"]["train_minutes"]
    assert main(["compare", "--objectives", "dpo", "--config", str(base / "base.yaml"),
                 "--output-dir", str(out), "--samples", "1", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert "nothing is left to train" in printed and "moved to" not in printed
    assert (out / "dpo" / "model" / "model.safetensors").stat().st_mtime == model_time
    assert not list(out.glob("dpo.old-*"))
    (entry,) = json.loads((out / "leaderboard.json").read_text())
    assert entry["train_minutes"] == minutes
    assert entry["fingerprint"] != entries["dpo"]["fingerprint"]


def test_compare_rejects_unknown_objectives_before_training(base, capsys):
    assert _compare(base, "dpo,dpoo") == 2
    assert "unknown objective 'dpoo'" in capsys.readouterr().err
    assert main(["compare", "--objectives", "dpo", "--config", str(base / "base.yaml"),
                 "--output-dir", str(base / "typo"), "--scorer", "syntetic"]) == 2
    assert "--scorer: scorer 'syntetic': expected" in capsys.readouterr().err
    assert not (base / "typo").exists()


def test_held_out_pairs_are_read_with_data_fields_and_checked_before_training(base, capsys):
    """The evaluation reads data.eval as training does (a renamed prompt column); a missing
    --eval-data file stops the comparison before anything trains or is written."""
    rows = [json.loads(line) for line in (base / "train.jsonl").open()]
    rows += [json.loads(line) for line in (base / "eval.jsonl").open()]
    for split, part in (("train", rows[:8]), ("eval", rows[8:])):
        (base / f"question_{split}.jsonl").write_text("".join(
            json.dumps({"question": r["prompt"], "chosen": r["chosen"],
                        "rejected": r["rejected"]}) + "\n" for r in part))
    config = yaml.safe_load((base / "base.yaml").read_text())
    config["data"].update({"train": str(base / "question_train.jsonl"),
                           "eval": str(base / "question_eval.jsonl"),
                           "fields": {"prompt": "question"}})
    (base / "fields.yaml").write_text(yaml.safe_dump(config))
    args = ["compare", "--objectives", "dpo", "--config", str(base / "fields.yaml"),
            "--samples", "0"]
    assert main([*args, "--output-dir", str(base / "fields")]) == 0
    (entry,) = json.loads((base / "fields" / "leaderboard.json").read_text())
    assert "error" not in entry and entry["pairs"] == 2
    assert json.loads((base / "fields" / "dpo" / "eval.json").read_text())["pairs"] == 2
    capsys.readouterr()

    missing = base / "no_such_eval.jsonl"
    assert main([*args, "--output-dir", str(base / "missing"), "--eval-data",
                 str(missing)]) == 2
    captured = capsys.readouterr()
    assert f"error: {missing}: file not found" in captured.err
    assert "training in" not in captured.out and not (base / "missing").exists()


def test_a_signal_stops_the_comparison_and_the_same_command_resumes_the_objective(
        base, capsys, monkeypatch):
    """SIGTERM during dpo's first step: the comparison stops there (kto is not started), with
    a checkpoint; the same command again continues dpo from it, not from step 0."""
    import os
    import signal

    from preftune.train import trainer as trainer_module

    real_step, steps, sent = trainer_module.Trainer.step, [], []

    def step_then_signal(self, step):
        steps.append(step)
        if not sent:  # (once: the run again gets none)
            sent.append(os.kill(os.getpid(), signal.SIGTERM))  # the step ends, a checkpoint
        return real_step(self, step)

    monkeypatch.setattr(trainer_module.Trainer, "step", step_then_signal)
    out = ["--output-dir", str(base / "stopped"), "--samples", "1", "--max-new-tokens", "3"]
    args = ["compare", "--objectives", "dpo,kto", "--config", str(base / "base.yaml"), *out]
    assert main(args) == 143  # 128 + SIGTERM
    assert "compare, objective dpo: stopped by SIGTERM after step 1 of 2" in capsys.readouterr().err
    assert steps == [0] and not (base / "stopped" / "kto").exists()
    state_file = base / "stopped" / "dpo" / "checkpoints" / "step-00000001" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["train_seconds"] > 0  # the seconds trained before the signal
    state_file.write_text(json.dumps({**state, "train_seconds": 600.0}))  # as if 10 minutes

    steps.clear()
    assert main(args) == 0
    assert steps == [1, 0, 1]  # dpo's second step, then kto's two
    assert not list((base / "stopped").glob("dpo.old-*"))  # nothing moved aside
    dpo = base / "stopped" / "dpo"
    assert [json.loads(line)["step"] for line in (dpo / "metrics.jsonl").open()] == [1, 2]
    # its minutes are the whole run's, the part before the signal included
    seconds = json.loads((dpo / "run.json").read_text())["train_seconds"]
    assert 600 <= seconds < 600 + 300  # (the resumed step itself may round to 0.0 s)
    entries = {e["objective"]: e for e in
               json.loads((base / "stopped" / "leaderboard.json").read_text())}
    assert entries["dpo"]["train_minutes"] == pytest.approx(seconds / 60)


def test_a_signal_in_an_objectives_last_step_stops_the_comparison_after_it(
        base, capsys, monkeypatch):
    """SIGINT in dpo's last step: dpo finishes and saves, and kto does not start (the next
    objective's run cleared the signal, so the comparison went on)."""
    import os
    import signal

    from preftune.train import trainer as trainer_module

    real_step, steps = trainer_module.Trainer.step, []

    def step_then_signal(self, step):
        steps.append(step)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # dpo's second and last step
        return real_step(self, step)

    monkeypatch.setattr(trainer_module.Trainer, "step", step_then_signal)
    out = ["--output-dir", str(base / "late"), "--samples", "1", "--max-new-tokens", "3"]
    args = ["compare", "--objectives", "dpo,kto", "--config", str(base / "base.yaml"), *out]
    assert main(args) == 130
    assert "compare, objective dpo: stopped by SIGINT after its run (it came during the last " \
        "step)" in capsys.readouterr().err
    assert steps == [0, 1] and (base / "late" / "dpo" / "model").is_dir()
    assert not (base / "late" / "kto").exists()


def test_plan_prints_each_objectives_plan_and_writes_nothing(base, capsys):
    """dpo on the pairs, kto on them split into labelled completions: each one's --plan."""
    assert main(["compare", "--objectives", "dpo,kto", "--config", str(base / "base.yaml"),
                 "--output-dir", str(base / "planned"), "--plan"]) == 0
    printed = capsys.readouterr().out
    dpo, kto = printed.split(f"[compare] kto: the plan of {base / 'planned' / 'kto'}")
    assert f"[compare] dpo: the plan of {base / 'planned' / 'dpo'}" in dpo
    assert "objective          dpo (pairs, needs reference)" in dpo and "  total " in dpo
    assert "objective          kto (unpaired, needs reference)" in kto and "  total " in kto
    assert not (base / "planned").exists()


@pytest.mark.parametrize("fails", [False, True])
def test_an_objectives_models_are_released_before_the_next_one(tmp_path, monkeypatch, fails):
    """What one objective's work held (a model in a reference cycle, as transformers' first
    load in a process leaves one) is freed when its entry returns, with the garbage collector
    off, also when it failed: its traceback held it until then."""
    import gc
    import weakref

    from preftune.compare import run_entry
    from preftune.config import ConfigError

    import preftune.report

    monkeypatch.setattr(preftune.report, "write_report", lambda run_dir: None)
    (tmp_path / "dpo").mkdir()
    held = []

    def work(entry):
        model = torch.nn.Linear(4, 4)
        model.__dict__["cycle"] = [model]
        held.append(weakref.ref(model))
        if fails:
            raise ConfigError("out of memory, say")

    gc.collect()
    gc.disable()
    try:
        entry = run_entry("dpo", tmp_path / "dpo", ["settings"], work)
    finally:
        gc.enable()
    assert ("error" in entry) == fails and held[0]() is None


def test_param_trains_one_objective_with_other_parameters_and_a_change_retrains(base, capsys):
    out = base / "params"
    common = ["compare", "--objectives", "dpo", "--config", str(base / "base.yaml"),
              "--output-dir", str(out), "--samples", "0"]
    assert main(common + ["--param", "dpo.beta=0.5"]) == 0
    trained = yaml.safe_load((out / "dpo" / "config.yaml").read_text())
    assert trained["objective"] == [{"name": "dpo", "weight": 1.0, "beta": 0.5}]
    capsys.readouterr()
    # the base objective's own parameters configure it when it is compared
    assert main(common + ["--set", "objective.beta=0.25"]) == 0
    assert "dpo: finished earlier" not in capsys.readouterr().out  # other settings: trained again
    trained = yaml.safe_load((out / "dpo" / "config.yaml").read_text())
    assert trained["objective"][0]["beta"] == 0.25
    tree = {"objective": {"name": "dpo", "beta": 0.25}}  # and --param wins over them
    assert _with_base_params(tree, ["dpo", "ipo"], {"dpo": {"beta": 0.3}}) == {"dpo": {"beta": 0.3}}
    assert _with_base_params(tree, ["dpo", "ipo"], {"ipo": {"beta": 1}}) == {
        "dpo": {"beta": 0.25}, "ipo": {"beta": 1}}


@pytest.mark.parametrize("argv, expected", [
    (["--param", "dpo.bta=0.5"], "bta"),  # a typo: before anything trains
    (["--param", "ipo.beta=0.5"], "--param ipo.KEY: ipo is not one of --objectives (dpo)."),
    (["--param", "beta=0.5"], "expected OBJECTIVE.KEY=VALUE"),
    (["--set", "objective.name=ipo", "--set", "objective.beta=0.5"],
     "the base config's objective ipo sets beta, but ipo is not among --objectives (dpo)"),
])
def test_objective_parameters_that_would_be_dropped_are_refused(base, capsys, argv, expected):
    out = base / "refused"
    assert main(["compare", "--objectives", "dpo", "--config", str(base / "base.yaml"),
                 "--output-dir", str(out)] + argv) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_an_entry_whose_data_was_edited_is_trained_again(base, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text((base / "train.jsonl").read_text())
    command = ["compare", "--objectives", "dpo", "--config", str(base / "base.yaml"),
               "--output-dir", str(tmp_path / "out"), "--samples", "0",
               "--set", f"data.train={data}"]
    assert main(command) == 0
    assert main(command) == 0
    assert "dpo: finished earlier with the same settings, skipped" in capsys.readouterr().out
    data.write_text(data.read_text().replace("=", " ="))  # every prompt edited
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "finished earlier" not in printed and "was moved to" in printed
