"""`preftune diffusion online`: each round's lists are what `diffusion rank` makes from the
model the round starts from (new seeds each round), the round trains from that model on them
(pair objectives through best vs worst), the next round starts from the result, every round's
model is evaluated against the initial one, a stopped run resumes without redoing finished
phases, and objectives that cannot train on sampled lists are refused by name."""

import json

import pytest

pytest.importorskip("diffusers")

from diffusion_fixtures import (one_thread, tiny_pipeline, write_prompts)  # noqa: E402, F401
from preftune.cli import main  # noqa: E402
from preftune.config import ConfigError  # noqa: E402
from preftune.data.records import DataError  # noqa: E402
from preftune.diffusion.online import DiffusionOnlineConfig, run_diffusion_online  # noqa: E402
from preftune.diffusion.ranking import make_ranked_lists  # noqa: E402

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    # a prompt repeated (as a pairs file repeats them): sampled once a round all the same
    return {"pipe": tiny_pipeline(root / "pipe"),
            "prompts": write_prompts(root / "data", PROMPTS + PROMPTS[:1])}


def tree(parts, output_dir, objective="rank_dpo", **online):
    return {"output_dir": str(output_dir), "model": {"path": str(parts["pipe"])},
            "data": {"train": str(parts["prompts"]), "resolution": 16},
            "objective": {"name": objective},
            "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3},
            "online": {"rounds": 2, "seeds": [0, 1, 2], "steps": 2, "eval_seeds": [5],
                       **online}}


def read(path):
    return [json.loads(line) for line in open(path)]


def test_rounds_rank_their_own_samples_and_train_from_the_last_model(parts, tmp_path):
    import yaml

    out = run_diffusion_online(DiffusionOnlineConfig.from_dict(tree(parts, tmp_path / "run")),
                               show_progress=False)
    summary = json.loads((out / "online.json").read_text())
    assert [info["round"] for info in summary["rounds"]] == [1, 2]
    models = [str(parts["pipe"]), str(out / "round-1/train/model"),
              str(out / "round-2/train/model")]
    for r in (1, 2):
        here = out / f"round-{r}"
        # the lists are `diffusion rank`'s from the round's starting model and seeds
        seeds = [s + 1000 * (r - 1) for s in (0, 1, 2)]
        expected = make_ranked_lists(PROMPTS, [models[r - 1]], ["shape_colour"], seeds,
                                     tmp_path / f"by-hand-{r}", 2)
        assert read(here / "data/ranked.jsonl") == read(expected["ranked"])
        for row in read(expected["ranked"]):
            for image in row["images"]:
                assert (here / "data" / image).read_bytes() == \
                    (tmp_path / f"by-hand-{r}" / image).read_bytes()
        trained = yaml.safe_load((here / "train/config.yaml").read_text())
        assert trained["model"]["path"] == models[r - 1]
        assert trained["data"]["train"] == str(here / "data/ranked.jsonl")
        assert [row["step"] for row in read(here / "train/metrics.jsonl")] == [1, 2]
        evaluation = json.loads((here / "eval.json").read_text())
        assert evaluation["model"] == models[r] and evaluation["reference"] == models[0]
        assert evaluation["samples"] == 2 and evaluation["scorer"] == "shape_colour"
        assert summary["rounds"][r - 1]["model"] == models[r]
        assert summary["rounds"][r - 1]["evaluate"]["mean_score"] == \
            evaluation["mean_score/policy"]
    assert summary["initial"] == {"mean_score": evaluation["mean_score/reference"]}

    # `preftune report` joins the rounds' training curves and shows each round's win rate
    from preftune.report import write_report
    from preftune.report.rundir import load_run
    from preftune.report.online import round_rows

    assert [m["step"] for m in load_run(out).metrics] == [1, 2, 3, 4]
    assert "Online rounds (online.json)" in write_report(out).read_text()
    rows = round_rows(summary)
    assert [row["win rate vs initial"] for row in rows] == [
        json.loads((out / f"round-{r}/eval.json").read_text())["win_rate"] for r in (1, 2)]
    assert [row["steps"] for row in rows] == [2, 2] and "KL to initial" not in rows[0]


