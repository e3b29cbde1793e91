"""``preftune eval`` end to end on tiny models saved to disk, and its input errors."""

import json
import re
from pathlib import Path

import pytest
import yaml

from preftune.cli import main
from preftune.data.synthetic import generate_tasks, to_record
from preftune.evaluate.run_models import run_reference
from tiny_models import save_tiny_model_dir

PAIR_KEYS = ["rewards/accuracy", "rewards/margin", "ranking/summed", "ranking/normalised",
             "ranking/reference_summed", "ranking/idealized", "ranking/alignment_gap",
             "displacement/chosen", "displacement/rejected", "displacement/chosen_fell",
             "ches/mean", "ches/normalised_mean"]
SAMPLED_KEYS = ["sampled/kl", "sampled/topk_entropy", "sampled/topk_mass", "sampled/length_mean",
                "sampled/length_std", "sampled/length_min", "sampled/length_max",
                "sampled/length_reward_corr"]
FAST = ["--samples", "2", "--max-new-tokens", "6"]


def length_scorer(prompt, response):
    """A user scorer (module:function): longer is better."""
    assert isinstance(prompt, list) and prompt[0]["role"] == "user"
    return float(len(response))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    save_tiny_model_dir(root / "run" / "model", seed=1)  # the "trained" policy
    (root / "run" / "run.json").write_text("{}")
    save_tiny_model_dir(root / "reference", seed=0)
    rows = [to_record(task) for task in generate_tasks(8, seed=5)]
    for row in rows[:4]:  # half the pairs carry vote fractions
        row["chosen_votes"], row["rejected_votes"] = 0.8, 0.2
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def evaluate(files, *extra):
    return main(["eval", "--model", str(files / "run"), "--data", str(files / "pairs.jsonl"),
                 "--reference", str(files / "reference"), *FAST, *extra])


