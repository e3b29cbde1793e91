"""``preftune compare`` on a diffusion config: each objective trains from the same pipeline and
is scored by win rate over the untrained pipeline on the config's fixed prompts and seeds."""

import json

import pytest
import yaml

pytest.importorskip("diffusers")

from diffusion_fixtures import config_tree, one_thread, tiny_pipeline, write_pairs  # noqa: F401,E402
from forked_python import run_python  # noqa: E402

from preftune.config import ConfigError  # noqa: E402
from preftune.diffusion.evaluate import win_rate  # noqa: E402
from preftune.diffusion.model import load_diffusion_model  # noqa: E402
from preftune.diffusion.shapes import ColourScorer  # noqa: E402

PROMPTS, SEEDS = ["a red circle", "a blue square"], [0, 1]


def _config(tmp_path, **samples):
    pipeline = tiny_pipeline(tmp_path / "pipe")
    pairs = write_pairs(tmp_path / "data", count=6)
    tree = config_tree(pipeline, pairs, tmp_path / "unused", samples={
        "prompts": PROMPTS, "seeds": SEEDS, "steps": 3, **samples})
    tree["train"]["learning_rate"] = 1e-3
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path, pipeline


def test_compare_trains_each_objective_and_ranks_by_the_scorers_win_rate(tmp_path):
    config, pipeline = _config(tmp_path)
    out = tmp_path / "cmp"
    command = ["-m", "preftune", "compare", "--objectives", "diffusion_dpo,mapo", "--config",
               str(config), "--scorer", "shape_colour", "--output-dir", str(out)]
    run = run_python(command)
    assert run.returncode == 0, run.stderr[-2000:]
    board = json.loads((out / "leaderboard.json").read_text())
    assert sorted(e["objective"] for e in board) == ["diffusion_dpo", "mapo"]
    base = load_diffusion_model(pipeline)
    for entry in board:
        # the same number, recomputed from the saved model with the same prompts and seeds
        trained = load_diffusion_model(out / entry["objective"] / "model")
        expected = win_rate(lambda: trained, lambda: base, PROMPTS, SEEDS, ColourScorer(), 3,
                            1.0)
        assert entry["win_rate"] == expected["win_rate"]
        assert entry["win_rate/policy_score"] == pytest.approx(expected["mean_score/policy"])
        last = [json.loads(line) for line in
                (out / entry["objective"] / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line][-1]
        assert entry["train/rewards/accuracy"] == last["rewards/accuracies"]
        assert "rewards/accuracy" not in entry  # (that column holds held-out numbers)
        assert (out / entry["objective"] / "report.html").is_file()
    assert board[0]["win_rate"] >= board[1]["win_rate"]  # ranked
    table = (out / "leaderboard.md").read_text()
    assert "2 prompts x 2 seeds" in table and "shape_colour" in table
    assert "| implied-reward acc., last train step | margin, last train step |" in table
    # a second run with the same settings trains nothing again
    again = run_python(command)
    assert again.stdout.count("finished earlier with the same settings, skipped") == 2


def test_diffusion_compare_needs_prompts_a_scorer_and_known_objectives(tmp_path):
    from preftune.api import compare

    config, _ = _config(tmp_path)
    with pytest.raises(ConfigError, match="needs --scorer"):
        compare(["diffusion_dpo"], str(config), output_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="unknown diffusion objective 'dpo'"):
        compare(["diffusion_dpo", "dpo"], str(config), scorer="shape_colour",
                output_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="set samples.prompts"):
        compare(["mapo"], str(config), overrides=["samples={prompts: []}"],
                scorer="shape_colour", output_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="--eval-data does nothing here: a comparison of "
                                          "denoisers evaluates each run on the config's "
                                          "samples.prompts"):
        compare(["mapo"], str(config), scorer="shape_colour", eval_data="pairs.jsonl",
                output_dir=str(tmp_path / "c"))
    assert not (tmp_path / "c" / "diffusion_dpo").exists()  # nothing trained
