"""`preftune report`: a fake run directory in, one self-contained HTML page and PNGs out."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from preftune.cli import main
from preftune.report.panels import build_panels

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALARM_MESSAGE = "chosen responses are 6.2 nats less likely than under the reference"


def _step(step: int) -> dict:
    """One metrics record of a composite dpo + sft run, drifting the way a real one does."""
    return {"step": step, "loss": 0.7 - 0.1 * step, "loss/dpo": 0.6 - 0.1 * step,
            "loss/sft": 0.1, "rewards/chosen": 0.1 * step, "rewards/rejected": -0.2 * step,
            "rewards/margins": 0.3 * step, "rewards/accuracies": min(1.0, 0.5 + 0.1 * step),
            "logps/chosen": -10.0 - step, "logps/rejected": -12.0 - 3 * step,
            "logps/ref_chosen": -10.0, "logps/ref_rejected": -12.0, "lr": 1e-5 * step,
            "grad_norm": 5.0 / step, "tokens_per_second": 100.0 + step,
            "padding_fraction": 0.1, "step_seconds": 1.5, "kl/mean": 0.01 * step}


def exit_code(argv: list[str]) -> int:
    """The exit status a shell would see for ``preftune ARGV``."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def make_run(root: Path, steps: int = 6) -> Path:
    """A run directory as `preftune train` leaves it: an alarm at step 3, eval at the end."""
    run = root / "run"
    run.mkdir()
    records = [_step(step) for step in range(1, steps + 1)]
    records[2]["alarms"] = ["likelihood_displacement"]
    records[-1].update({"eval/loss": 0.2, "eval/rewards/margins": 1.2,
                        "eval/rewards/accuracies": 0.9})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "alarms.jsonl").write_text(json.dumps(
        {"kind": "likelihood_displacement", "step": 3, "message": ALARM_MESSAGE}) + "\n")
    (run / "run.json").write_text(json.dumps(
        {"objective": "dpo+0.2*sft", "params": {"dpo": {"beta": 0.1}, "sft": {}},
         "reference": "precomputed", "layout": "prefix_shared", "steps": steps,
         "train_examples": 48, "eval_examples": 8}))
    (run / "data_report.json").write_text(json.dumps(
        {"shape": "pairs", "train": {"records": 50, "kept": 48, "dropped_too_long": 2}}))
    (run / "config.yaml").write_text("objective:\n- name: dpo\n  beta: 0.1\n")
    (run / "eval.json").write_text(json.dumps(
        {"rewards/accuracy": 0.875, "win_rate": 0.4, "pairs": 96, "note": "text",
         "settings": {"beta": 0.1, "samples": 4}}))
    return run


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A fake run with its report written through the command line."""
    run = make_run(tmp_path_factory.mktemp("report"))
    assert main(["report", str(run)]) == 0
    return run


def test_page_is_self_contained_with_embedded_figures(reported):
    html = (reported / "report.html").read_text()
    figures = sorted((reported / "report").glob("*.png"))
    assert html.count('src="data:image/png;base64,') == len(figures) >= 8
    assert not re.search(r'(src|href)\s*=\s*"?(https?:)?//', html)
    assert "<script" not in html and "<link" not in html and "url(" not in html
    for text in ["dpo+0.2*sft", "dpo: beta=0.1", "precomputed", "prefix_shared",
                 "dropped_too_long 2", "likelihood_displacement", ALARM_MESSAGE,
                 "rewards/accuracy", "0.875", "win_rate", ">96<"]:
        assert text in html, text
    assert "samples" not in html  # nested settings of eval.json are not metrics


def test_every_panel_is_a_png_file_for_papers(reported):
    names = {path.stem for path in (reported / "report").glob("*.png")}
    assert {"loss", "rewards", "accuracy", "logps", "lr", "grad_norm", "tokens_per_second",
            "padding_fraction", "kl"} <= names
    for path in (reported / "report").glob("*.png"):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, path
        with Image.open(path) as image:
            assert image.size[0] >= 800 and image.size[1] >= 400


def test_panels_group_an_open_set_of_keys_and_overlay_eval_on_train():
    records = [{"step": 1, "loss": 1.0, "loss/kto": 0.9, "rewards/desirable": 0.1,
                "rewards/undesirable": -0.1, "rewards/top1_accuracy": 0.5, "kl/mean": 0.0,
                "alarms": ["accuracy_at_chance"], "eval/rewards/desirable": 0.2,
                "eval/only_eval": 3.0, "padding_fraction": 0.0}]  # no padding: not drawn
    panels = {panel.name: [curve.key for curve in panel.series] for panel in build_panels(records)}
    assert panels == {"loss": ["loss", "loss/kto"],
                      "rewards": ["rewards/desirable", "rewards/undesirable",
                                  "eval/rewards/desirable"],
                      "accuracy": ["rewards/top1_accuracy"], "kl": ["kl/mean"],
                      "only_eval": ["eval/only_eval"]}


def test_output_option_and_an_unfinished_run(tmp_path, capsys):
    run = tmp_path / "running"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69, "lr": 1e-6}) + "\n"
                                       + '{"step": 2, "lo')  # the next line, being written
    output = tmp_path / "elsewhere.html"
    assert main(["report", str(run), "--output", str(output)]) == 0
    html = output.read_text()
    assert "run.json is missing" in html and "No alarms fired" in html
    assert "1 (last: 1)" in html
    assert not (run / "report.html").exists()
    assert sorted(p.name for p in (run / "report").glob("*.png")) == ["loss.png", "lr.png"]
    assert str(output) in capsys.readouterr().out


def test_output_in_a_new_folder_is_written_and_a_folder_as_output_is_refused(tmp_path, capsys):
    run = make_run(tmp_path)
    output = tmp_path / "pages" / "june" / "run.html"
    assert exit_code(["report", str(run), "--output", str(output)]) == 0
    assert output.read_text().count('src="data:image/png;base64,') == 10
    assert exit_code(["report", str(run), "--output", str(tmp_path / "pages")]) == 2
    err = capsys.readouterr().err
    assert f"--output {tmp_path / 'pages'} is a folder" in err
    assert f"e.g. {tmp_path / 'pages' / 'report.html'}" in err
    assert sorted(p.name for p in (tmp_path / "pages").iterdir()) == ["june"]


def test_the_page_replaces_only_an_earlier_report(tmp_path, capsys):
    """(--output replaced any file: the run's own metrics.jsonl, a config, the user's data.)
    A path ending in a slash is a folder, and the page goes in it as report.html."""
    run = make_run(tmp_path)
    metrics = (run / "metrics.jsonl").read_text()
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    for kept in (run / "metrics.jsonl", data):
        assert exit_code(["report", str(run), "--output", str(kept)]) == 2
        assert (f"--output {kept} exists and is not a preftune report; the report replaces "
                "only an earlier one") in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == metrics and data.read_text().startswith('{"')
    page = tmp_path / "page.html"
    for _ in range(2):  # an earlier report is replaced
        assert exit_code(["report", str(run), "--output", str(page)]) == 0
    assert exit_code(["report", str(run), "--output", f"{tmp_path / 'pages'}/"]) == 0
    assert (tmp_path / "pages" / "report.html").read_text().startswith("<!doctype html>")
    (run / "report.html").write_text("my notes")  # the default path, taken by another file
    assert exit_code(["report", str(run)]) == 2
    assert f"the report's path {run / 'report.html'} exists and is not a preftune report" in \
        capsys.readouterr().err


@pytest.mark.parametrize("case, expected", [
    ("no_dir", ["is not a directory", "output_dir"]),
    ("no_metrics", ["metrics.jsonl not found"]),
    ("empty_metrics", ["metrics.jsonl has no steps yet"]),
    ("bad_line", ["metrics.jsonl:2:", "not valid JSON"]),
    ("bad_alarms", ["alarms.jsonl:1:", "not valid JSON"]),
    ("bad_bytes", ["metrics.jsonl:2: not valid UTF-8 (invalid start byte at byte 25)"]),
    ("bad_config_bytes", ["config.yaml:1: not valid UTF-8"]),
    # (these were tracebacks, or said the wrong thing)
    ("answer_without_origin", ["eval_generations.jsonl:1: field 'origin' is missing"]),
    ("rounds_not_a_list", ["online.json: field 'rounds' should be a list"]),
    ("round_without_number", ["online.json: rounds[0] should be an object with an integer "
                              "'round'"]),
    ("online_before_round_1", ["is an online run whose first round has not finished"]),
    ("compare_output", ["is the output of preftune compare: its leaderboard is"]),
    ("trained_round_deleted", ["online.json says round 1 trained, and", "round-1 holds no "
                               "metrics.jsonl: was it moved or deleted?"]),
])
def test_unusable_run_dirs_are_clear_errors(tmp_path, capsys, case, expected):
    run = tmp_path / "run"
    if case != "no_dir":
        run.mkdir()
    good = json.dumps({"step": 1, "loss": 0.5}) + "\n"
    contents = {"empty_metrics": "\n", "bad_line": good + '{"step": 2, "loss": \n',
                "bad_alarms": good}
    if case in contents:
        (run / "metrics.jsonl").write_text(contents[case])
    if case == "bad_alarms":
        (run / "alarms.jsonl").write_text("{oops\n")
    if case == "bad_bytes":
        (run / "metrics.jsonl").write_bytes(good.encode() + b"\xff\xfe\n")
    if case == "bad_config_bytes":
        (run / "metrics.jsonl").write_text(good)
        (run / "config.yaml").write_bytes("train: {seed: 1}\n".encode("utf-16"))
    if case == "answer_without_origin":
        (run / "metrics.jsonl").write_text(good)
        (run / "eval_generations.jsonl").write_text('{"step": 1, "prompt": "p"}\n')
    online = {"rounds_not_a_list": {"rounds": "x"},
              "round_without_number": {"rounds": [{"evaluate": 3}]},
              "trained_round_deleted": {"rounds": [{"round": 1, "train": {"steps": 2}}]}}
    if case in online:
        (run / "online.json").write_text(json.dumps(online[case]))
    if case == "online_before_round_1":
        (run / "round-1").mkdir()
    if case == "compare_output":
        (run / "leaderboard.json").write_text("[]")
    assert exit_code(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(run) in err
    for text in expected:
        assert text in err, err


def _check_report_script():
    spec = importlib.util.spec_from_file_location("check_report", ROOT / "scripts/check_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_page_renders_in_headless_chromium_offline(reported, tmp_path):
    script = _check_report_script()
    if script.find_chromium() is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium, or set CHROMIUM); "
                    "the page is still checked for external references above")
    shot = tmp_path / "shot.png"
    assert script.main([str(reported), "--screenshot", str(shot), "--size", "1200x1600"]) == 0
    with Image.open(shot) as image:
        assert image.size == (1200, 1600)
    # The top of the page: header cards, the alarms table and the first rows of plots.
    assert script.distinct_colours(shot) > 500


def test_a_diffusion_evaluation_shows_its_numbers_under_what_they_were_measured_against(
        tmp_path):
    """diffusion eval writes its settings beside its numbers: they are said in a line above
    the table (reference, scorer, prompts x seeds), not listed as metrics."""
    run = make_run(tmp_path)
    (run / "eval.json").write_text(json.dumps(
        {"win_rate": 0.75, "scorer": "shape_colour", "mean_score/policy": 0.6,
         "mean_score/reference": 0.4, "samples": 6, "sampling_steps": 20, "model": "m",
         "reference": "runs/pretrain/model", "dtype": "float32", "prompts": ["a", "b"],
         "seeds": [0, 1, 2], "negative_prompt": "", "true_cfg_scale": 1.0}))
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    table = html[html.index("<h2>Evaluation (eval.json)</h2>"):]
    table = table[:table.index("</table>")]
    assert "against runs/pretrain/model; judged by shape_colour; on 2 prompts x 3 seeds, 20 " \
        "sampling steps." in table
    metrics = re.findall(r"<tr><td>([^<]+)</td>", table)
    assert metrics == ["win_rate", "mean_score/policy", "mean_score/reference", "samples"]


def test_the_data_table_says_records_left_out_without_a_named_reason():
    """(Ranked image lists whose images all tie are left out, 4 records and 3 kept, and the
    table said "none".)"""
    from preftune.report.page import _data_report

    table = _data_report({"shape": "ranked image lists", "train": {"records": 4, "kept": 3}})
    assert "<td>left out 1</td>" in table and "none" not in table
    named = _data_report({"train": {"records": 5, "kept": 4, "dropped_too_long": 1}})
    assert "<td>dropped_too_long 1</td>" in named
    assert "none" in _data_report({"train": {"records": 2, "kept": 2}})


def test_the_data_table_holds_splits_only_and_says_what_made_and_left_out_its_records():
    """(data.on_error's skipped rows and UDM's report were rows of the table, a raw Python
    list in a cell; converted counts stood beside a file of half as many records.)"""
    from preftune.report.page import _data_report

    table = _data_report({
        "train": {"records": 96, "kept": 95, "empty_responses": 1,
                  "origins": {"empty_responses": ["t.jsonl:7"]}},
        "eval": {"records": 32, "kept": 32},
        "convert": {"conversions": "unpaired", "read": {"train": 48, "eval": 16}},
        "skipped_rows": {"count": 2, "reasons": ["t.jsonl:3: missing 'rejected'", "t.jsonl:9"]},
        "udm": {"accuracy": 0.5}})
    assert re.findall(r"<tr><td>([^<]+)</td>", table) == [
        "train (data.convert unpaired of the 48 read)",
        "eval (data.convert unpaired of the 16 read)"]
    assert "<td>empty_responses 1 (e.g. t.jsonl:7)</td>" in table
    assert "<p>Malformed records left out (data.on_error: skip): 2, the first: t.jsonl:3: " \
        "missing &#x27;rejected&#x27;</p>" in table