def test_eval_writes_metrics_per_pair_values_and_the_ches_filtered_file(files, capsys):
    assert evaluate(files, "--scorer", "synthetic", "--filter-top", "0.25") == 0
    out, err = capsys.readouterr()
    phases = {"eval pairs: policy": "example", "eval pairs: reference": "example",
              "samples: generating": "prompt", "samples: policy": "example",
              "win rate: policy answers": "prompt", "win rate: reference answers": "prompt",
              "win rate: scoring policy answers": "response"}
    for phase, unit in phases.items():  # each long phase shows its rate and the time left
        done = re.search(rf"{phase}: 100%\|[^|]*\| (\d+)/\1 \[\d\d:\d\d<00:00, "
                         rf" *(?:[\d.]+{unit}/s|[\d.]+s/{unit})\]", err)
        assert done, phase
    run = files / "run"
    results = json.loads((run / "eval.json").read_text())  # next to the model: the run dir
    for key in PAIR_KEYS + SAMPLED_KEYS + ["win_rate", "pairs"]:
        assert key in results, key
    assert results["pairs"] == 8 and results["ranking/idealized_pairs"] == 4
    assert results["sampled/responses"] == 16
    # the win rate is the mean over prompts of 1[policy wins] + 1/2 1[tie], each answer scored
    # by the data's own checkers (scored again here from eval_answers.jsonl)
    from preftune.score import load_scorer

    answers = [json.loads(line) for line in (run / "eval_answers.jsonl").read_text().splitlines()]
    checker = load_scorer("synthetic", str(files / "pairs.jsonl"))
    prompts = {row["origin"]: row["prompt"] for row in
               ({**r, "origin": f"{files / 'pairs.jsonl'}:{i + 1}"} for i, r in enumerate(
                   json.loads(line) for line in (files / "pairs.jsonl").read_text().splitlines()))}
    asked = [prompts[a["origin"]] for a in answers]
    assert [a["policy_score"] for a in answers] == checker.score(
        asked, [a["policy_answer"] for a in answers])
    expected = sum(1.0 if a["policy_score"] > a["reference_score"] else
                   0.5 if a["policy_score"] == a["reference_score"] else 0.0
                   for a in answers) / len(answers)
    assert len(answers) == 8 and results["win_rate"] == pytest.approx(expected)
    assert "implied-reward accuracy" in out and "win rate" in out
    pairs = [json.loads(line) for line in (run / "eval_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 8 and sum("idealized_correct" in p for p in pairs) == 4
    assert pairs[0]["displacement_chosen"] == pytest.approx(
        pairs[0]["logp_chosen"] - pairs[0]["ref_logp_chosen"])

    filtered = run / "pairs.without-top-ches-0.25.jsonl"
    assert str(filtered) in out
    kept = [json.loads(line) for line in filtered.read_text().splitlines()]
    original = [json.loads(line) for line in (files / "pairs.jsonl").read_text().splitlines()]
    top_two = sorted(range(8), key=lambda i: -pairs[i]["ches"])[:2]
    assert kept == [row for i, row in enumerate(original) if i not in top_two]


def test_ches_filtered_csv_keeps_renamed_text_columns_as_text(files, tmp_path, capsys):
    """Answers such as "4" in a CSV whose columns --column renames are written back as the
    text they were ("4", not 4.0), so the filtered file reads with the same command."""
    data = tmp_path / "math.csv"
    data.write_text("question,good,bad\n2+2=,4,5\n3+3=,6,7\n1+1=,2,3\n4+4=,8,9\n")
    columns = ["--column", "prompt=question", "--column", "chosen=good", "--column",
               "rejected=bad"]
    run = ["eval", "--model", str(files / "run"), "--reference", str(files / "reference"),
           "--samples", "0", *columns]
    assert main([*run, "--data", str(data), "--filter-top", "0.5", "--output",
                 str(tmp_path / "first")]) == 0
    pairs = [json.loads(line) for line in
             (tmp_path / "first" / "eval_pairs.jsonl").read_text().splitlines()]
    top = sorted(range(4), key=lambda i: -pairs[i]["ches"])[:2]
    rows = [{"question": q, "good": g, "bad": b} for q, g, b in
            [("2+2=", "4", "5"), ("3+3=", "6", "7"), ("1+1=", "2", "3"), ("4+4=", "8", "9")]]
    filtered = tmp_path / "first" / "math.without-top-ches-0.5.jsonl"
    assert [json.loads(line) for line in filtered.read_text().splitlines()] == [
        row for i, row in enumerate(rows) if i not in top]
    capsys.readouterr()
    assert main([*run, "--data", str(filtered), "--output", str(tmp_path / "second")]) == 0
    assert json.loads((tmp_path / "second" / "eval.json").read_text())["pairs"] == 2


def test_user_scorer_and_default_output_in_the_working_directory(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["eval", "--model", str(files / "reference"), "--data", str(files / "pairs.jsonl"),
                 "--reference", str(files / "reference"), "--samples", "0",
                 "--max-new-tokens", "4", "--scorer", "test_eval_command:length_scorer"])
    assert code == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["win_rate"] == 0.5  # the policy is the reference: every prompt ties
    assert results["rewards/margin"] == 0.0 and results["displacement/chosen_fell"] == 0.0
    assert "sampled/kl" not in results
    assert (tmp_path / "eval_answers.jsonl").is_file()
    assert main(["eval", "--model", str(files / "reference"), "--data", str(files / "pairs.jsonl"),
                 "--reference", str(files / "reference"), "--samples", "0"]) == 0
    assert not (tmp_path / "eval_answers.jsonl").exists()  # not this evaluation's answers


@pytest.mark.parametrize("rows, flags, message", [
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}], [],
     ["bad.jsonl:2", "'rejected'"]),
    ([{"prompt": "a", "chosen": "b", "rejected": "c", "chosen_votes": 0.7}], [],
     ["bad.jsonl:1", "'rejected_votes'"]),
    ([{"prompt": "a", "chosen": "b", "rejected": "c", "chosen_votes": 0, "rejected_votes": 0}],
     [], ["bad.jsonl:1", "'chosen_votes'"]),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], ["--scorer", "synthetic"],
     ["bad.jsonl:1", "'check'"]),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], ["--scorer", "no_such_module:f"],
     ["--scorer", "no_such_module"]),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], ["--filter-top", "1.5"], ["--filter-top"]),
])
def test_bad_inputs_exit_2_naming_file_record_and_field(files, tmp_path, capsys, rows, flags,
                                                        message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["eval", "--model", str(files / "run"), "--data", str(bad), "--reference",
                 str(files / "reference"), "--samples", "0", "--max-new-tokens", "2",
                 "--output", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 2
    for part in message:
        assert part in err, (part, err)


def test_model_paths_are_named_by_their_flag(files, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    args = ["eval", "--data", str(pairs), "--samples", "0", "--output", str(tmp_path)]
    assert main(args + ["--model", str(files / "run"), "--reference", str(tmp_path)]) == 2
    assert f"--reference: {tmp_path} has no config.json" in capsys.readouterr().err
    stopped = tmp_path / "stopped"  # a run stopped before it wrote its model
    stopped.mkdir()
    (stopped / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.7}) + "\n")
    assert main(args + ["--model", str(stopped)]) == 2
    assert "a run that has not written its model yet" in capsys.readouterr().err


def test_a_run_dir_is_compared_with_the_model_it_trained_against(files, tmp_path, capsys):
    run = tmp_path / "run"
    save_tiny_model_dir(run / "model", seed=1)
    (run / "run.json").write_text("{}")
    base = str(files / "reference")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": base}}))
    args = ["eval", "--model", str(run), "--data", str(files / "pairs.jsonl"), *FAST]
    assert main(args) == 0
    results = json.loads((run / "eval.json").read_text())
    assert results["settings"]["reference"] == base
    out = capsys.readouterr().out
    assert out.startswith(f"reference: {base} (what {run / 'config.yaml'} trained against; "
                          "--reference chooses another)\n")
    assert f"{run} vs reference {base} on" in out
    # an online round's reference.model (the initial model) comes before its model.path
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"path": "elsewhere"}, "reference": {"model": base}}))
    assert main(args) == 0
    assert json.loads((run / "eval.json").read_text())["settings"]["reference"] == base
    assert run_reference(None) == "default"  # a bare model directory


