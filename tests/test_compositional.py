"""Compositional preference models (CPM): each feature's rating is the judge's expected rating
under that feature's question, the reward is their weighted sum, ``fit_weights`` reaches the
optimum of its regularised logistic regression, and ``rm fit-cpm`` writes a scorer file that
scores as fitted; bad files and settings are refused before the judge loads."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from preftune.cli import main
from preftune.config import ConfigError
from preftune.data.records import plain_text
from preftune.score import check_scorer, load_scorer
from preftune.score.compositional import CompositionalScorer, compositional_options, fit_weights
from tiny_models import char_tokenizer, save_tiny_model_dir, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore")

FEATURES = {"helpful": "How helpful is the response?",
            "braces": "Does it use {curly} braces?"}
PROMPTS = ["say hi", [{"role": "user", "content": "2+2?"}], "name a color"]
RESPONSES = ["hi", "4", "blue"]


def expected_rating(model, tokenizer, question, prompt, response, scale=5):
    """The judge's expected rating from one forward of the question as written out here."""
    text = (f"Answer this question about the response, from 1 (not at all) to {scale} "
            f"(completely): {question} Reply with the number only.\n\nRequest:\n"
            f"{plain_text(prompt)}\n\nResponse:\n{response}")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer.encode(chat, add_special_tokens=False)])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    labels = [tokenizer.convert_tokens_to_ids(str(k)) for k in range(1, scale + 1)]
    return float(logits[labels].softmax(-1) @ torch.arange(1.0, scale + 1))


def test_ratings_are_the_judges_expected_rating_per_question_and_the_reward_their_sum():
    tokenizer = char_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), seed=5)
    tree = {"compositional": {"judge": "unused", "features": FEATURES,
                              "weights": {"helpful": 0.7, "braces": -1.5}, "batch_size": 2}}
    scorer = CompositionalScorer(model, tokenizer, compositional_options("cpm.yaml", tree),
                                 "cpm:test")
    ratings = scorer.features(PROMPTS, RESPONSES)
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        for f, question in enumerate(FEATURES.values()):
            assert ratings[i, f] == pytest.approx(
                expected_rating(model, tokenizer, question, prompt, response), abs=1e-5)
    assert scorer.score(PROMPTS, RESPONSES) == pytest.approx(
        (0.7 * ratings[:, 0] - 1.5 * ratings[:, 1]).tolist(), abs=1e-9)
    (a,), (b,) = scorer.score(PROMPTS[:1], ["hi"]), scorer.score(PROMPTS[:1], ["blue"])
    # CPM's preference model, the one fit-cpm fits: sigmoid of the weighted rating gap
    assert scorer.prefer(PROMPTS[:1], ["hi"], ["blue"]) == pytest.approx(
        [1 / (1 + math.exp(b - a))], abs=1e-12)


def test_fit_weights_reaches_the_optimum_of_the_regularised_logistic_regression():
    generator = torch.Generator().manual_seed(0)
    deltas = torch.randn(200, 3, generator=generator, dtype=torch.float64)
    truth = torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64)
    labels = torch.rand(200, generator=generator, dtype=torch.float64) < torch.sigmoid(
        deltas @ truth)
    deltas = torch.where(labels[:, None], deltas, -deltas)  # each pair written chosen first
    l2 = 0.05
    w = fit_weights(deltas, l2)
    # the gradient of mean softplus(-w.d) + l2/2 |w|^2 is zero at the optimum
    gradient = (-torch.sigmoid(-(deltas @ w))[:, None] * deltas).mean(0) + l2 * w
    assert gradient.abs().max() < 1e-8
    assert w[0] > 1.0 and w[1] < -0.4 and abs(w[2]) < 0.3  # the deciding features, by sign


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("judge") / "tiny", seed=5))


def write_pairs(path, count=6):
    path.write_text("".join(json.dumps({"prompt": f"q{k}", "chosen": "a" * (k + 1),
                                        "rejected": "b" * (6 - k)}) + "\n"
                            for k in range(count)))
    return path