def test_a_pair_objective_trains_each_lists_best_over_its_worst_with_lora(parts, tmp_path):
    import yaml

    config = tree(parts, tmp_path / "run", objective="diffusion_dpo")
    config["model"]["lora"] = {"r": 4, "alpha": 8}
    out = run_diffusion_online(DiffusionOnlineConfig.from_dict(config), show_progress=False)
    trained = yaml.safe_load((out / "round-1/train/config.yaml").read_text())
    assert trained["data"]["convert"] == "pairs:best_vs_worst"
    report = json.loads((out / "round-1/train/data_report.json").read_text())
    pairs = read(out / "round-1/data/pairs.jsonl")  # rank's best-vs-worst pairs, the same count
    assert report["train"]["kept"] == len(pairs) > 0
    # round 2 puts fresh adapters on round 1's merged model, its reference with them off
    second = yaml.safe_load((out / "round-2/train/config.yaml").read_text())
    assert second["model"]["path"] == str(out / "round-1/train/model")
    run_info = json.loads((out / "round-2/train/run.json").read_text())
    assert run_info["reference"] == "adapter-off"
    assert (out / "round-2/train/model/unet_lora").is_dir()


def test_a_stopped_run_resumes_without_redoing_finished_phases(parts, tmp_path):
    config = tmp_path / "online.yaml"
    import yaml

    config.write_text(yaml.safe_dump(tree(parts, tmp_path / "run", rounds=1)))
    assert main(["diffusion", "online", str(config)]) == 0
    first = (tmp_path / "run/round-1/phases.json").read_text()
    stamp = (tmp_path / "run/round-1/data/ranked.jsonl").stat().st_mtime_ns
    assert main(["diffusion", "online", str(config), "--set", "online.rounds=2"]) == 2
    assert main(["diffusion", "online", str(config), "--set", "online.rounds=2", "--set",
                 "train.learning_rate=0.5", "--resume"]) == 2  # other settings: refused
    assert main(["diffusion", "online", str(config), "--set", "online.rounds=2",
                 "--resume"]) == 0
    assert (tmp_path / "run/round-1/phases.json").read_text() == first
    assert (tmp_path / "run/round-1/data/ranked.jsonl").stat().st_mtime_ns == stamp
    assert len(json.loads((tmp_path / "run/online.json").read_text())["rounds"]) == 2


def test_objectives_that_cannot_train_on_sampled_lists_are_refused(parts, tmp_path):
    with pytest.raises(ValueError, match="objective spo samples its own images"):
        DiffusionOnlineConfig.from_dict(tree(parts, tmp_path / "a", objective="spo"))
    with pytest.raises(ValueError, match="objective dcpo needs a caption per image"):
        DiffusionOnlineConfig.from_dict(tree(parts, tmp_path / "b", objective="dcpo"))
    with pytest.raises(ValueError, match="online.seeds"):
        DiffusionOnlineConfig.from_dict(tree(parts, tmp_path / "c", seeds=[0]))
    for override, message in (("train.eval_every=1", "train.eval_every: each round is "
                                                     "evaluated by its win rate"),
                              ("data.eval_fraction=0.25", "data.eval_fraction: an online run "
                                                          "samples every training prompt")):
        with pytest.raises(ValueError, match=message):
            DiffusionOnlineConfig.from_dict(tree(parts, tmp_path / "c"), [override])
    out = tmp_path / "d"
    run_diffusion_online(DiffusionOnlineConfig.from_dict(tree(parts, out, rounds=1)),
                         show_progress=False)
    with pytest.raises(ConfigError, match="already holds an online run; continue it with "
                       "--resume"):
        run_diffusion_online(DiffusionOnlineConfig.from_dict(tree(parts, out, rounds=1)))
    bad = tmp_path / "bad.jsonl"  # prompts are read before the run there is moved aside
    bad.write_text('{"text": "no prompt here"}\n')
    broken = tree(parts, out, rounds=1)
    broken["data"]["train"] = str(bad)
    with pytest.raises(DataError, match=f"{bad}:1: "):
        run_diffusion_online(DiffusionOnlineConfig.from_dict(broken), overwrite=True)
    assert (out / "online.json").is_file() and not list(tmp_path.glob("d.old-*"))