def test_a_relative_model_path_is_read_from_where_training_ran(tmp_path, monkeypatch):
    work = tmp_path / "work"
    run = work / "runs" / "dpo"
    (work / "base").mkdir(parents=True)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"output_dir": "./runs/dpo", "model": {"path": "base"}}))
    monkeypatch.chdir(tmp_path)  # not where training ran
    assert run_reference(Path("work/runs/dpo")) == str(work.resolve() / "base")
    monkeypatch.chdir(work)  # where it ran: the path as written
    assert run_reference(Path("runs/dpo")) == "base"
    monkeypatch.chdir(tmp_path)
    (run / "config.yaml").write_text(yaml.safe_dump(  # a hub id stays one
        {"output_dir": "runs/dpo", "model": {"path": "HuggingFaceTB/SmolLM2-135M"}}))
    assert run_reference(run) == "HuggingFaceTB/SmolLM2-135M"
    (run / "config.yaml").write_text(yaml.safe_dump(  # output_dir moved since: not guessed
        {"output_dir": "old/dpo", "model": {"path": "base"}}))
    assert run_reference(run) == "base"
    (run / "config.yaml").write_text(yaml.safe_dump(  # trained inside the run directory
        {"output_dir": ".", "model": {"path": "../../base"}}))
    assert Path(run_reference(run)).resolve() == (work / "base").resolve()


def test_columns_under_other_names_are_read_with_column(files, tmp_path, capsys):
    """--column KEY=COLUMN reads a file whose fields have other names, as data.fields does:
    the per-pair values equal those of the same pairs under the canonical names."""
    names = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    rows = [json.loads(line) for line in (files / "pairs.jsonl").read_text().splitlines()]
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({names.get(k, k): v for k, v in row.items()}) + "\n"
                               for row in rows))
    common = ["--model", str(files / "run"), "--reference", str(files / "reference"),
              "--samples", "0"]
    assert main(["eval", "--data", str(files / "pairs.jsonl"), "--output",
                 str(tmp_path / "plain"), *common]) == 0
    assert main(["eval", "--data", str(renamed), "--output", str(tmp_path / "mapped"), *common,
                 *[f"--column={k}={v}" for k, v in names.items()]]) == 0
    plain, mapped = ([json.loads(line) for line in (tmp_path / d / "eval_pairs.jsonl")
                      .read_text().splitlines()] for d in ("plain", "mapped"))
    assert len(mapped) == 8
    assert [p["logp_chosen"] for p in mapped] == [p["logp_chosen"] for p in plain]
    assert [p["ref_logp_rejected"] for p in mapped] == [p["ref_logp_rejected"] for p in plain]
    # without the map the record is refused by field, naming the flag that maps it
    capsys.readouterr()
    assert main(["eval", "--data", str(renamed), *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {renamed}:1: field 'chosen' (chosen) is missing") and \
        "--column KEY=COLUMN with eval" in err, err
    ranked = tmp_path / "ranked.jsonl"  # another shape: named as such
    ranked.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}) + "\n")
    assert main(["eval", "--data", str(ranked), *common]) == 2
    assert f"{ranked}:1: eval compares each pair's chosen and rejected response, and this " \
        "record is a ranked list. Make pairs of it first" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:  # a usage error: one line, no traceback
        main(["eval", "--data", str(renamed), "--column", "prompt", *common])
    assert error.value.code == 2
    assert "--column 'prompt': expected KEY=COLUMN, e.g. prompt=question" in \
        capsys.readouterr().err


