"""The Scorer interface: functions, the demo's checkers, reward models (scalar and GPM),
combinations (sum, min, log-sigmoid centring), and the win rate of ``preftune eval``."""

import json
import math
import sys
import textwrap

import pytest
import torch

from preftune.cli import main
from preftune.config import ConfigError
from preftune.data.synthetic import generate_split, write_jsonl
from preftune.reward.config import build_reward_config
from preftune.reward.train import train_reward_model
from preftune.score import (CombinedScorer, FunctionScorer, LogSigmoidCentred, SyntheticScorer,
                            baselines_from_samples, load_scorer)
from preftune.score.base import scored_in_chunks
from tiny_models import save_tiny_model_dir

pytestmark = pytest.mark.filterwarnings("ignore")


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


@pytest.fixture(scope="module")
def scorer_module(tmp_path_factory):
    """An importable module of scoring functions, as a user would write one."""
    root = tmp_path_factory.mktemp("scorers")
    (root / "my_checks.py").write_text(textwrap.dedent("""
        def length(prompt, response):
            return float(len(response))

        def has_seven(prompt, response):
            return 1.0 if "7" in response else 0.0

        def batch_length(prompts, responses):
            return [float(len(r)) for r in responses]
        batch_length.batched = True

        def noisy_length(prompts, responses):  # as a batch's float noise: earlier, a hair more
            return [len(r) - 1e-9 * i for i, r in enumerate(responses)]
        noisy_length.batched = True

        def broken(prompt, response):
            return float("nan")

        def raising(prompt, response):
            return {"x": 1}[response]

        def one_argument(image):
            return 1.0

        def with_options(prompt, response, scale=2.0, *more, **named):
            return scale

        def numpy_scores(prompts, responses):  # as numpy code returns them
            import numpy
            return numpy.array([len(r) for r in responses], dtype=numpy.float32)
        numpy_scores.batched = True

        def torch_count(prompt, response):
            import torch
            return torch.tensor(len(response))

        def numpy_flag(prompt, response):
            import numpy
            return numpy.bool_(True)
    """))
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def test_function_scorer_per_item_and_batched(scorer_module):
    assert FunctionScorer.from_spec("my_checks:length").score(["p", "q"], ["ab", "abcd"]) == [2, 4]
    assert load_scorer("my_checks:batch_length").score(["p"], ["xyz"]) == [3.0]
    assert load_scorer("my_checks:has_seven").prefer(["p", "p", "p"], ["7", "a", "b"],
                                                     ["a", "7", "c"]) == [1.0, 0.0, 0.5]
    # NumPy and torch scalars are the numbers they hold (np.float32 was refused as no number)
    assert load_scorer("my_checks:numpy_scores").score(["p", "q"], ["ab", "abc"]) == [2.0, 3.0]
    assert load_scorer("my_checks:torch_count").score(["p"], ["abcd"]) == [4.0]
    with pytest.raises(ConfigError, match="numpy_flag: returned True for response 0"):
        load_scorer("my_checks:numpy_flag").score(["p"], ["a"])  # a flag is no score


def test_bad_scores_and_specs_are_named(scorer_module):
    with pytest.raises(ConfigError, match="my_checks:broken: returned nan for response 0"):
        load_scorer("my_checks:broken").score(["p"], ["a"])
    with pytest.raises(ConfigError, match="expected 'synthetic', 'module:function'"):
        load_scorer("nothing-like-a-scorer")
    with pytest.raises(ConfigError, match="importable"):
        load_scorer("no_such_module_here:f")
    for nothing in ("", 3):  # (a reward-model error, an AttributeError)
        with pytest.raises(ConfigError, match=f"scorer '{nothing}': expected 'synthetic'"):
            load_scorer(nothing)
    with pytest.raises(ConfigError, match=r"scorer 'my_checks:one_argument': one_argument\(image\) "
                                          r"cannot be called as function\(prompt, response\)"):
        load_scorer("my_checks:one_argument")  # before any work, not at the first score
    assert load_scorer("my_checks:with_options").score(["p"], ["r"]) == [2.0]
    with pytest.raises(KeyError) as raised:  # the user's own error, with its traceback
        load_scorer("my_checks:raising").score(["Name a prime."], ["7"])
    if sys.version_info >= (3, 11):
        assert raised.value.__notes__ == ["(raised by scorer 'my_checks:raising' while scoring a "
                                          "response to prompt 'Name a prime.')"]