def same_score(prompt, image):
    """A scorer that rates every image alike: every list ties."""
    return 0.5


def test_a_round_whose_lists_all_tie_trains_nothing(parts, tmp_path):
    out = run_diffusion_online(DiffusionOnlineConfig.from_dict(tree(
        parts, tmp_path / "run", scorers=["test_diffusion_online:same_score"])),
        show_progress=False)
    rounds = json.loads((out / "online.json").read_text())["rounds"]
    assert [info["rank"]["lists_all_tied"] for info in rounds] == [2, 2]
    assert [info["model"] for info in rounds] == [str(parts["pipe"])] * 2
    assert not (out / "round-1" / "train").exists() and not (out / "round-2" / "train").exists()


def test_two_processes_run_the_rounds_as_one(parts, tmp_path):
    """Launched on two processes, the main one samples, ranks and evaluates and both train
    (DDP): the same lists, losses and win rates as one process with the same global batch."""
    from diffusion_fixtures import on_two_processes

    one = tree(parts, tmp_path / "one")
    one["train"].update(batch_size=4, log_every=1)
    run_diffusion_online(DiffusionOnlineConfig.from_dict(one), show_progress=False)
    two = {**one, "output_dir": str(tmp_path / "two"), "train": {**one["train"], "batch_size": 2}}
    done = on_two_processes("online", two, tmp_path / "two.yaml")
    assert done.returncode == 0, done.stderr[-3000:]
    for r in (1, 2):
        here = {run: tmp_path / run / f"round-{r}" for run in ("one", "two")}
        lists = {run: [{k: v for k, v in row.items() if k != "sources"}  # (their model dirs)
                       for row in read(here[run] / "data/ranked.jsonl")] for run in here}
        if r == 1:  # the same initial model: the same lists
            assert lists["two"] == lists["one"]
        else:  # models equal up to float rounding: scores up to a pixel or two of the checker
            for mine, theirs in zip(lists["two"], lists["one"]):
                assert mine["images"] == theirs["images"]
                assert mine["scorer_scores"]["shape_colour"] == pytest.approx(
                    theirs["scorer_scores"]["shape_colour"], abs=0.02)
        losses = {run: [row["loss"] for row in read(here[run] / "train/metrics.jsonl")]
                  for run in here}
        assert len(losses["one"]) == 2
        # round 2 trains on those nearly equal lists: 1.1e-4 apart under torch 2.9.0
        assert losses["two"] == pytest.approx(losses["one"], rel=1e-4 if r == 1 else 2e-4)
        assert json.loads((here["two"] / "train/run.json").read_text())["processes"] == 2
        evaluations = [json.loads((here[run] / "eval.json").read_text()) for run in here]
        assert evaluations[1]["mean_score/policy"] == pytest.approx(
            evaluations[0]["mean_score/policy"], abs=0.02)
    assert len(json.loads((tmp_path / "two/online.json").read_text())["rounds"]) == 2


def test_text_scorers_and_missing_pipelines_are_refused_before_the_rounds_start(parts, tmp_path):
    """A text scorer among online.scorers is refused by its position before anything is
    written (--plan too); a model.path that is no pipeline, found when round 1 loads it,
    leaves no folder behind (a rerun was refused as 'already holds an online run')."""
    out = tmp_path / "o"
    judged = DiffusionOnlineConfig.from_dict(tree(parts, out, scorers=["shape_colour",
                                                                       "judge:default"]))
    for plan_only in (True, False):
        with pytest.raises(ConfigError, match=r"online.scorers\[1\]: scorer 'judge:default' is "
                                              "an LLM judge, which rates text, not images"):
            run_diffusion_online(judged, plan_only=plan_only)
    missing = tree(parts, out)
    missing["model"]["path"] = str(tmp_path / "no-pipeline")
    with pytest.raises(Exception, match="no-pipeline"):
        run_diffusion_online(DiffusionOnlineConfig.from_dict(missing), show_progress=False)
    assert not out.exists()
