"""The report shows every alarm where it happened: an online run's alarms from each round at
the joined steps, and a run whose every logged loss is NaN keeps its loss plot."""

import json
import math

from preftune.cli import main
from preftune.report.panels import build_panels
from preftune.report.rundir import load_run


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_an_online_runs_report_shows_each_rounds_alarms_at_the_joined_steps(tmp_path):
    run = tmp_path / "online"
    _write(run / "round-1" / "metrics.jsonl", [{"step": s, "loss": 0.7} for s in (1, 2, 3)])
    _write(run / "round-2" / "metrics.jsonl",
           [{"step": 1, "loss": 0.6}, {"step": 2, "loss": 0.9, "alarms": ["no_signal"]},
            {"step": 3, "loss": 0.5}])
    _write(run / "round-2" / "alarms.jsonl",
           [{"kind": "no_signal", "step": 2, "message": "every example of this step ..."}])
    (run / "online.json").write_text(json.dumps(
        {"rounds": [{"round": 1, "train": {"steps": 3}, "evaluate": {"prompts": 5, "mean_score": 0.5}},
                    {"round": 2, "train": {"steps": 3}, "evaluate": {"prompts": 5, "mean_score": 0.5}}]}))
    for number, examples in ((1, 6), (2, 4)):
        (run / f"round-{number}" / "run.json").write_text(json.dumps(
            {"objective": "dpo", "steps": 3, "train_examples": examples, "eval_examples": 0}))
    info = load_run(run).run_info  # the rounds' totals, and the prompts each is measured on
    assert (info["steps"], info["train_examples"], info["eval_examples"]) == (6, 10, 5)
    assert load_run(run).alarms == [{"kind": "no_signal", "step": 5, "round": 2,
                                     "message": "every example of this step ..."}]
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "<h2>Alarms (1)</h2>" in page
    assert ('<tr><td class="num">5</td><td class="num">2</td><td class="kind">no_signal</td>'
            in page)


def test_a_run_whose_every_logged_loss_is_nan_keeps_its_loss_plot(tmp_path):
    run = tmp_path / "nan"
    records = [{"step": s, "loss": math.nan, "grad_norm": math.nan, "lr": 1e-3,
                "alarms": ["weights_non_finite"] if s == 2 else []} for s in (2, 4)]
    _write(run / "metrics.jsonl", records)
    _write(run / "alarms.jsonl", [{"kind": "weights_non_finite", "step": 2, "message": "m"}])
    assert [panel.name for panel in build_panels(records)] == ["loss", "lr"]
    (run / "report").mkdir()
    (run / "report" / "rewards.png").write_bytes(b"an earlier report's panel")
    assert main(["report", str(run)]) == 0
    assert sorted(p.name for p in (run / "report").iterdir()) == ["loss.png", "lr.png"]
    assert (run / "report" / "loss.png").stat().st_size > 1000
    assert "Also marked as dotted lines on the loss plot." in (run / "report.html").read_text()


def test_held_out_diagnostics_in_nats_and_fractions_get_their_own_plots():
    records = [{"step": 4, "loss": 0.5, "eval/diag/displacement/chosen": -1.5,
                "eval/diag/displacement/rejected": -3.0,
                "eval/diag/displacement/chosen_fell": 0.25, "eval/diag/ranking/summed": 0.75}]
    panels = {panel.name: [curve.key for curve in panel.series]
              for panel in build_panels(records)}
    assert panels["displacement"] == ["eval/diag/displacement/chosen",
                                      "eval/diag/displacement/rejected"]
    assert panels["ranking"] == ["eval/diag/displacement/chosen_fell", "eval/diag/ranking/summed"]