def test_a_scorer_module_in_the_working_directory_is_found_off_the_path(tmp_path, monkeypatch):
    """The ``preftune`` command (unlike ``python -m``) does not put the working directory on
    sys.path; a user's ``my_module:my_function`` there is found all the same."""
    (tmp_path / "scorer_in_cwd.py").write_text("def two(prompt, response):\n    return 2.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_scorer("scorer_in_cwd:two").score(["p"], ["a"]) == [2.0]


def test_synthetic_scorer_applies_each_prompts_checker(tmp_path):
    _, tasks = generate_split(4, 6, seed=0)
    write_jsonl(tasks, tmp_path / "eval.jsonl")
    scorer = load_scorer("synthetic", str(tmp_path / "eval.jsonl"))
    assert isinstance(scorer, SyntheticScorer)
    prompts = [t.prompt for t in tasks]
    assert scorer.score(prompts, [t.chosen for t in tasks]) == [1.0] * 6
    assert scorer.score(prompts, [t.rejected for t in tasks]) == [0.0] * 6


def test_combined_sum_and_min(scorer_module):
    length, seven = load_scorer("my_checks:length"), load_scorer("my_checks:has_seven")
    both = CombinedScorer([(length, 0.5), (seven, 2.0)], "sum")
    assert both.score(["p", "p"], ["a7", "abcd"]) == [0.5 * 2 + 2.0, 0.5 * 4 + 0.0]
    worst = CombinedScorer([(length, 1.0), (seven, 10.0)], "min")
    assert worst.score(["p", "p"], ["a7", "abcd"]) == [2.0, 0.0]


class GroupRM:
    """A group's reward model: fixed rewards by response."""

    pairwise = False

    def __init__(self, name, rewards):
        self.name, self.rewards = name, rewards

    def score(self, prompts, responses):
        return [self.rewards[r] for r in responses]


def test_maxmin_scores_with_the_worst_served_groups_model():
    """MaxMin-RLHF: max_pi min_k E[r_k]. Group 1's model rates these samples lowest on average
    (2.0 against 6.5), so its rewards rank them: B best, A worst. The per-response minimum
    ranks them otherwise (C best, B worst) and would pair them the other way round."""
    first = GroupRM("group1", {"A": 1.0, "B": 3.0, "C": 2.0})
    second = GroupRM("group2", {"A": 7.0, "B": 0.5, "C": 12.0})
    samples = ["A", "B", "C"]
    maxmin = CombinedScorer([(first, 1.0), (second, 1.0)], "maxmin")
    assert maxmin.score(["p"] * 3, samples) == [1.0, 3.0, 2.0]
    assert CombinedScorer([(first, 1.0), (second, 1.0)], "min").score(
        ["p"] * 3, samples) == [1.0, 0.5, 2.0]
    # weights scale each group's rewards before the worst is found: now group 2's mean is lower
    assert CombinedScorer([(first, 1.0), (second, 0.25)], "maxmin").score(
        ["p"] * 3, samples) == [1.75, 0.125, 3.0]
    # both sides of a comparison under one group's model (group 1: means 2.5 vs group 2's 6.25)
    assert maxmin.prefer(["p", "p"], ["A", "B"], ["C", "A"]) == [0.0, 1.0]
    assert maxmin.score([], []) == []
    # an online round scores its samples in chunks; a maxmin sees them all in one call
    calls = []
    many = GroupRM("many", {str(i): float(i) for i in range(150)})
    many.score = lambda prompts, responses: calls.append(len(responses)) or [
        float(r) for r in responses]
    whole = CombinedScorer([(many, 1.0)], "maxmin")
    assert scored_in_chunks(whole.score, "scoring", ["p"] * 150, [str(i) for i in range(150)]) \
        == [float(i) for i in range(150)]
    assert calls == [150]
    # inside another combination, or centred, it still gets the whole set at once
    outer = CombinedScorer([(whole, 1.0)], "sum")
    assert outer.whole_set and LogSigmoidCentred(whole, {}).whole_set
    calls.clear()
    scored_in_chunks(outer.score, "scoring", ["p"] * 150, [str(i) for i in range(150)])
    assert calls == [150]


def test_a_maxmin_judges_both_sides_of_every_comparison_with_one_term():
    """Win rates (eval) and win probabilities (online rounds) under a maxmin: the term is
    chosen once for the set being compared, not once per side or per prompt."""
    from types import SimpleNamespace

    from preftune.evaluate.generated import win_rate
    from preftune.online.build import build_rows

    length = GroupRM("length", {"y" * 10: 10.0, "y": 1.0, "z": 1.0, "zz": 2.0})
    short = GroupRM("short", {"y" * 10: 2.0, "y": 6.5, "z": 6.5, "zz": 6.0})
    maxmin = CombinedScorer([(length, 1.0), (short, 1.0)], "maxmin")
    # policy "y"*10 against reference "y": scored per side, each side takes its own worst
    # term (short gives the policy 2.0, length the reference 1.0) and the policy would win;
    # together, short's mean (4.25) is below length's (5.5): short judges both, 2.0 vs 6.5
    prompts = [SimpleNamespace(index=0, images=())]
    records = [SimpleNamespace(prompt="p", origin="data:1", tools=())]
    result, rows = win_rate(maxmin, [["y" * 10], ["y"]], prompts, records)
    assert result["win_rate"] == 0.0 and maxmin.worst == "short"
    assert (rows[0]["policy_score"], rows[0]["reference_score"]) == (2.0, 6.5)
    assert maxmin.prefer(["p"], ["y" * 10], ["y"]) == [0.0]
    # an online round: scored as a whole (short's mean is lower), and its win probabilities
    # are those of the round's scores, so the pairs are judged by that one term too
    row = {"prompt": "p", "responses": ["z", "zz"], "scores": [6.5, 6.0], "origin": "p:1"}
    (pair,), _ = build_rows([row], "best_vs_worst", with_win_probs=True)
    assert (pair["chosen"], pair["chosen_win_prob"], pair["rejected_win_prob"]) == ("z", 1.0, 0.0)


def test_log_sigmoid_centring_against_per_prompt_quantiles(scorer_module):
    length = load_scorer("my_checks:length")
    baselines = baselines_from_samples(length, ["p", "p", "p", "q"], ["a", "abc", "abcde", "ab"],
                                       quantile=0.5)
    assert baselines == {"p": 3.0, "q": 2.0}
    centred = LogSigmoidCentred(length, baselines)
    values = centred.score(["p", "q"], ["abcd", "a"])
    assert values == pytest.approx([log_sigmoid(4 - 3), log_sigmoid(1 - 2)], rel=1e-12)
    with pytest.raises(ConfigError, match="no reference reward for the prompt 'r'"):
        centred.score(["r"], ["x"])


def test_yaml_combination(scorer_module, tmp_path):
    samples = tmp_path / "ref.jsonl"
    samples.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n"
                               for p, r in [("p", "ab"), ("p", "abcd"), ("q", "abc")]))
    spec = tmp_path / "scorer.yaml"
    spec.write_text(textwrap.dedent(f"""
        combine: sum
        terms:
          - scorer: my_checks:length
            transform: lsc
            baseline: {{data: {samples}, quantile: 0.5}}
          - scorer: my_checks:has_seven
            weight: 0.25
    """))
    scorer = load_scorer(str(spec))
    values = scorer.score(["p", "q"], ["abc7", "a"])
    assert values == pytest.approx([log_sigmoid(4 - 3) + 0.25, log_sigmoid(1 - 3)], rel=1e-12)
    spec.write_text("terms:\n  - scorer: my_checks:length\n    baseline: {data: x}\n")
    with pytest.raises(ConfigError, match="baseline does nothing without transform: lsc"):
        load_scorer(str(spec))


