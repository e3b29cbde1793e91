"""``preftune rm strength``: an ensemble's mean, spread and agreement per pair equal the members'
own reward gaps, pairs the ensemble reverses are flipped, MC-dropout passes have the mean and
variance that dropout on the head's input implies, and bad input is refused before a model
loads."""

import json
import statistics

import pytest
import torch

from preftune.cli import main
from preftune.data.records import Pair
from preftune.reward.config import build_reward_config
from preftune.reward.scoring import RewardScoring
from preftune.reward.strength import head_module, member_gaps
from preftune.reward.train import train_reward_model
from test_reward_model import digit_pairs as clean_digit_pairs, write_jsonl
from tiny_models import save_tiny_model_dir

pytestmark = pytest.mark.filterwarnings("ignore")


def digit_pairs(count: int, seed: int, wrong: tuple = ()) -> list[dict]:
    """test_reward_model's pairs (chosen hides a digit among letters, rejected is letters
    only) with a note per response; rows in ``wrong`` have the two exchanged (mislabelled)."""
    rows = clean_digit_pairs(count, seed)
    for i, row in enumerate(rows):
        row.update(chosen_note=f"c{i}", rejected_note=f"r{i}")
        if i in wrong:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    return rows


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """Three reward models of one config, seeds 0-2, that learned the digit rule."""
    root = tmp_path_factory.mktemp("strength")
    save_tiny_model_dir(root / "decoder")
    write_jsonl(root / "train.jsonl", digit_pairs(256, 1))
    runs = []
    for seed in range(3):
        runs.append(train_reward_model(build_reward_config({
            "output_dir": str(root / f"rm_{seed}"), "model": {"path": str(root / "decoder")},
            "data": {"train": str(root / "train.jsonl")},
            "train": {"learning_rate": 3e-3, "batch_size": 16, "max_steps": 24,
                      "warmup_ratio": 0.0, "seed": seed}}), show_progress=False))
    return root, runs


def records_of(rows):
    return [Pair(r["prompt"], r["chosen"], r["rejected"], origin=str(i))
            for i, r in enumerate(rows)]


