"""`preftune demo --vision --quick`: the vision demo's whole path, small."""

import json

import pytest

from preftune.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


def test_quick_vision_demo(tmp_path, capsys):
    out = tmp_path / "vision-demo"
    (out / "sft").mkdir(parents=True)  # an earlier demo's first run: moved aside, kept whole
    (out / "sft" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["demo", "--vision", "--quick", "--output-dir", str(out)]) in (0, None)
    (earlier,) = tmp_path.glob("vision-demo.old-*")
    assert (earlier / "sft" / "metrics.jsonl").read_text() == '{"step": 1}\n'
    record = json.loads((out / "demo_results.json").read_text())
    assert list(record["results"]) == ["SFT", "SFT, more steps", "DPO", "mDPO"]
    for folder in ("sft", "sft-more", "dpo", "mdpo"):
        assert (out / folder / "model" / "processor_config.json").exists()
    # each run measured the same held-out images; pass rates are shares of 12 answers
    for result in record["results"].values():
        assert result["pass_rate"] * 12 == pytest.approx(round(result["pass_rate"] * 12))
        assert len(result["samples"]) == 6
    # mDPO trained on corrupted copies of the images (data.convert: images:corrupt)
    config = (out / "mdpo" / "config.yaml").read_text()
    assert "images:corrupt" in config and "name: mdpo" in config
    table = (out / "demo_results.md").read_text()
    assert table.startswith("| held-out (12 images) | SFT | SFT, more steps | DPO | mDPO |")
    # the held-out data carries checkers, so `preftune eval --scorer synthetic` judges answers
    assert main(["eval", "--model", str(out / "dpo"), "--data", str(out / "data" / "eval.jsonl"),
                 "--reference", str(out / "sft" / "model"), "--scorer", "synthetic"]) in (0, None)
    results = json.loads((out / "dpo" / "eval.json").read_text())
    assert results["win_rate/prompts"] == 12
    answers = [json.loads(line) for line in open(out / "dpo" / "eval_answers.jsonl")]
    assert all(row["policy_score"] in (0.0, 1.0) for row in answers)


def test_an_earlier_demo_in_the_working_directory_is_not_moved(tmp_path, monkeypatch, capsys):
    """``--output-dir .`` over an earlier demo: the working directory cannot be moved aside;
    said in one line (it was a traceback), nothing moved."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert main(["demo", "--vision", "--quick", "--output-dir", "."]) == 2
    assert "error: . is the working directory (or holds it), which cannot be moved aside" in \
        capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