@pytest.mark.parametrize("text, message", [
    ("terms:\n  - scorer: my_checks:length\n    wieght: 2\n",
     r"terms\[0\]: unknown keys \['wieght'\]; expected scorer, weight, transform, baseline"),
    ("terms:\n  - scorer: my_checks:length\n    weight: heavy\n",
     r"terms\[0\]: weight must be a number, got 'heavy'"),
    ("combine: mean\nterms:\n  - scorer: my_checks:length\n",
     r"scorer.yaml: combine is one of sum, min, maxmin, got 'mean'"),
    ("terms: []\n", r"scorer.yaml: terms is empty"),
    ("terms:\n  - scorer: my_checks:length\n  - scorer: rm:nowhere\n",
     r"scorer 'rm:nowhere': nowhere is not a"),
    ("terms:\n  - scorer: my_checks:length\n  - scorer: my_checks:nothing_here\n",
     r"scorer 'my_checks:nothing_here'"),
    ("terms:\n  - scorer: my_checks:length\n    transform: lsc\n"
     "    baseline: {data: missing.jsonl}\n",
     r"terms\[0\]: baseline.data \(reference samples: rows with 'prompt' and 'response'\): "
     r"missing.jsonl: file not found"),
    ("terms:\n  - scorer: my_checks:length\n    transform: lsc\n"
     "    baseline: {data: questions.jsonl}\n",  # read before a run samples
     r"terms\[0\]: baseline.data .*: questions.jsonl:1: field 'prompt' \(prompt\) is missing"),
    ("terms:\n  - scorer: my_checks:length\n    transform: lsc\n"
     "    baseline: {data: scorer.yaml, quantile: 1.5}\n",
     r"terms\[0\]: baseline.quantile must be a number in \[0, 1\], got 1.5"),
])
def test_a_bad_combination_file_is_refused_before_a_run_names_its_term(scorer_module, tmp_path,
                                                                       monkeypatch, text,
                                                                       message):
    """``check_scorer`` (what a run calls before anything is written or loaded) reads the whole
    combination: its keys, values and every term's scorer, and names the file and the term."""
    from preftune.score import check_scorer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "scorer.yaml").write_text(text)
    (tmp_path / "questions.jsonl").write_text('{"question": "q", "response": "r"}\n')
    with pytest.raises(ConfigError, match=message):
        check_scorer("scorer.yaml")
    with pytest.raises(ConfigError, match=message):
        load_scorer("scorer.yaml")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorer-models")
    save_tiny_model_dir(root / "policy")
    rows = [{"prompt": f"Say {w}.", "chosen": w, "rejected": w + "!!"} for w in
            ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for loss in ("bt", "gpm"):
        runs[loss] = train_reward_model(build_reward_config({
            "output_dir": str(root / loss), "model": {"path": str(root / "policy")},
            "data": {"train": str(root / "pairs.jsonl")}, "loss": {"name": loss},
            "train": {"learning_rate": 1e-3, "batch_size": 4, "max_steps": 2}}),
            show_progress=False)
    return root, runs


def test_reward_model_scorer_scalar_and_gpm(models):
    root, runs = models
    scalar = load_scorer(f"rm:{runs['bt']}")
    assert not scalar.pairwise
    first, second = scalar.score(["Say alpha.", "Say beta."], ["alpha", "beta!!"])
    again = scalar.score(["Say beta.", "Say alpha."], ["beta!!", "alpha"])
    assert again == pytest.approx([second, first], abs=1e-6)  # batching does not change scores
    p = scalar.prefer(["Say alpha."], ["alpha"], ["beta!!"])[0]
    assert p == pytest.approx(1 / (1 + math.exp(-(scalar.score(["Say alpha."], ["alpha"])[0]
                                                  - scalar.score(["Say alpha."], ["beta!!"])[0]))),
                              abs=1e-6)
    gpm = load_scorer(str(runs["gpm"]))  # a directory works without the rm: prefix
    assert gpm.pairwise
    forward = gpm.prefer(["Say alpha."], ["alpha"], ["alpha!!"])[0]
    backward = gpm.prefer(["Say alpha."], ["alpha!!"], ["alpha"])[0]
    assert forward + backward == pytest.approx(1.0, abs=1e-6)  # skew-symmetric
    assert gpm.prefer(["Say alpha."], ["alpha"], ["alpha"])[0] == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ConfigError, match="compares responses and has no score of its own"):
        CombinedScorer([(gpm, 1.0)])