def test_ensemble_strength_is_the_members_gaps_and_reversed_pairs_flip(ensemble, tmp_path):
    root, runs = ensemble
    wrong = (1, 4, 7)
    rows = digit_pairs(10, 5, wrong)
    rows[9]["rejected"] = rows[9]["chosen"]  # one response twice: a tie for every member
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "strength.jsonl"
    models = [arg for run in runs for arg in ("--model", str(run))]
    assert main(["rm", "strength", *models, "--data", str(data), "--output", str(out)]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    gaps = []  # each member's r(chosen) - r(rejected), computed apart (a tie's is 0)
    for run in runs:
        outputs = RewardScoring.load(str(run)).outputs(records_of(rows))
        gaps.append([float(o[0, 0] - o[1, 0]) if row["chosen"] != row["rejected"] else 0.0
                     for o, row in zip(outputs, rows)])
    for i, row in enumerate(written):
        members = [g[i] for g in gaps]
        assert row["strength"] == pytest.approx(statistics.fmean(members), abs=1e-6)
        assert row["strength_std"] == pytest.approx(statistics.pstdev(members), abs=1e-6)
        assert row["strength_agreement"] == sum(d > 0 for d in members) / 3
        assert (row["chosen"], row["chosen_note"]) == (rows[i]["chosen"], f"c{i}")
    # the ensemble reverses exactly the mislabelled pairs
    assert [i for i, row in enumerate(written) if row["strength"] < 0] == list(wrong)
    assert (written[9]["strength"], written[9]["strength_agreement"]) == (0.0, 0.0)

    flipped_out = tmp_path / "flipped.jsonl"
    assert main(["rm", "strength", *models, "--data", str(data), "--output",
                 str(flipped_out), "--flip"]) == 0
    flipped = [json.loads(line) for line in flipped_out.read_text().splitlines()]
    for i, (row, plain) in enumerate(zip(flipped, written)):
        turned = i in wrong
        assert row["strength_flipped"] is turned
        assert row["strength"] == pytest.approx(abs(plain["strength"]), abs=1e-9)
        assert row["strength_std"] == pytest.approx(plain["strength_std"], abs=1e-9)
        assert row["strength_agreement"] == pytest.approx(
            1 - plain["strength_agreement"] if turned else plain["strength_agreement"])
        # a flipped pair has its responses, and their chosen_*/rejected_* columns, swapped
        assert (row["chosen"], row["rejected"]) == ((rows[i]["rejected"], rows[i]["chosen"])
                                                    if turned else (rows[i]["chosen"],
                                                                    rows[i]["rejected"]))
        assert row["chosen_note"] == (f"r{i}" if turned else f"c{i}")
        assert row["origin"].endswith(f":{i + 1}")
    # the flipped file trains the adaptive-margin loss as it is (Secrets of RLHF II)
    run = train_reward_model(build_reward_config({
        "output_dir": str(tmp_path / "margin"), "model": {"path": str(root / "decoder")},
        "data": {"train": str(flipped_out)},
        "loss": {"name": "bt_margin", "margin_field": "strength"},
        "train": {"batch_size": 5, "max_steps": 1}}), show_progress=False)
    assert (run / "model" / "preftune_reward.json").exists()


def test_mc_dropout_passes_have_the_mean_and_variance_of_dropout_on_the_head_input(ensemble):
    """A pass drops each feature the head reads with probability p and scales the rest by
    1 / (1 - p), independently for the two responses, so for a linear head w the gap d has mean
    d_plain and variance p / (1 - p) * sum_i w_i^2 (h_chosen,i^2 + h_rejected,i^2)."""
    _, runs = ensemble
    scoring = RewardScoring.load(str(runs[0]))
    records = records_of(digit_pairs(3, 9))
    features = []
    hook = head_module(scoring.model).register_forward_hook(
        lambda module, args, output: features.append(args[0].detach()))
    plain = member_gaps(scoring, records, 1, 0.0)[0]
    hook.remove()
    weight = head_module(scoring.model).weight[0].detach().double()
    p, passes = 0.2, 500  # (seeded: the same draws every run)
    torch.manual_seed(0)
    gaps = member_gaps(scoring, records, passes, p)  # [passes, pairs]
    assert gaps.shape == (passes, 3)
    hidden = features[0].double()  # [responses, H] in the batch's order: find each response's
    rewards = hidden @ weight      # row by its plain reward
    outputs = scoring.outputs(records)
    for i, output in enumerate(outputs):
        rows = [int((rewards - float(output[k, 0])).abs().argmin()) for k in (0, 1)]
        expected = p / (1 - p) * sum((weight ** 2 * hidden[row] ** 2).sum() for row in rows)
        assert gaps[:, i].var(correction=1) == pytest.approx(float(expected), rel=0.15)
        assert abs(gaps[:, i].mean() - plain[i]) < 4 * (expected / passes) ** 0.5
    # the hook is gone after the passes: a plain scoring is as before
    assert torch.equal(member_gaps(scoring, records, 1, 0.0)[0], plain)


def test_mc_dropout_from_the_command_line_is_reproducible_by_seed(ensemble, tmp_path):
    _, runs = ensemble
    data = write_jsonl(tmp_path / "pairs.jsonl", digit_pairs(4, 3))
    outs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / f"{name}.jsonl"
        assert main(["rm", "strength", "--model", str(runs[0]), "--passes", "8", "--dropout",
                     "0.3", "--seed", str(seed), "--data", str(data), "--output",
                     str(out)]) == 0
        outs.append([json.loads(line)["strength_std"] for line in out.read_text().splitlines()])
    assert outs[0] == outs[1] and outs[0] != outs[2]
    assert min(outs[0]) > 0


@pytest.mark.parametrize("flags, message", [
    (["--passes", "4"], "without --dropout gives 4 identical scores"),
    (["--dropout", "0.1"], "--dropout needs --passes of 2 or more"),
    ([], "one model scored once gives no spread"),
    (["--passes", "2", "--dropout", "1.5"], "--dropout 1.5: a probability in [0, 1)"),
])
def test_settings_without_a_spread_are_refused(ensemble, tmp_path, capsys, flags, message):
    _, runs = ensemble
    data = write_jsonl(tmp_path / "pairs.jsonl", digit_pairs(2, 3))
    assert main(["rm", "strength", "--model", str(runs[0]), *flags, "--data", str(data),
                 "--output", str(tmp_path / "out.jsonl")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_bad_input_is_named_before_a_model_loads(ensemble, tmp_path, capsys, monkeypatch):
    _, runs = ensemble
    models = ["--model", str(runs[0]), "--model", str(runs[1])]

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(RewardScoring, "load", no_loading)
    single = write_jsonl(tmp_path / "single.jsonl", [{"prompt": "Q?", "response": "a1"}])
    assert main(["rm", "strength", *models, "--data", str(single), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    assert "single.jsonl:1: rm strength scores pairs" in capsys.readouterr().err
    taken = write_jsonl(tmp_path / "taken.jsonl", [{**digit_pairs(1, 0)[0], "strength": 1}])
    assert main(["rm", "strength", *models, "--data", str(taken), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    assert "taken.jsonl:1: field 'strength' already exists" in capsys.readouterr().err
    pairs = write_jsonl(tmp_path / "pairs.jsonl", digit_pairs(2, 0))
    assert main(["rm", "strength", *models, "--model", str(tmp_path / "nowhere"), "--data",
                 str(pairs), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "nowhere is not a preftune reward model" in capsys.readouterr().err
    (tmp_path / "exists.jsonl").write_text("")
    assert main(["rm", "strength", *models, "--data", str(pairs), "--output",
                 str(tmp_path / "exists.jsonl")]) == 2
    assert "exists.jsonl already exists" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_a_flipped_row_swaps_every_column_of_a_side_mapped_or_named_after_it():
    """(Mapped score columns, and UltraFeedback-binarized's score_chosen/score_rejected, kept
    their values while the responses swapped: the scores then belonged to the wrong answers.)"""
    from preftune.reward.strength import _swap

    row = {"question": "q", "good": "a", "bad": "b", "good_score": 1, "bad_score": 0,
           "score_chosen": 8.0, "score_rejected": 3.0, "chosen_votes": 5, "rejected_votes": 1,
           "note": "kept"}
    fields = {"prompt": "question", "chosen": "good", "rejected": "bad",
              "chosen_score": "good_score", "rejected_score": "bad_score"}
    assert _swap(row, fields) == {
        "question": "q", "good": "b", "bad": "a", "good_score": 0, "bad_score": 1,
        "score_chosen": 3.0, "score_rejected": 8.0, "chosen_votes": 1, "rejected_votes": 5,
        "note": "kept"}
    plain = {"chosen": "a", "rejected": "b", "chosen_score": 2, "rejected_score": 1}
    assert _swap(plain, None) == {"chosen": "b", "rejected": "a", "chosen_score": 1,
                                  "rejected_score": 2}
