"""Follow-up likelihood as reward (FLR) against single-sequence forwards of the formula, the
token that merges across the follow-up's start, the spec and file forms, and an online round
that scores with the policy's own follow-up likelihoods."""

import copy
import json

import pytest
import torch
import yaml

from preftune.config import ConfigError
from preftune.score import check_scorer, load_scorer
from preftune.score.follow_up import NEGATIVE, POSITIVE, FollowUpScorer
from tiny_models import build_tiny_tokenizer, char_tokenizer, save_tiny_model_dir, tiny_llama

PROMPTS = ["say hi", [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": "2+2?"}], "name a color"]
RESPONSES = ["hi", "4", "a long answer about the colour blue"]


@pytest.fixture(scope="module")
def parts():
    tokenizer = char_tokenizer()
    return tiny_llama(vocab_size=len(tokenizer), seed=3), tokenizer


def log_p(model, tokenizer, prompt, response, follow_up, template=True):
    """log p(follow_up | prompt, response): one unpadded forward of the conversation up to the
    follow-up's end, summed over its characters (one token each here)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    messages = messages + [{"role": "assistant", "content": response},
                           {"role": "user", "content": follow_up}]
    if template:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    else:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    text = text[: text.rindex(follow_up) + len(follow_up)]
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
    picked = logprobs.gather(-1, ids[0, 1:, None])[:, 0]
    return float(picked[-len(follow_up):].sum())


@pytest.mark.parametrize("template", [True, False])
def test_score_is_the_gap_between_positive_and_negative_follow_up_log_likelihoods(parts,
                                                                                  template):
    model, tokenizer = parts
    if not template:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = None
    scorer = FollowUpScorer(model, tokenizer, "follow-up:tiny", batch_size=4)  # mixed widths
    scores = scorer.score(PROMPTS, RESPONSES)
    for prompt, response, score in zip(PROMPTS, RESPONSES, scores):
        positive = [log_p(model, tokenizer, prompt, response, f, template) for f in POSITIVE]
        negative = [log_p(model, tokenizer, prompt, response, f, template) for f in NEGATIVE]
        expected = sum(positive) / len(positive) - sum(negative) / len(negative)
        assert score == pytest.approx(expected, abs=1e-4)
    assert len(set(scores)) == 3  # responses are told apart
    # one batch or one response at a time: the same numbers
    alone = FollowUpScorer(model, tokenizer, "follow-up:tiny", batch_size=1)
    assert alone.score(PROMPTS, RESPONSES) == pytest.approx(scores, abs=1e-4)
    # the shared conversation run once (its cache serving every follow-up) or each row whole
    groups = [[scorer.follow_up_ids(p, r, f) for f in POSITIVE + NEGATIVE]
              for p, r in zip(PROMPTS, RESPONSES)]
    torch.testing.assert_close(scorer.log_likelihoods(groups, share=True),
                               scorer.log_likelihoods(groups, share=False), atol=1e-4, rtol=0)
    assert scorer._shared(groups) is not None  # (the shared path did run)
    alike = FollowUpScorer(model, tokenizer, "follow-up:tiny", positive=["That is right."],
                           negative=["That is wrong."])  # the rows share a follow-up's start
    right, wrong = (log_p(model, tokenizer, PROMPTS[0], RESPONSES[0], f, template)
                    for f in ("That is right.", "That is wrong."))
    assert alike.score(PROMPTS[:1], RESPONSES[:1]) == pytest.approx([right - wrong], abs=1e-4)
    first, second = scores[0], scores[2]
    assert scorer.prefer(PROMPTS[:1], RESPONSES[:1], RESPONSES[2:]) == [float(first > second)]


def test_a_token_merged_across_the_follow_ups_start_counts_as_the_follow_ups():
    tokenizer = build_tiny_tokenizer()  # byte-level BPE: a space joins the word after it
    scorer = FollowUpScorer(tiny_llama(vocab_size=len(tokenizer)), tokenizer, "follow-up:bpe")
    for template, start in [(tokenizer.chat_template, ""), (None, " ")]:
        tokenizer.chat_template = template  # without one: "user: " + follow-up, a merged space
        for follow_up in ["hello there", "the quick brown fox"]:
            ids, count = scorer.follow_up_ids("say hello", "hello world", follow_up)
            text = tokenizer.decode(ids)
            assert tokenizer.decode(ids[-count:]) == start + follow_up
            before = tokenizer.encode(text[: -len(follow_up)], add_special_tokens=False)
            assert ids[: len(ids) - count] == before[: len(ids) - count]
            assert len(before) == len(ids) - count + len(start)  # the space token left out


def test_follow_up_spec_and_file_forms(tmp_path):
    directory = str(save_tiny_model_dir(tmp_path / "lm"))
    scorer = load_scorer(f"follow-up:{directory}")
    assert isinstance(scorer, FollowUpScorer) and not scorer.pairwise
    assert scorer.name == f"follow-up:{directory}" and scorer.positive == list(POSITIVE)
    check_scorer(f"follow-up:{directory}")  # a model is read only when the scorer loads
    path = tmp_path / "flr.yaml"
    path.write_text(yaml.safe_dump({"follow_up": {"model": directory, "positive": ["Thanks!"],
                                                  "negative": ["Wrong.", "Huh?"],
                                                  "batch_size": 2}}))
    check_scorer(str(path))  # what a run checks before any work: the file, not the model
    custom = load_scorer(str(path))
    assert (custom.positive, custom.negative, custom.batch_size) == (["Thanks!"],
                                                                      ["Wrong.", "Huh?"], 2)
    for bad, says in [({"positive": ["ok"]}, "follow_up takes a mapping with 'model'"),
                      ({"model": directory, "negative": []},
                       r"follow_up.negative must be a non-empty list of non-empty texts"),
                      ({"model": directory, "weight": 2}, "follow_up takes a mapping"),
                      ({"model": directory, "batch_size": 0},
                       "follow_up.batch_size must be a whole number of at least 1"),
                      ({"model": str(tmp_path / "nothing")}, "follow_up.model: ")]:
        path.write_text(yaml.safe_dump({"follow_up": bad}))
        with pytest.raises(ConfigError, match=f"scorer file {path}: {says}"):
            load_scorer(str(path))
        if "model: " not in says:  # (a model is read only when the scorer loads)
            with pytest.raises(ConfigError, match=f"scorer file {path}: {says}"):
                check_scorer(str(path))
    with pytest.raises(ConfigError, match="scorer 'follow-up:/no/such/dir': "):
        load_scorer("follow-up:/no/such/dir")


def test_an_online_round_scores_with_the_policys_follow_up_likelihoods(tmp_path):
    from test_online_loop import config_tree, read_jsonl, run_online

    from preftune.config import build_config
    from preftune.online.config import OnlineConfig

    model_dir = str(save_tiny_model_dir(tmp_path / "policy"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "say {k}"}}\n' for k in range(4)))
    tree = config_tree(model_dir, (str(prompts), str(prompts)), tmp_path / "run", rounds=1,
                       scorer="follow-up:policy")
    run_online(build_config(tree, schema=OnlineConfig))
    row = read_jsonl(tmp_path / "run" / "round-1" / "scored.jsonl")[0]
    scorer = load_scorer(f"follow-up:{model_dir}")  # round 1's policy
    assert row["scorer"] == f"follow-up:{model_dir}"
    expected = scorer.score([row["prompt"]] * len(row["responses"]), row["responses"])
    assert row["scores"] == pytest.approx(expected, abs=1e-4)


def test_rm_eval_measures_follow_up_likelihood_on_pairs(tmp_path):
    from preftune.cli import main

    directory = str(save_tiny_model_dir(tmp_path / "lm"))
    data = tmp_path / "pairs.jsonl"
    pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in
             zip(["say hi", "2+2?", "name a color"], RESPONSES, ["no", "five", "blue"])]
    data.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    assert main(["rm", "eval", "--scorer", f"follow-up:{directory}", "--data", str(data),
                 "--output", str(tmp_path / "out")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "rm_eval_pairs.jsonl").open()]
    scorer = load_scorer(f"follow-up:{directory}")
    prompts = [pair["prompt"] for pair in pairs]
    chosen = scorer.score(prompts, [pair["chosen"] for pair in pairs])
    rejected = scorer.score(prompts, [pair["rejected"] for pair in pairs])
    assert [row["reward_chosen"] for row in rows] == pytest.approx(chosen, abs=1e-4)
    assert [row["reward_rejected"] for row in rows] == pytest.approx(rejected, abs=1e-4)
    assert [row["correct"] for row in rows] == [c > r for c, r in zip(chosen, rejected)]
    assert [row["tokens_chosen"] for row in rows] == [len(pair["chosen"]) for pair in pairs]
