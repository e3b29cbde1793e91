"""``preftune online`` end to end on a tiny model with a verifier scorer: two rounds, provenance,
the pairs the builder defines, the reference by ``online.reference``, and an interrupted round
that resumes to the same pairs and weights as an uninterrupted run."""

import json
import re
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from preftune.cli import main
from preftune.config import ConfigError, build_config
from preftune.data.tokenize import TokenizeSettings
from preftune.generation import HFGenerator, SamplingSettings, prompt_ids
from preftune.model.load import (files_fingerprint, load_model_and_tokenizer, load_tokenizer,
                                 weights_fingerprint)
from preftune.online.config import OnlineConfig, load_online_config
from preftune.online.diversity import sample_diversity
from preftune.online.loop import round_config, run_online, start_rounds
from preftune.report.online import round_rows
from preftune.report.render import write_report
from preftune.report.rundir import load_run
from preftune.train import trainer as trainer_module
from tiny_models import save_tiny_model_dir

SCORER = "test_online_loop:count_a"


def count_a(prompt, response):
    """The verifier: more letters 'a' is better."""
    return float(response.count("a"))


def count_b(prompt, response):
    """Another verifier (a resumed run may not change its scorer)."""
    return float(response.count("b"))


def has_a(prompt, response):
    """A checker: passes with a letter 'a'."""
    return float("a" in response)


has_a.pass_fail = True


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny", seed=1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    train, held_out = root / "prompts.jsonl", root / "eval.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"say a{'a' * k} {k}"}) + "\n"
                             for k in range(6)))
    held_out.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"q{k}"}]})
                                + "\n" for k in range(3)))
    return str(train), str(held_out)


def config_tree(model_dir, data, output_dir, **online):
    return {
        "output_dir": str(output_dir), "model": {"path": model_dir},
        "data": {"train": data[0], "eval": data[1], "max_length": 64, "max_prompt_length": 32},
        "objective": {"name": "dpo", "beta": 0.1},
        "train": {"learning_rate": 1e-3, "batch_size": 2, "max_steps": 3, "seed": 0,
                  "warmup_ratio": 0.0, "save_every": 1},
        "online": {"rounds": 2, "scorer": SCORER, "eval_max_new_tokens": 8,
                   "sampling": {"samples": 4, "max_new_tokens": 10, "batch_size": 4}, **online},
    }