def test_the_scorer_loads_once_policy_and_reference_are_gone(files, monkeypatch, capsys):
    """A judge (or reward model) would otherwise sit next to two policy-sized models: the
    evaluated models are released (even from a reference cycle, with the collector off)
    before the scorer loads; a scorer spec that cannot work still stops eval before any
    model loads."""
    import gc
    import weakref

    from preftune.evaluate import run_eval as module

    held, alive = [], []
    load_models, load_scorer = module.load_models, module.load_scorer

    def cyclic(*args):
        policy, reference, scope = load_models(*args)
        for model in (policy, reference):
            model.__dict__["cycle"] = [model]
            held.append(weakref.ref(model))
        return policy, reference, scope

    def scorer(*args):  # (models loaded so far, those still alive)
        alive.append((len(held), sum(ref() is not None for ref in held)))
        return load_scorer(*args)

    monkeypatch.setattr(module, "load_models", cyclic)
    monkeypatch.setattr(module, "load_scorer", scorer)
    gc.collect()
    gc.disable()
    try:
        assert evaluate(files, "--scorer", "synthetic") == 0
    finally:
        gc.enable()
    assert alive == [(2, 0)]  # after the models had answered, with both gone
    held.clear()
    assert evaluate(files, "--scorer", "nowhere:nothing") == 2
    assert held == [] and "--scorer: " in capsys.readouterr().err


def test_a_reward_model_or_an_online_round_is_refused_before_anything_loads(tmp_path, capsys):
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    reward = tmp_path / "rm"
    (reward / "model").mkdir(parents=True)
    for name in ("config.json", "preftune_reward.json"):
        (reward / "model" / name).write_text("{}")
    (reward / "run.json").write_text("{}")
    assert main(["eval", "--model", str(reward), "--data", str(tmp_path / "pairs.jsonl")]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: --model {reward}: a reward model (preftune_reward.json), which scores "
        f"responses rather than writing them; preftune eval measures a policy. Measure it with "
        f"`preftune rm eval --model {reward} --data PAIRS`.")
    online = tmp_path / "online"
    (online / "round-1" / "model").mkdir(parents=True)
    (online / "round-1" / "model" / "config.json").write_text("{}")
    (online / "round-1" / "run.json").write_text("{}")
    (online / "round-1" / "eval.json").write_text('{"mean_score": 0.5}')
    (online / "online.json").write_text('{"rounds": []}')
    assert main(["eval", "--model", str(online / "round-1"),
                 "--data", str(tmp_path / "pairs.jsonl")]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: --model {online / 'round-1'}: round-1 of an online run, whose eval.json and "
        "eval_answers.jsonl are the round's own held-out evaluation")
    assert (online / "round-1" / "eval.json").read_text() == '{"mean_score": 0.5}'


def test_an_output_folder_that_cannot_be_made_is_refused_before_the_work(tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder would go")
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--data",
                 str(tmp_path / "pairs.jsonl"), "--output", str(blocker / "eval")]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: --output {blocker / 'eval'} cannot be made: {blocker} is a file")
    assert main(["data", "synthetic", "--output-dir", str(blocker / "syn")]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: --output-dir {blocker / 'syn'} cannot be made: {blocker} is a file")
    assert blocker.read_text() == "a file where a folder would go"