def test_fit_cpm_writes_a_scorer_file_that_scores_as_fitted(judge_dir, tmp_path, capsys):
    source = tmp_path / "cpm.yaml"
    source.write_text(yaml.safe_dump({"compositional": {"judge": judge_dir,
                                                        "features": FEATURES}}))
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "fitted.yaml"
    assert main(["rm", "fit-cpm", str(source), "--data", str(pairs), "--output", str(out),
                 "--l2", "0.1"]) == 0
    printed = capsys.readouterr().out
    fitted = yaml.safe_load(out.read_text())
    assert out.read_text().startswith("# weights fitted by `preftune rm fit-cpm`")
    # the weights are the fit of the ratings the plain scorer gives the pairs
    plain = load_scorer(str(source))
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    deltas = (plain.features(prompts, [r["chosen"] for r in rows])
              - plain.features(prompts, [r["rejected"] for r in rows]))
    weights = fit_weights(deltas, 0.1)
    assert list(fitted["compositional"]["weights"].values()) == pytest.approx(
        weights.tolist(), abs=1e-5)
    assert fitted["compositional"]["features"] == FEATURES
    accuracy = float(((deltas @ weights) > 0).double().mean())
    assert f"accuracy {accuracy:.3f}" in printed
    # loaded, it scores sum_f w_f c_f, and rm eval measures it on the same pairs
    scorer = load_scorer(str(out))
    assert scorer.score(prompts, ["a"] * 6) == pytest.approx(
        (plain.features(prompts, ["a"] * 6) @ weights).tolist(), abs=1e-4)
    assert main(["rm", "eval", "--scorer", str(out), "--data", str(pairs), "--output",
                 str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "rm_eval.json").read_text())["accuracy"] == \
        pytest.approx(accuracy)


@pytest.mark.parametrize("spec, message", [
    ({"judge": "j"}, "takes a mapping with 'judge'"),
    ({"judge": "j", "features": {"a": "Q?"}, "prompt": "x"}, "unknown keys \\['prompt'\\]"),
    ({"judge": "j", "features": {"a": ""}}, "features must map each feature's name"),
    ({"judge": "j", "features": {"a": "Q?"}, "weights": {"b": 1}},
     "weights must give a number for each feature \\(a\\)"),
    ({"judge": "j", "features": {"a": "Q?"}, "scale": 10}, "scale must be a whole number"),
])
def test_bad_scorer_files_are_refused_before_the_judge_loads(tmp_path, spec, message):
    path = tmp_path / "cpm.yaml"
    path.write_text(yaml.safe_dump({"compositional": spec}))
    with pytest.raises(ConfigError, match=message):
        check_scorer(str(path))


def test_fit_cpm_refuses_bad_settings_before_reading_or_loading(judge_dir, tmp_path, capsys,
                                                                 monkeypatch):
    import preftune.model.load as load

    monkeypatch.setattr(load, "load_model_and_tokenizer", lambda *a, **k: 1 / 0)
    source = tmp_path / "cpm.yaml"
    source.write_text(yaml.safe_dump({"compositional": {"judge": judge_dir,
                                                        "features": FEATURES}}))
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    single = tmp_path / "single.jsonl"
    single.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    combination = tmp_path / "sum.yaml"
    combination.write_text(yaml.safe_dump({"terms": [{"scorer": "rm:x"}]}))
    (tmp_path / "taken.yaml").write_text("")
    for args, message in (
            ([str(source), "--data", str(pairs), "--l2", "0"], "--l2 0.0: give a value above 0"),
            ([str(combination), "--data", str(pairs)], "has no"),
            ([str(source), "--data", str(single)], "single.jsonl:1: rm fit-cpm fits on pairs"),
            ([str(source), "--data", str(pairs), "--output", str(tmp_path / "taken.yaml")],
             "taken.yaml already exists")):
        if "--output" not in args:
            args = [*args, "--output", str(tmp_path / "out.yaml")]
        assert main(["rm", "fit-cpm", *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out.yaml").exists()


def test_the_example_scorer_file_is_valid():
    check_scorer(str(Path(__file__).parent.parent / "examples" / "scorers" / "cpm.yaml"))