def test_eval_win_rate_under_a_reward_model(models, tmp_path):
    """The policy is the reference, so both give the same greedy answers: every prompt ties."""
    root, runs = models
    for loss, key in (("bt", "win_rate/policy_score"), ("gpm", "win_rate/preference_mean")):
        out = tmp_path / loss
        assert main(["eval", "--model", str(root / "policy"), "--reference", str(root / "policy"),
                     "--data", str(root / "pairs.jsonl"), "--samples", "0",
                     "--max-new-tokens", "3", "--scorer", f"rm:{runs[loss]}",
                     "--output", str(out)]) == 0
        results = json.loads((out / "eval.json").read_text())
        assert results["win_rate"] == 0.5 and results["win_rate/prompts"] == 8
        answers = [json.loads(line)
                   for line in (out / "eval_answers.jsonl").read_text().splitlines()]
        assert len(answers) == 8 and all(a["policy_answer"] == a["reference_answer"]
                                         for a in answers)
        assert key in results
        if loss == "gpm":
            assert results[key] == pytest.approx(0.5, abs=1e-6)
        else:
            assert results["win_rate/policy_score"] == results["win_rate/reference_score"]


def test_preference_win_rate_counts_ties_as_half():
    from preftune.evaluate.diagnostics import preference_win_rate

    assert preference_win_rate(torch.tensor([0.9, 0.5, 0.2, 0.51])) == pytest.approx(0.625)