def plain_logp(model, prompt, response):
    """log pi(response | prompt) from one forward of the concatenation."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    return logps[len(prompt) - 1:].gather(1, targets[len(prompt) - 1:, None]).sum().item()


def assert_same_weights(one, other):
    ours, theirs = (load_file(d / "model.safetensors") for d in (one, other))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_rounds_write_samples_scores_pairs_models_and_evaluations(model_dir, data, tmp_path):
    out = tmp_path / "run"
    config = build_config(config_tree(model_dir, data, out), schema=OnlineConfig)
    run_online(config)
    summary = json.loads((out / "online.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    initial_model, _ = load_model_and_tokenizer(model_dir)
    round_1, _ = load_model_and_tokenizer(str(out / "round-1" / "model"))
    for r, policy in ((1, model_dir), (2, str(out / "round-1" / "model"))):
        here = out / f"round-{r}"
        samples = read_jsonl(here / "samples.jsonl")
        assert [s["origin"] for s in samples] == [f"{data[0]}:{k}" for k in range(1, 7)]
        assert {s["policy"] for s in samples} == {files_fingerprint(policy)[:16]}
        assert all(s["round"] == r and len(s["responses"]) == 4 for s in samples)
        assert samples[0]["sampling"]["samples"] == 4 and samples[0]["sampling"]["temperature"] == 1
        scored = read_jsonl(here / "scored.jsonl")
        for row in scored:  # the verifier's scores, response by response
            assert row["scores"] == [count_a(row["prompt"], t) for t in row["responses"]]
        pairs = read_jsonl(here / "pairs.jsonl")
        expected = []
        for row in scored:  # best_vs_worst: first highest against first lowest non-empty
            s = {k: v for k, v in enumerate(row["scores"]) if row["responses"][k].strip()}
            if max(s.values()) > min(s.values()):
                best = min(k for k in s if s[k] == max(s.values()))
                worst = min(k for k in s if s[k] == min(s.values()))
                expected.append((row["responses"][best], row["responses"][worst],
                                 f"{row['origin']} [{best}>{worst}]",
                                 [slot for slot, k in enumerate((best, worst))
                                  if not row["ended"][k]]))
        # a sample that reached max_new_tokens is named, to be trained with no end of turn
        assert [(p["chosen"], p["rejected"], p["source"], p.get("unfinished", []))
                for p in pairs] == expected
        assert len(pairs) >= 2
        metrics = read_jsonl(here / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2, 3]
        evaluation = json.loads((here / "eval.json").read_text())
        answers = read_jsonl(here / "eval_answers.jsonl")
        assert [a["score"] for a in answers] == [count_a(None, a["response"]) for a in answers]
        assert evaluation["mean_score"] == pytest.approx(sum(a["score"] for a in answers) / 3)
        assert "pass_rate" not in evaluation  # count_a counts (its 0s and 1s pass nothing)
    assert summary["initial"]["prompts"] == 3 and "kl_to_initial" not in summary["initial"]
    # KL(round 1 || initial) on round 1's samples of the held-out prompts, recomputed with plain
    # transformers forwards of prompt + response
    tokenizer = load_tokenizer(model_dir)
    ids = prompt_ids([json.loads(line)["prompt"] for line in open(data[1])], tokenizer,
                     TokenizeSettings(64, 32))
    held_out_draw = SamplingSettings(samples=2, max_new_tokens=8, batch_size=4, seed=0)
    generations = HFGenerator(round_1, tokenizer).generate(ids, held_out_draw)
    drawn = generations.token_ids
    gaps = [plain_logp(round_1, p, y) - plain_logp(initial_model, p, y)
            for p, ys in zip(ids, drawn) for y in ys]
    evaluation = json.loads((out / "round-1" / "eval.json").read_text())
    assert evaluation["kl_to_initial"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-4)
    # the diversity of each model's held-out samples, the same seeded draws as the KL's
    assert evaluation["sample_diversity"] == sample_diversity(generations.texts)
    samples = read_jsonl(out / "round-1" / "eval_samples.jsonl")
    assert [row["responses"] for row in samples] == generations.texts
    scores = [count_a(None, t) for texts in generations.texts for t in texts]
    assert [s for row in samples for s in row["scores"]] == scores
    assert evaluation["sample_mean_score"] == pytest.approx(sum(scores) / len(scores))
    initial_texts = HFGenerator(initial_model, tokenizer).generate(ids, held_out_draw).texts
    assert summary["initial"]["sample_diversity"] == sample_diversity(initial_texts)
    # round 2 trained its own policy: round 2's model differs from round 1's
    round_2, _ = load_model_and_tokenizer(str(out / "round-2" / "model"))
    assert weights_fingerprint(round_2) != weights_fingerprint(round_1)
    with pytest.raises(ConfigError, match="already holds an online run"):
        run_online(config)

    # the report joins the rounds' training curves and shows each round
    run = load_run(out)
    losses = [m["loss"] for r in (1, 2) for m in read_jsonl(out / f"round-{r}" / "metrics.jsonl")]
    assert [m["step"] for m in run.metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in run.metrics] == losses
    infos = [json.loads((out / f"round-{r}" / "run.json").read_text()) for r in (1, 2)]
    assert run.run_info == {**infos[1], "steps": 6,  # the newest round's; steps and examples
                            "train_examples": sum(i["train_examples"] for i in infos),  # in all
                            "eval_examples": 3}  # the held-out prompts of each round
    page = write_report(out).read_text()
    assert "Online rounds (online.json)" in page
    assert "run.json is missing" not in page and "6 (last: 6 of 6)" in page
    for name in ("online_held_out.png", "online_sample_scores.png", "online_kl.png",
                 "online_diversity.png", "loss.png"):
        assert (out / "report" / name).stat().st_size > 1000
    rows = round_rows(summary)
    evaluations = [json.loads((out / f"round-{r}" / "eval.json").read_text()) for r in (1, 2)]
    assert [row["held-out score"] for row in rows] == [e["mean_score"] for e in evaluations]
    assert [row["held-out distinct"] for row in rows] == [
        e["sample_diversity"]["distinct"] for e in evaluations]


def test_reference_is_the_initial_model_or_the_previous_round(model_dir, data, tmp_path):
    for choice, expected in (("initial", model_dir), ("previous", None)):
        config = build_config(config_tree(model_dir, data, tmp_path, reference=choice),
                              schema=OnlineConfig)
        first = round_config(config, 1, model_dir, tmp_path / "round-1")
        second = round_config(config, 2, str(tmp_path / "round-1" / "model"),
                              tmp_path / "round-2")
        assert first.reference.model is None  # round 1's policy is the initial model
        assert second.reference.model == expected
        assert second.model.path == str(tmp_path / "round-1" / "model")
        assert second.data.train == str(tmp_path / "round-2" / "pairs.jsonl")


def test_rounds_with_a_reference_in_memory_keep_the_initial_model(model_dir, data, tmp_path):
    """tdpo under LoRA reads the reference's distributions: round 1 takes the adapters off,
    later rounds hold the initial model in memory (their adapters-off model is the previous
    round's); an adapters-off reference for every round is refused before anything runs."""
    tree = config_tree(model_dir, data, tmp_path / "run", reference="initial")
    tree.update(objective={"name": "tdpo"}, model={"path": model_dir, "lora": {"r": 4}})
    tree["train"]["max_steps"] = 1
    config = build_config(tree, schema=OnlineConfig)
    second = round_config(config, 2, str(tmp_path / "run/round-1/model"), tmp_path / "r2")
    assert (second.reference.model, second.reference_strategy) == (model_dir, "live")
    run_online(config)
    assert json.loads((tmp_path / "run/round-2/run.json").read_text())["reference"] == "live"
    assert json.loads((tmp_path / "run/round-1/run.json").read_text())["reference"] == \
        "adapter-off"
    tree["reference"] = {"strategy": "adapter-off"}
    with pytest.raises(ConfigError, match="reference.strategy: adapter-off shows each round's "
                                          "own starting model without its adapters"):
        build_config(tree, schema=OnlineConfig)


class Interrupted(Exception):
    pass


def straight_run_and_config(tree_of, model_dir, data, tmp_path):
    """An uninterrupted run in tmp_path/straight, and the same config for tmp_path/broken."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_online(build_config(tree_of(model_dir, data, straight), schema=OnlineConfig))
    return straight, broken, build_config(tree_of(model_dir, data, broken), schema=OnlineConfig)


def test_an_interrupted_round_resumes_to_the_same_pairs_and_weights(model_dir, data, tmp_path,
                                                                   monkeypatch):
    straight, broken, config = straight_run_and_config(config_tree, model_dir, data, tmp_path)
    real_step, calls = trainer_module.Trainer.step, []

    def failing_step(self, step):
        calls.append(step)
        if len(calls) == 5:  # round 2, step index 1: after round 2's first checkpoint
            raise Interrupted
        return real_step(self, step)

    monkeypatch.setattr(trainer_module.Trainer, "step", failing_step)
    with pytest.raises(Interrupted):
        run_online(config)
    monkeypatch.setattr(trainer_module.Trainer, "step", real_step)
    phases = json.loads((broken / "round-2" / "phases.json").read_text())
    assert list(phases) == ["sample", "score", "build"]
    samples_before = (broken / "round-2" / "samples.jsonl").stat().st_mtime_ns

    with pytest.raises(ConfigError, match="continue it with --resume"):
        run_online(config)  # a half-finished run is never silently resumed or overwritten
    saved = (broken / "config.yaml").read_text()
    rescored = config.model_copy(update={"online": config.online.model_copy(
        update={"scorer": "test_online_loop:count_b"})})
    with pytest.raises(ConfigError, match="online.scorer: 'test_online_loop:count_a' -> "
                                          "'test_online_loop:count_b'"):
        run_online(rescored, resume=True)  # round 2's samples were scored by count_a
    assert (broken / "config.yaml").read_text() == saved
    calls.clear()
    monkeypatch.setattr(trainer_module.Trainer, "step", failing_step)
    run_online(config, resume=True)
    assert calls == [1, 2]  # round 2 continued from its checkpoint at step 1; nothing redone
    assert (broken / "round-2" / "samples.jsonl").stat().st_mtime_ns == samples_before
    for name in ("samples.jsonl", "scored.jsonl", "pairs.jsonl"):
        assert (broken / "round-2" / name).read_text() == (straight / "round-2" / name).read_text()
    assert_same_weights(broken / "round-2" / "model", straight / "round-2" / "model")
    more = config.model_copy(update={"online": config.online.model_copy(update={"rounds": 3})})
    start_rounds(more, resume=True, overwrite=False)  # more rounds of the same run: allowed
    assert yaml.safe_load((broken / "config.yaml").read_text())["online"]["rounds"] == 3
    with pytest.raises(ConfigError, match="--resume continues the run in output_dir and "
                                          "--overwrite replaces it; give one of them"):
        start_rounds(more, resume=True, overwrite=True)  # (it moved the run aside, silently)
    assert not list(broken.parent.glob(f"{broken.name}.old-*"))


def test_cli_runs_a_round_and_reports_bad_settings(model_dir, data, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["online", "--set", f"model.path={model_dir}", "--set", f"data.train={data[0]}",
            "--set", "data.max_length=64", "--set", "data.max_prompt_length=32",
            "--set", "train.max_steps=1", "--set", "train.batch_size=2",
            "--set", "online.rounds=1", "--set", f"online.scorer={SCORER}",
            "--set", "online.sampling.max_new_tokens=6", "--set", f"output_dir={out}"]
    assert main(args[:-2] + ["--set", "online.pairs.unfinished_penalty=100"] + args[-2:]) == 0
    assert (out / "round-1" / "model" / "model.safetensors").exists()
    scored = {row["origin"]: row for row in read_jsonl(out / "round-1" / "scored.jsonl")}
    pairs = read_jsonl(out / "round-1" / "pairs.jsonl")
    assert any(pair.get("unfinished") for pair in pairs)
    for pair in pairs:  # each score less the penalty where the sample was cut off
        row = scored[pair["source"].split(" [")[0]]
        best, worst = map(int, pair["source"].split(" [")[1].rstrip("]").split(">"))
        assert [pair["chosen_score"], pair["rejected_score"]] == [
            row["scores"][k] - (0 if row["ended"][k] else 100) for k in (best, worst)]
    card = (out / "round-1" / "model" / "README.md").read_text()  # each round's model card
    assert f"a policy trained with `dpo` by preftune from `{model_dir}`" in card
    assert main(args[:-2] + ["--set", "online.sampling.samples=1", "--set",
                             f"output_dir={tmp_path / 'x'}"]) == 2
    assert "online.sampling.samples must be at least 2" in capsys.readouterr().err
    # several processes: refused at the start, not after the first round has sampled
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORLD_SIZE", "2")
        assert main(args[:-2] + ["--set", f"output_dir={tmp_path / 'two'}"]) == 2
    assert "preftune online runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "two").exists()
    # a misspelt scorer stops the run before any model loads or anything is written
    typo = tmp_path / "typo"
    assert main(args[:-4] + ["--set", "online.scorer=syntetic", "--set",
                             f"output_dir={typo}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: online.scorer: scorer 'syntetic': expected 'synthetic'")
    assert err.rstrip().endswith("Did you mean 'synthetic'?") and not typo.exists()
    assert main(args[:-4] + ["--set", "online.scorer=rm:nowhere", "--set",
                             f"output_dir={typo}"]) == 2
    assert "online.scorer: scorer 'rm:nowhere': nowhere is not a directory" in \
        capsys.readouterr().err and not typo.exists()


def test_a_prompt_file_row_without_a_prompt_is_named(model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    config = build_config(config_tree(model_dir, (str(bad), str(bad)), tmp_path / "o"),
                          schema=OnlineConfig)
    with pytest.raises(Exception, match=r"bad.jsonl:2: field 'prompt' \(the prompt\) is missing"):
        run_online(config)
    assert not (tmp_path / "o").exists()  # refused before the output directory is made
    # with --overwrite, the run already there is left in place (not moved aside for nothing)
    (tmp_path / "o" / "round-1").mkdir(parents=True)
    with pytest.raises(Exception, match=r"bad.jsonl:2: field 'prompt'"):
        run_online(config, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "o"]
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["round-1"]
    # prompts written two ways: refused before anything samples (it stopped at training,
    # naming the pairs file the run wrote)
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n"
                   + json.dumps({"prompt": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(Exception, match=r"bad.jsonl:2: field 'prompt' is a message list, and "
                                        r"the first prompt \(.*bad.jsonl:1\) is text; write "
                                        "every prompt one way"):
        run_online(config, overwrite=True)


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("examples/online/*.yaml")),
                         ids=lambda p: p.name)
def test_online_example_configs_are_valid(path):
    config = load_online_config(str(path))
    assert config.online.scorer and config.data.train


def test_objective_and_builder_must_agree(model_dir, data, tmp_path):
    tree = config_tree(model_dir, data, tmp_path, pairs={"builder": "list"})
    with pytest.raises(ConfigError, match="objective dpo trains on pairs data, but online.pairs"
                                          r".* makes ranked; use a pair builder \(best_vs_worst"):
        build_config(tree, schema=OnlineConfig)
    tree["online"]["pairs"]["builder"] = "best_vs_worst"
    tree["objective"] = {"name": "listwise_pl"}
    with pytest.raises(ConfigError, match="objective listwise_pl trains on ranked data, .* use "
                                          "builder 'list'"):
        build_config(tree, schema=OnlineConfig)
    tree["online"]["pairs"]["builder"] = "list"
    assert build_config(tree, schema=OnlineConfig).online.pairs.builder == "list"


@pytest.mark.parametrize("objective,pairs,reads", [
    ({"name": "listwise_pl"}, {"builder": "list"}, "responses"),
    ({"name": "kto"}, {"builder": "best_vs_each"}, "chosen"),
    ({"name": "sppo_soft"}, {"builder": "all_pairs", "win_probs": True}, "chosen_win_prob"),
    ({"name": "dpo"}, {"builder": "rso", "rso_beta": 1.0, "rso_accept": 4}, "chosen"),
])
def test_each_data_shape_trains_in_a_round(model_dir, data, tmp_path, objective, pairs, reads):
    tree = config_tree(model_dir, data, tmp_path / "run", rounds=1, pairs=pairs)
    tree["objective"] = objective
    run_online(build_config(tree, schema=OnlineConfig))
    rows = read_jsonl(tmp_path / "run" / "round-1" / "pairs.jsonl")
    assert rows and all(reads in row for row in rows)
    if "win_probs" in pairs:  # P(beats the others) from the verifier's 0/1/tie preferences
        scored = {r["origin"]: r for r in read_jsonl(tmp_path / "run" / "round-1" / "scored.jsonl")}
        for row in rows:
            origin, positions = row["source"].rsplit(" ", 1)
            i = int(positions.strip("[]").split(">")[0])
            s = scored[origin]["scores"]
            expected = sum(1.0 if s[i] > o else 0.5 if s[i] == o else 0.0
                           for j, o in enumerate(s) if j != i) / (len(s) - 1)
            assert row["chosen_win_prob"] == pytest.approx(expected)
    metrics = read_jsonl(tmp_path / "run" / "round-1" / "metrics.jsonl")
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) for m in metrics)
    # round 1 trains the initial model against itself: at step 1 every log-ratio is 0, so
    # DPO's loss is log 2 and KTO's 1 - sigmoid(0) (z_ref = 0, weights 1)
    first = {"dpo": math.log(2), "kto": 0.5}.get(objective["name"])
    if first is not None:
        assert metrics[0]["loss"] == pytest.approx(first, abs=1e-6)
        assert metrics[1]["loss"] != pytest.approx(first, abs=1e-6)  # and then it trains


def test_self_rewarding_round_with_the_policy_as_pairwise_judge(model_dir, data, tmp_path):
    from preftune.online.build import win_probs
    from preftune.score.judge import LLMJudge

    tree = config_tree(model_dir, data, tmp_path / "run", rounds=1, scorer="judge-pair:policy")
    run_online(build_config(tree, schema=OnlineConfig))
    judge = LLMJudge.from_pretrained(model_dir, pairwise=True)  # round 1's policy
    row = read_jsonl(tmp_path / "run" / "round-1" / "scored.jsonl")[0]
    k = len(row["responses"])
    matrix = [[0.5] * k for _ in range(k)]
    for i in range(k):
        for j in range(i + 1, k):
            p = judge.prefer([row["prompt"]], [row["responses"][i]], [row["responses"][j]])[0]
            matrix[i][j], matrix[j][i] = p, 1 - p
    assert row["win_probs"] == pytest.approx(win_probs(matrix), abs=1e-5)
    assert row["scores"] == row["win_probs"]  # a pairwise scorer ranks by win probability
    assert row["scorer"] == f"judge-pair:{model_dir}"
    answers = read_jsonl(tmp_path / "run" / "round-1" / "eval_answers.jsonl")
    initial = read_jsonl(tmp_path / "run" / "initial" / "eval_answers.jsonl")
    assert all(a["score"] == 0.5 for a in initial)  # the initial model against itself
    evaluation = json.loads((tmp_path / "run" / "round-1" / "eval.json").read_text())
    assert evaluation["mean_score"] == pytest.approx(sum(a["score"] for a in answers) / 3)


def per_step_tree(model_dir, data, output_dir):
    tree = config_tree(model_dir, data, output_dir)
    tree["online"].pop("rounds")
    tree["online"]["mode"] = "per_step"
    return tree


def test_per_step_mode_samples_from_the_current_policy_every_step(model_dir, data, tmp_path):
    out = tmp_path / "run"
    config = build_config(per_step_tree(model_dir, data, out), schema=OnlineConfig)
    run_online(config)
    here = out / "round-1"
    samples = read_jsonl(here / "samples.jsonl")
    assert sorted({s["step"] for s in samples}) == [1, 2, 3]
    # step 1 drew from the initial model: the same draws as generating with it directly
    first = [s for s in samples if s["step"] == 1][:2]
    model, tokenizer = load_model_and_tokenizer(model_dir)
    ids = prompt_ids([s["prompt"] for s in first], tokenizer, TokenizeSettings(64, 32))
    drawn = HFGenerator(model, tokenizer).generate(ids, SamplingSettings(
        samples=4, max_new_tokens=10, batch_size=4, seed=0 * 1_000_003 + 0 * 16 + 0)).texts
    assert [s["responses"] for s in first] == drawn
    pairs = read_jsonl(here / "pairs.jsonl")
    assert pairs and {p["step"] for p in pairs} <= {1, 2, 3}
    for p in pairs:
        assert p["chosen_score"] == count_a(None, p["chosen"]) > p["rejected_score"]
    assert [m["step"] for m in read_jsonl(here / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((out / "online.json").read_text())["rounds"][0]["evaluate"]["prompts"] == 3
    # the reference it trained against: a live copy of the initial model (not "precomputed")
    assert json.loads((here / "run.json").read_text())["reference"] == "live"


def test_each_micro_batch_of_a_per_step_step_draws_its_own_samples(model_dir, data, tmp_path):
    """With gradient accumulation every micro-batch sampled with the step's one seed: the
    tiny model (which hardly reads the prompt) gave both micro-batches the same answers."""
    tree = per_step_tree(model_dir, data, tmp_path / "run")
    tree["train"].update(max_steps=1, gradient_accumulation_steps=2)  # (batch 2 each)
    tree["data"]["eval"] = None
    run_online(build_config(tree, schema=OnlineConfig))
    samples = read_jsonl(tmp_path / "run" / "round-1" / "samples.jsonl")
    first, second = samples[:2], samples[2:4]  # each micro-batch's first draw of 2 prompts
    assert [s["prompt"] for s in first] != [s["prompt"] for s in second]
    for a, b in zip(first, second):
        assert a["responses"] != b["responses"]
    model, tokenizer = load_model_and_tokenizer(model_dir)  # the first: as before
    ids = prompt_ids([s["prompt"] for s in first], tokenizer, TokenizeSettings(64, 32))
    assert HFGenerator(model, tokenizer).generate(ids, SamplingSettings(
        samples=4, max_new_tokens=10, batch_size=4, seed=0)).texts == \
        [s["responses"] for s in first]


def test_per_step_mode_resumes_to_the_same_samples_and_weights(model_dir, data, tmp_path,
                                                                monkeypatch):
    straight, broken, config = straight_run_and_config(per_step_tree, model_dir, data, tmp_path)
    real_step = trainer_module.Trainer.step

    def failing_step(self, step):
        if step == 2:
            raise Interrupted
        return real_step(self, step)

    monkeypatch.setattr(trainer_module.Trainer, "step", failing_step)
    with pytest.raises(Interrupted):
        run_online(config)
    monkeypatch.setattr(trainer_module.Trainer, "step", real_step)
    run_online(config, resume=True)
    for name in ("samples.jsonl", "pairs.jsonl"):
        assert (broken / "round-1" / name).read_text() == (straight / "round-1" / name).read_text()
    assert_same_weights(broken / "round-1" / "model", straight / "round-1" / "model")


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}])
def test_per_step_mode_moves_the_reference_to_the_policy_with_tr_dpo_syncs(model_dir, data,
                                                                           tmp_path, lora):
    """A hard sync after every step: each step starts with reference = policy, so every DPO
    loss is log 2 (a fixed reference gives other values from step 2 on)."""
    tree = per_step_tree(model_dir, data, tmp_path / "synced")
    tree["reference"] = {"sync_every": 1, "sync_mix": 1.0}
    if lora:
        tree["model"]["lora"] = lora
    run_online(build_config(tree, schema=OnlineConfig))
    synced = [m["loss"] for m in read_jsonl(tmp_path / "synced" / "round-1" / "metrics.jsonl")]
    assert synced == pytest.approx([math.log(2)] * 3, abs=1e-6)
    tree = per_step_tree(model_dir, data, tmp_path / "fixed")
    if lora:
        tree["model"]["lora"] = lora
    run_online(build_config(tree, schema=OnlineConfig))
    fixed = [m["loss"] for m in read_jsonl(tmp_path / "fixed" / "round-1" / "metrics.jsonl")]
    assert fixed[0] == pytest.approx(math.log(2), abs=1e-6)
    assert fixed[1:] != pytest.approx([math.log(2)] * 2, abs=1e-4)


def test_online_rounds_refuse_reference_syncs(model_dir, data, tmp_path):
    tree = config_tree(model_dir, data, tmp_path)
    tree["reference"] = {"sync_every": 2}
    with pytest.raises(ConfigError, match="reference.sync_every moves the reference within one "
                                          "run: it works with online.mode per_step"):
        build_config(tree, schema=OnlineConfig)


@pytest.mark.parametrize("scorer", ["judge:policy", "judge-pair:policy"])
def test_per_step_mode_judges_with_the_policy_as_it_trains(model_dir, data, tmp_path, scorer):
    """Step 2's samples are judged by the policy after step 1 (the initial model judged every
    step), and a pairwise judge ranks by win probability (it stopped the run at step 1)."""
    from preftune.online.build import win_probs
    from preftune.score.base import preference_matrix
    from preftune.score.judge import LLMJudge

    runs = {}
    for steps in (1, 2):
        tree = per_step_tree(model_dir, data, tmp_path / f"steps-{steps}")
        tree["online"]["scorer"] = scorer
        tree["data"]["eval"] = None
        tree["train"].update(max_steps=steps, learning_rate=5e-2)
        run_online(build_config(tree, schema=OnlineConfig))
        runs[steps] = tmp_path / f"steps-{steps}" / "round-1"
    pairwise = scorer.startswith("judge-pair")
    after_one = LLMJudge.from_pretrained(str(runs[1] / "model"), pairwise=pairwise)
    initial = LLMJudge.from_pretrained(model_dir, pairwise=pairwise)
    rows = [row for row in read_jsonl(runs[2] / "samples.jsonl") if row["step"] == 2]
    assert len(rows) == 2  # (a batch of 2 prompts)

    def judged(judge, row):
        if pairwise:
            return win_probs(preference_matrix(judge, row["prompt"], row["responses"]))
        return judge.score([row["prompt"]] * len(row["responses"]), row["responses"])

    for row in rows:
        assert row["scores"] == pytest.approx(judged(after_one, row), abs=1e-5)
        assert row.get("win_probs") == (row["scores"] if pairwise else None)
    assert [s for row in rows for s in judged(initial, row)] != pytest.approx(
        [s for row in rows for s in row["scores"]], abs=1e-4)  # (training moved the judge)


def test_per_step_mode_refuses_settings_it_would_ignore(model_dir, data, tmp_path):
    tree = per_step_tree(model_dir, data, tmp_path)
    tree["online"].update(rounds=3, reference="previous", prompts_per_round=None)
    with pytest.raises(ConfigError, match="online.rounds: 3, online.reference: 'previous': "
                                          "nothing to set with online.mode per_step"):
        build_config(tree, schema=OnlineConfig)
    tree["online"].update(rounds=2, reference="initial")  # what per_step does anyway: accepted
    assert build_config(tree, schema=OnlineConfig).online.mode == "per_step"


@pytest.mark.parametrize("objective, builder, said", [
    ("fdpg", "list", "objective fdpg trains on lists, which online.mode per_step does not make"),
    ("listwise_pl", None, "objective listwise_pl trains on lists"),
    ("sppo_soft", None, "objective sppo_soft trains on win probabilities"),
    ("selm", "selm", "objective selm trains on the data's pairs beside a sample"),
])
def test_per_step_mode_names_the_objectives_it_cannot_train(model_dir, data, tmp_path,
                                                            objective, builder, said):
    """Said of the objective before any builder advice (which led to per_step's own refusal:
    fdpg was told to set online.reference: previous, which per_step then refused)."""
    tree = per_step_tree(model_dir, data, tmp_path)
    tree["objective"] = {"name": objective}
    if builder:
        tree["online"]["pairs"] = {"builder": builder}
    with pytest.raises(ConfigError, match=f"{said}.*use online.mode: rounds"):
        build_config(tree, schema=OnlineConfig)


@pytest.mark.parametrize("mode", ["rounds", "per_step"])
@pytest.mark.parametrize("objective, field", [
    ("todo", "tie"), ("group_robust_dpo", "group"), ("triple_po", "gold")])
def test_objectives_reading_fields_samples_lack_are_refused_before_sampling(
        model_dir, data, tmp_path, objective, field, mode):
    """They stopped after round 1 sampled (or inside step 1), asking for a field in a file
    the run wrote."""
    tree = (per_step_tree if mode == "per_step" else config_tree)(model_dir, data, tmp_path)
    tree["objective"] = {"name": objective}
    with pytest.raises(ConfigError, match=f"objective {objective} reads each record's "
                                          f"'{field}', which the pairs built from samples do "
                                          f"not carry.*train {objective} offline"):
        build_config(tree, schema=OnlineConfig)


def test_best_of_n_baseline_scores_each_prompt_by_its_best_sample(model_dir, data, tmp_path):
    tree = config_tree(model_dir, data, tmp_path / "run", rounds=1, eval_best_of=3,
                       scorer="test_online_loop:has_a")  # a checker: pass rates are said
    tree["train"]["max_steps"] = 1
    run_online(build_config(tree, schema=OnlineConfig))
    initial = json.loads((tmp_path / "run" / "initial" / "eval.json").read_text())
    best = initial["best_of_n"]
    assert initial["pass_rate"] == initial["mean_score"] and best["pass_rate"] == \
        best["mean_score"]
    model, tokenizer = load_model_and_tokenizer(model_dir)
    prompts = [json.loads(line)["prompt"] for line in open(data[1])]
    drawn = HFGenerator(model, tokenizer).generate(
        prompt_ids(prompts, tokenizer, TokenizeSettings(64, 32)),
        SamplingSettings(samples=3, max_new_tokens=8, batch_size=4, seed=1)).texts
    expected = [max(has_a(None, t) for t in texts) for texts in drawn]
    assert best["n"] == 3 and best["mean_score"] == pytest.approx(sum(expected) / 3)
    assert "best_of_n" not in json.loads((tmp_path / "run" / "round-1" / "eval.json").read_text())


def test_best_of_n_needs_held_out_prompts_and_a_scorer_of_one_answer(model_dir, data,
                                                                      tmp_path):
    tree = config_tree(model_dir, data, tmp_path / "run", rounds=1, eval_best_of=3)
    tree["data"].pop("eval")
    with pytest.raises(ConfigError, match="online.eval_best_of samples the initial model on "
                                          "data.eval's prompts; set data.eval"):
        build_config(tree, schema=OnlineConfig)
    tree = config_tree(model_dir, data, tmp_path / "run", rounds=1, eval_best_of=3,
                       scorer="judge-pair:policy")
    with pytest.raises(ConfigError, match=f"judge-pair:{model_dir} is pairwise"):
        run_online(build_config(tree, schema=OnlineConfig))
    assert not (tmp_path / "run" / "initial").exists()  # the fixed config may run there


def test_bonbon_n_must_match_the_samples(model_dir, data, tmp_path):
    tree = config_tree(model_dir, data, tmp_path)
    tree["objective"] = {"name": "bonbon", "n": 8}
    with pytest.raises(ConfigError, match=r"bonbon's n \(8\) must equal online.sampling.samples"):
        build_config(tree, schema=OnlineConfig)
    tree["objective"] = {"name": "bonbon", "n": 4}
    assert build_config(tree, schema=OnlineConfig).objective[0].name == "bonbon"


@pytest.mark.slow  # (their builders: test_online_build.py; lists in a round: below)
def test_d2o_and_pmpo_train_on_samples_and_the_data_negatives(model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"say a {k}", "chosen": "aaa",
                                         "rejected": f"no {k}"}) + "\n" for k in range(4)))
    for objective, builder in (("d2o", "d2o"), ("pmpo", "list")):
        tree = config_tree(model_dir, (str(pairs), str(pairs)), tmp_path / objective, rounds=1,
                           pairs={"builder": builder}, reference="previous")
        tree["objective"] = {"name": objective}
        run_online(build_config(tree, schema=OnlineConfig))
        rows = read_jsonl(tmp_path / objective / "round-1" / "pairs.jsonl")
        if objective == "d2o":
            assert [row["responses"][-1] for row in rows] == [f"no {k}" for k in range(4)]
            assert all(row["scores"][-1] == 0.0 and set(row["scores"][:-1]) == {1.0}
                       for row in rows)
        metrics = read_jsonl(tmp_path / objective / "round-1" / "metrics.jsonl")
        assert len(metrics) == 3 and all(math.isfinite(m["loss"]) for m in metrics)


@pytest.mark.slow  # (two rounds of lists: `pytest -m slow`)
def test_fdpg_rounds_train_on_lists_of_the_references_samples(model_dir, data, tmp_path):
    tree = config_tree(model_dir, data, tmp_path / "fdpg", pairs={"builder": "list"})
    tree["objective"] = {"name": "fdpg", "divergence": "js", "beta": 2.0}
    tree["train"]["batch_size"] = 8  # every list of a round in each step
    with pytest.raises(ConfigError, match="objective fdpg reads each list as samples of the "
                                          "reference.*online.reference: previous"):
        build_config(tree, schema=OnlineConfig)
    tree["online"]["reference"] = "previous"
    run_online(build_config(tree, schema=OnlineConfig))
    for r in (1, 2):
        # step 1 starts at pi_theta = pi_ref: the loss is the mean over the lists of the JS
        # divergence estimate mean_i f(t_i) / t_i, t_i = Z e^(-r_i / beta), Z = mean e^(r / beta)
        lists = read_jsonl(tmp_path / "fdpg" / f"round-{r}" / "pairs.jsonl")
        estimates = []
        for row in lists:
            z = sum(math.exp(s / 2.0) for s in row["scores"]) / len(row["scores"])
            ts = [z * math.exp(-s / 2.0) for s in row["scores"]]
            estimates.append(sum(0.5 * (math.log(2 * t / (1 + t)) - math.log((1 + t) / 2) / t)
                                 for t in ts) / len(ts))
        metrics = read_jsonl(tmp_path / "fdpg" / f"round-{r}" / "metrics.jsonl")
        assert metrics[0]["loss"] == pytest.approx(sum(estimates) / len(estimates), abs=1e-5)
        assert len(metrics) == 3 and all(math.isfinite(m["loss"]) for m in metrics)


def test_selm_rounds_rank_the_reference_sample_with_the_data_pair(model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"say a {k}", "chosen": "a" * (k % 3),
                                         "rejected": "b"}) + "\n" for k in range(4)))
    tree = config_tree(model_dir, (str(pairs), str(pairs)), tmp_path / "selm", rounds=2,
                       pairs={"builder": "selm"}, reference="previous")
    tree["online"]["sampling"]["samples"] = 1  # SELM: one sample of the reference per prompt
    tree["objective"] = {"name": "selm"}
    run_online(build_config(tree, schema=OnlineConfig))
    for r in (1, 2):
        here = tmp_path / "selm" / f"round-{r}"
        scored = {row["prompt"]: row for row in read_jsonl(here / "scored.jsonl")}
        for row in read_jsonl(here / "pairs.jsonl"):
            item = scored[row["prompt"]]
            sample = item["responses"][0]
            texts = {sample: item["scores"][0], item["positive"]: item["data_scores"][0],
                     "b": item["data_scores"][1]}
            assert item["data_scores"] == [count_a("", item["positive"]), 0.0]  # scorer's own
            assert row["gold"] == sample and row["gold_score"] == count_a("", sample)
            assert row["chosen_score"] == max(texts.values()) == texts[row["chosen"]]
            assert row["rejected_score"] == min(texts.values()) == texts[row["rejected"]]
        metrics = read_jsonl(here / "metrics.jsonl")
        assert len(metrics) == 3 and all(math.isfinite(m["loss"]) for m in metrics)
    # round 2's reference is round 1's model, which also drew round 2's samples
    assert read_jsonl(tmp_path / "selm" / "round-2" / "samples.jsonl")[0]["policy"] != \
        read_jsonl(tmp_path / "selm" / "round-1" / "samples.jsonl")[0]["policy"]


@pytest.mark.parametrize("builder, fields", [("d2o", "'rejected' response, and no row "
                                                     "has one"),
                                             ("selm", "'chosen' and 'rejected' response, and "
                                                      "no row has them")])
def test_builders_of_the_datas_responses_refuse_prompts_without_them(model_dir, data, tmp_path,
                                                                    builder, fields):
    """(Prompt-only data ran every round and trained nothing, its hint asking for more
    samples.)"""
    from preftune.data.records import DataError

    tree = config_tree(model_dir, data, tmp_path / "o", pairs={"builder": builder},
                       reference="previous")
    tree["objective"] = {"name": builder}
    with pytest.raises(DataError, match=f"{data[0]}: online.pairs.builder {builder} uses each "
                                        f"row's {fields}; give pairs data"):
        run_online(build_config(tree, schema=OnlineConfig))
    assert not (tmp_path / "o").exists()


def test_selm_needs_its_builder_the_previous_reference_and_rounds(model_dir, data, tmp_path):
    tree = config_tree(model_dir, data, tmp_path / "x", reference="previous")
    tree["objective"] = {"name": "selm"}
    with pytest.raises(ConfigError, match="objective selm and online.pairs.builder selm"):
        build_config(tree, schema=OnlineConfig)
    tree["online"]["pairs"] = {"builder": "selm"}
    tree["online"]["reference"] = "initial"
    with pytest.raises(ConfigError, match="must be the reference"):
        build_config(tree, schema=OnlineConfig)


def test_compare_runs_objectives_through_the_same_online_rounds(model_dir, data, tmp_path):
    from preftune.compare import run_compare

    base = tmp_path / "online.yaml"
    tree = config_tree(model_dir, data, tmp_path / "unused", rounds=1)
    tree["train"]["max_steps"] = 2
    tree["objective"] = {"name": "dpo"}  # each compared objective brings its own parameters
    tree["online"]["sampling"].update(samples=3, max_new_tokens=6)
    base.write_text(yaml.safe_dump(tree))
    root = run_compare(["dpo", "listwise_pl"], str(base), [], str(tmp_path / "cmp"))
    board = json.loads((root / "leaderboard.json").read_text())
    assert sorted(e["objective"] for e in board) == ["dpo", "listwise_pl"]
    for entry in board:
        summary = json.loads((root / entry["objective"] / "online.json").read_text())
        scores = [summary["initial"]["mean_score"], summary["rounds"][0]["evaluate"]["mean_score"]]
        assert entry["online/score"] == scores[-1]
        assert entry["online/scores"] == " → ".join(f"{s:.3f}" for s in scores)
        assert entry["online/kl"] == summary["rounds"][0]["evaluate"]["kl_to_initial"]
        diversity = summary["rounds"][0]["evaluate"]["sample_diversity"]
        assert (entry["online/distinct"], entry["online/word_distance"]) == (
            diversity["distinct"], diversity["word_distance"])
        # the run's own minutes: each phase, its training as run.json counts it
        (info,) = summary["rounds"]
        train_seconds = json.loads((root / entry["objective"] / "round-1" / "run.json")
                                   .read_text())["train_seconds"]
        assert info["train"]["train_seconds"] == train_seconds
        assert entry["train_minutes"] == pytest.approx((
            summary["initial"]["seconds"] + train_seconds + sum(
                info[phase]["seconds"] for phase in ("sample", "score", "build", "evaluate")))
            / 60)
    lists = read_jsonl(root / "listwise_pl" / "round-1" / "pairs.jsonl")
    assert all("responses" in row for row in lists)  # the list objective got lists
    assert "held-out score by round" in (root / "leaderboard.md").read_text()

    trained = root / "dpo" / "round-1" / "model" / "model.safetensors"
    stamp = trained.stat().st_mtime_ns
    run_compare(["dpo"], str(base), [], str(root))  # the same settings: nothing is redone
    assert trained.stat().st_mtime_ns == stamp
    run_compare(["dpo"], str(base), ["train.learning_rate=0.5"], str(root))  # other settings
    assert len(list(root.glob("dpo.old-*"))) == 1  # the earlier run, moved aside
    assert yaml.safe_load((root / "dpo" / "round-1" / "config.yaml").read_text())[
        "train"]["learning_rate"] == 0.5
    with pytest.raises(ConfigError, match="give --output-dir DIR instead"):
        run_compare(["dpo"], str(base), [f"output_dir={tmp_path}"], str(root))
    # the held-out flags of a comparison of offline runs were ignored here, whatever they said
    for flags, name in (({"eval_data": "nowhere.jsonl"}, "--eval-data"),
                        ({"scorer": "nope:nope"}, "--scorer"), ({"samples": 8}, "--samples")):
        with pytest.raises(ConfigError, match=f"{name} does nothing here: a comparison of "
                                              "online runs evaluates each round on the "
                                              "config's data.eval with online.scorer"):
            run_compare(["dpo"], str(base), [], str(root), **flags)


def constant(prompt, response):
    """A scorer that cannot tell samples apart."""
    return 1.0


def test_a_round_without_pairs_trains_nothing_and_the_next_starts_from_the_same_model(
        model_dir, data, tmp_path):
    tree = config_tree(model_dir, data, tmp_path / "run", scorer="test_online_loop:constant")
    run_online(build_config(tree, schema=OnlineConfig))
    summary = json.loads((tmp_path / "run" / "online.json").read_text())
    why = "no training rows ({0} of {0} prompts: every sample scored alike by " \
        "test_online_loop:constant)".format(summary["rounds"][0]["build"]["prompts"])
    assert [r["train"]["skipped"] for r in summary["rounds"]] == [why] * 2
    assert [r["policy"] for r in summary["rounds"]] == [model_dir, model_dir]
    assert not (tmp_path / "run" / "round-1" / "model").exists()
    assert summary["rounds"][1]["evaluate"]["mean_score"] == summary["initial"]["mean_score"]
    assert read_jsonl(tmp_path / "run" / "round-1" / "pairs.jsonl") == []
    from preftune.report.rundir import ReportError

    with pytest.raises(ReportError, match=re.escape(  # each round's own reason
            f"none of its 2 rounds trained (round 1: {why}; round 2: {why}), so there is no "
            "training curve")):
        load_run(tmp_path / "run")  # a finished run: not "run the report again later"


def test_compare_gives_selm_its_builder_and_the_previous_reference(model_dir, data, tmp_path):
    from preftune.online.compare import online_tree

    tree = build_config(config_tree(model_dir, data, tmp_path / "x"),
                        schema=OnlineConfig).model_dump()
    selm = online_tree(tree, {"name": "selm"}, tmp_path / "selm")
    assert (selm["online"]["pairs"]["builder"], selm["online"]["reference"]) == ("selm", "previous")
    build_config(selm, schema=OnlineConfig)  # a valid online config
    back = online_tree(selm, {"name": "dpo"}, tmp_path / "dpo")
    assert back["online"]["pairs"]["builder"] == "best_vs_worst"


def test_one_policy_sized_model_is_held_at_a_time(model_dir, data, tmp_path, monkeypatch):
    """Whenever a model or the scorer loads (sampling's policy, the held-out evaluation's
    model, the initial model for its KL), every model loaded before it is gone, even in a
    reference cycle (as transformers' first load in a process leaves one) and with the
    garbage collector off: run_phase collects after each phase, and the evaluation releases
    the round's model before the initial one loads."""
    import gc
    import weakref

    from preftune.online import loop, measure

    loaded, alive = [], []
    load, score = measure.load_on_device, loop.online_scorer

    def cyclic(path, config):
        alive.append(sum(ref() is not None for ref in loaded))
        model, tokenizer = load(path, config)
        model.__dict__["cycle"] = [model]
        loaded.append(weakref.ref(model))
        return model, tokenizer

    def scorer(*args):
        alive.append(sum(ref() is not None for ref in loaded))
        return score(*args)

    for module in (loop, measure):
        monkeypatch.setattr(module, "load_on_device", cyclic)
        monkeypatch.setattr(module, "online_scorer", scorer)
    tree = config_tree(model_dir, data, tmp_path / "run", rounds=1, eval_kl_samples=2)
    gc.collect()
    gc.disable()
    try:
        run_online(build_config(tree, schema=OnlineConfig))
    finally:
        gc.enable()
    # initial evaluation: scorer, model; round 1: sampling's policy, scorer, then the
    # evaluation's scorer, the round's model and the initial model for the KL
    assert len(loaded) == 4 and alive == [0, 0, 0, 0, 0, 0, 0]


def test_refused_runs_leave_nothing_and_an_overwrite_puts_the_old_run_back(model_dir, data,
                                                                          tmp_path, capsys):
    """An empty prompts file and a judge that is no model are refused before output_dir is
    made; a run refused in its first phase (a model.path that is no model, found when round 1
    loads it to sample, round-1/ made) takes back the folders it made, and the run
    --overwrite moved aside for it."""
    from preftune.data.records import DataError

    def config(**changes):
        tree = config_tree(model_dir, data, tmp_path / "o")
        for key, value in changes.items():
            section, _, name = key.partition("__")
            tree[section] = value if not name else {**tree[section], name: value}
        return build_config(tree, schema=OnlineConfig)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=f"{empty}: no rows; an online run samples answers"):
        run_online(config(data__train=str(empty)))
    with pytest.raises(ConfigError, match=r"online.scorer: scorer 'judge:\S*nowhere': \S*nowhere "
                                          "is neither a model directory nor a .gguf file"):
        run_online(config(online__scorer=f"judge:{tmp_path / 'nowhere'}"))
    with pytest.raises(ConfigError, match=r"scorer 'judge:': name the model after judge:"):
        run_online(config(online__scorer="judge:"))
    assert not (tmp_path / "o").exists()
    broken = config(model__path=str(tmp_path / "no-model"), data__eval=None)
    with pytest.raises(FileNotFoundError, match="no-model is neither a model directory"):
        run_online(broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]
    kept = tmp_path / "kept"
    (kept / "round-1").mkdir(parents=True)
    (kept / "round-1" / "samples.jsonl").write_text("{}\n")
    capsys.readouterr()
    with pytest.raises(FileNotFoundError, match="no-model is neither a model directory"):
        run_online(broken.model_copy(update={"output_dir": str(kept)}), overwrite=True)
    assert (kept / "round-1" / "samples.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "kept"]
    assert f"was moved back to {kept}: the new run wrote nothing" in capsys.readouterr().out


def test_a_run_says_when_its_longest_samples_would_train_cut(model_dir, data, tmp_path, capsys):
    """max_prompt_length 32 + max_new_tokens 40 > max_length 64: such a sample is scored whole
    and trained cut, which only data_report.json's response_truncated showed."""
    tree = config_tree(model_dir, data, tmp_path / "run", rounds=1)
    tree["online"]["sampling"]["max_new_tokens"] = 40
    run_online(build_config(tree, schema=OnlineConfig), plan_only=True)
    assert "note: online.sampling.max_new_tokens (40) is more than the 32 tokens " \
        "data.max_length (64) leaves after a prompt of data.max_prompt_length (32)" \
        in capsys.readouterr().out
    tree["online"]["sampling"]["max_new_tokens"] = 32  # (it fits)
    run_online(build_config(tree, schema=OnlineConfig), plan_only=True)
    assert "note: online.sampling.max_new_tokens" not in capsys.readouterr().out


def test_a_signal_in_the_last_step_of_a_rounds_training_stops_the_run_after_it(
        model_dir, data, tmp_path, monkeypatch):
    """It was noted and dropped (nothing was left to stop in that training), so round 2
    sampled, trained and evaluated, exit 0. The finished training is recorded, the run stops
    with SIGTERM's code, and --resume goes on with round 1's evaluation."""
    import os
    import signal

    from preftune.train.stopping import TrainingStopped

    tree = config_tree(model_dir, data, tmp_path / "run")
    real_step = trainer_module.Trainer.step

    def step_with_signal(self, step):
        if step == self.total_steps - 1 and "round-1" in str(self.output_dir):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during round 1's last step
        return real_step(self, step)

    monkeypatch.setattr(trainer_module.Trainer, "step", step_with_signal)
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM after round 1's training "
                                              r"\(it came during the last step\)") as stopped:
        run_online(build_config(tree, schema=OnlineConfig))
    assert stopped.value.exit_code == 143
    phases = json.loads((tmp_path / "run" / "round-1" / "phases.json").read_text())
    assert list(phases) == ["sample", "score", "build", "train"]
    assert (tmp_path / "run" / "round-1" / "model").is_dir()
    assert not (tmp_path / "run" / "round-2").exists()
    monkeypatch.setattr(trainer_module.Trainer, "step", real_step)
    run_online(build_config(tree, schema=OnlineConfig), resume=True)
    summary = json.loads((tmp_path / "run" / "online.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert "evaluate" in summary["rounds"][0]


def test_a_signal_another_run_of_the_process_let_finish_does_not_stop_an_online_run(
        model_dir, data, tmp_path):
    """(A train() in a notebook whose last step got Ctrl-C left it pending: an online run whose
    first round trained nothing would have stopped 'after round 1's training'.)"""
    from preftune.train.stopping import LATE_STOPS

    LATE_STOPS.append("SIGINT")
    run_online(build_config(config_tree(model_dir, data, tmp_path / "run", rounds=1),
                            schema=OnlineConfig), plan_only=True)
    assert LATE_STOPS == []