def test_rm_eval_measures_any_scorer_on_pairs(scorer_module, tmp_path):
    """``rm eval --scorer``: the score gap is the logit, a tie counts as wrong, lengths are in
    characters for a scorer without a tokenizer (here the score is the length itself)."""
    pairs = [("abcd", "ab", "x"), ("a", "abc", "x"), ("xy", "zw", "y"), ("abcdef", "a", "y")]
    data = tmp_path / "pairs.jsonl"
    def row(chosen, rejected, category):  # chat messages: their content is what is scored
        return {"prompt": [{"role": "user", "content": "p"}], "category": category,
                **{side: [{"role": "assistant", "content": text}]
                   for side, text in (("chosen", chosen), ("rejected", rejected))}}

    data.write_text("".join(json.dumps(row(*pair)) + "\n" for pair in pairs))
    assert main(["rm", "eval", "--scorer", "my_checks:length", "--data", str(data),
                 "--output", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "rm_eval.json").read_text())
    assert results["scorer"] == "my_checks:length" and results["pairs"] == 4
    assert results["accuracy"] == 0.5
    assert results["accuracy_by"]["category"] == {"x": {"pairs": 2, "accuracy": 0.5},
                                                  "y": {"pairs": 2, "accuracy": 0.5}}
    assert results["rewards/chosen_mean"] == 3.25 and results["rewards/rejected_mean"] == 2.0
    assert results["rewards/length_corr"] == pytest.approx(1.0)
    rows = [json.loads(line) for line in (tmp_path / "out" / "rm_eval_pairs.jsonl").open()]
    gaps = [len(c) - len(r) for c, r, _ in pairs]
    assert [row["p_chosen"] for row in rows] == pytest.approx([1 / (1 + math.exp(-g))
                                                               for g in gaps])
    assert [row["correct"] for row in rows] == [True, False, False, True]
    assert [(row["characters_chosen"], row["reward_chosen"]) for row in rows] == [
        (4, 4.0), (1, 1.0), (2, 2.0), (6, 6.0)]
    from preftune.data.records import response_text

    parts = [{"type": "text", "text": "ab"}, {"type": "text", "text": "cd"}]
    assert response_text([{"role": "assistant", "content": parts}]) == "abcd"
    # mean lengths 3, 2, 2, 3.5: quartile cuts 2 (the least: merged), 2.5 and 3.125
    assert list(results["accuracy_by"]["length"]) == [
        "[2, 2.5) characters", "[2.5, 3.125) characters", "[3.125, 3.5] characters"]
    with pytest.raises(SystemExit):  # one of them, not both
        main(["rm", "eval", "--scorer", "my_checks:length", "--model", "x", "--data", str(data)])


def test_rm_eval_counts_a_response_against_itself_as_a_tie(scorer_module, tmp_path):
    """Ties count as wrong: a pair of one response twice is one, whatever float noise the
    scorer's batch gave its two sides."""
    data = tmp_path / "same.jsonl"
    data.write_text("".join(json.dumps({"prompt": "p", "chosen": c, "rejected": r}) + "\n"
                            for c, r in (("abc", "abc"), ("abcd", "a"), ("xy", "xy"))))
    assert main(["rm", "eval", "--scorer", "my_checks:noisy_length", "--data", str(data),
                 "--output", str(tmp_path / "out")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "rm_eval_pairs.jsonl").open()]
    assert [(row["correct"], row["p_chosen"]) for row in rows] == [
        (False, 0.5), (True, pytest.approx(1 / (1 + math.exp(-3)))), (False, 0.5)]


def test_scorer_models_load_in_the_runs_dtype(models, tmp_path):
    """Judges, reward models and follow-up likelihood load in the dtype they are given (an
    online run's or a training run's model.dtype: bf16 halves a GPU's share for them), float32
    by default; a combination passes it to its terms."""
    from types import SimpleNamespace

    from preftune.online.common import online_scorer

    root, runs = models
    policy = root / "policy"
    (tmp_path / "mix.yaml").write_text(f"terms:\n  - scorer: rm:{runs['bt']}\n")

    def dtypes(scorer):
        module = getattr(scorer, "model", None) or scorer.scoring.model
        return {p.dtype for p in module.parameters()}

    for spec in (f"judge:{policy}", f"follow-up:{policy}", f"rm:{runs['bt']}"):
        assert dtypes(load_scorer(spec)) == {torch.float32}
        assert dtypes(load_scorer(spec, dtype="bfloat16")) == {torch.bfloat16}
    mixed = load_scorer(str(tmp_path / "mix.yaml"), dtype="bfloat16")
    assert dtypes(mixed.terms[0][0]) == {torch.bfloat16}
    config = SimpleNamespace(online=SimpleNamespace(scorer=f"rm:{runs['bt']}"),
                             model=SimpleNamespace(dtype="bfloat16"))
    assert dtypes(online_scorer(config, str(policy), None)) == {torch.bfloat16}
