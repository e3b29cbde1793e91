"""Pair and list builders against their definitions, on hand-made score tables."""

import math
import random

import pytest

from preftune.online.build import build_rows, positions, rso_pairs, why_no_rows, win_probs

SCORES = [0.2, 0.9, 0.2, -0.5, 0.6]  # best = 1, worst = 3; positions 0 and 2 tie


def test_best_vs_worst_is_the_top_against_the_bottom():
    assert positions("best_vs_worst", SCORES) == [(1, 3)]


def test_all_pairs_is_every_strictly_ordered_pair():
    expected = [(0, 3), (1, 0), (1, 2), (1, 3), (1, 4), (2, 3), (4, 0), (4, 2), (4, 3)]
    assert positions("all_pairs", SCORES) == expected  # (0, 2) tie: never a pair


def test_best_vs_each_pairs_the_best_with_every_lower_score():
    assert positions("best_vs_each", SCORES) == [(1, 0), (1, 2), (1, 3), (1, 4)]


def test_margin_filter_drops_close_pairs():
    # gaps: (1,0) 0.7, (1,2) 0.7, (1,3) 1.4, (1,4) 0.3
    assert positions("best_vs_each", SCORES, min_margin=0.5) == [(1, 0), (1, 2), (1, 3)]
    assert positions("best_vs_worst", SCORES, min_margin=1.5) == []


def test_all_tied_scores_make_no_pair():
    for builder in ("best_vs_worst", "all_pairs", "best_vs_each", "rso"):
        assert positions(builder, [1.0, 1.0, 1.0]) == []


class ScriptedRandom(random.Random):
    """Returns the given uniforms in order, so each accept/reject is known."""

    def __init__(self, values):
        super().__init__(0)
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def test_rso_accepts_with_probability_exp_of_the_gap_to_the_best_and_pairs_in_order():
    """Sample i is accepted on pass G_i ~ Geometric(p_i), p_i = exp((s_i - max s) / beta),
    drawn by inversion from one uniform each: G = ceil(log(1 - u) / log(1 - p))."""
    beta = 0.5
    scores = [0.0, 1.0, 0.5, 0.9]
    p = [math.exp((s - 1.0) / beta) for s in scores]  # 0.135, 1, 0.368, 0.819
    uniforms = [0.2, 0.5, 0.7, 0.5]
    passes = [1 if q == 1 else math.ceil(math.log(1 - u) / math.log(1 - q))
              for u, q in zip(uniforms, p)]
    assert passes == [2, 1, 3, 1]
    pairs = rso_pairs(scores, beta, accept=4, rng=ScriptedRandom(uniforms))
    # accepted in order 1, 3 (pass 1), 0 (pass 2), 2 (pass 3): pairs (1, 3) and (0, 2), the
    # higher score chosen
    assert pairs == [(1, 3), (2, 0)]


def test_rso_keeps_the_best_and_stops_at_the_accepted_count():
    rng = ScriptedRandom([0.5, 0.5, 0.5])  # passes 1, 5 and 2: 0 and 2 accepted first
    assert rso_pairs([3.0, 1.0, 2.0], beta=1.0, accept=2, rng=rng) == [(0, 2)]
    # a sample 10 below the best at beta 0.5 (p = 2e-9) is accepted, after some 10^8 passes,
    # at once (the passes hung the build); one whose p is 0 in floating point never is
    (pair,) = rso_pairs([10.0, 0.0, 0.0, 0.0], 0.5, 4, random.Random(0))  # (and a tied pair)
    assert pair[0] == 0 and pair[1] in (1, 2, 3)
    assert rso_pairs([1000.0, 0.0, 0.0], 0.5, 4, random.Random(0)) == []
    # p a denormal float (gap 360 at beta 0.5: p = 5e-313): its pass overflows a float, so it
    # is never accepted either (ceil raised OverflowError)
    assert rso_pairs([0.0, -360.0, -1.0, -2.0], 0.5, 4, random.Random(0)) == [(0, 2)]


def test_rso_draws_as_rejection_sampling_pass_after_pass():
    """The acceptance orders' frequencies equal those of the passes themselves."""
    def by_passes(scores, beta, accept, rng):
        top, waiting, accepted = max(scores), list(range(len(scores))), []
        while waiting and len(accepted) < accept:
            for i in list(waiting):
                if len(accepted) < accept and rng.random() < math.exp((scores[i] - top) / beta):
                    accepted.append(i)
                    waiting.remove(i)
        return tuple(accepted)

    def at_once(scores, beta, accept, rng):  # the order rso_pairs pairs up, by its pairs
        return tuple(rso_pairs(scores, beta, accept, rng))

    scores, draws = [1.0, 0.2, 0.6, 0.0], 20000
    counted = [{}, {}]
    for k, method in enumerate((by_passes, at_once)):
        rng = random.Random(k)
        for _ in range(draws):
            key = method(scores, 0.5, 2, rng)
            counted[k][key] = counted[k].get(key, 0) + 1
    loop_pairs = {}
    for order, n in counted[0].items():  # the loop's accepted orders as the pairs they make
        a, b = order
        pair = ((a, b) if scores[a] > scores[b] else (b, a),)
        loop_pairs[pair] = loop_pairs.get(pair, 0) + n
    assert set(loop_pairs) == set(counted[1])
    for pair, n in loop_pairs.items():
        assert counted[1][pair] / draws == pytest.approx(n / draws, abs=0.015), pair


def test_win_probs_are_the_mean_probability_of_beating_the_others():
    preference = [[0.5, 0.8, 1.0], [0.2, 0.5, 0.6], [0.0, 0.4, 0.5]]
    assert win_probs(preference) == pytest.approx([0.9, 0.4, 0.2])


def test_build_rows_keeps_provenance_and_the_samples_as_the_policy_wrote_them():
    scored = [
        {"prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b", "c"],
         "scores": [0.0, 1.0, 0.5], "origin": "p.jsonl:1", "round": 2, "policy": "abc"},
        {"prompt": "plain", "responses": ["x", "y"], "scores": [1.0, 1.0],
         "origin": "p.jsonl:2", "round": 2, "policy": "abc"},
    ]
    rows, counts = build_rows(scored, "best_vs_worst")
    assert counts == {"prompts": 2, "tied": 1, "no_pair": 0, "empty": 0, "rows": 1}
    assert rows == [{"prompt": [{"role": "user", "content": "q"}],
                     "chosen": "b", "rejected": "a",  # text after the generation prompt
                     "chosen_score": 1.0, "rejected_score": 0.0,
                     "source": "p.jsonl:1 [1>0]", "round": 2, "policy": "abc"}]
    lists, counts = build_rows(scored, "list")
    assert counts["rows"] == 1 and lists[0]["responses"] == ["a", "b", "c"]
    assert lists[0]["scores"] == [0.0, 1.0, 0.5] and lists[0]["source"] == "p.jsonl:1 [0, 1, 2]"


def test_empty_samples_are_left_out_and_positions_stay_those_of_the_file():
    scored = [{"prompt": "p", "responses": ["", "good", " ", "bad"], "scores": [-9, 2, -9, 1],
               "origin": "f:1"}]
    rows, counts = build_rows(scored, "best_vs_worst")
    assert counts == {"prompts": 1, "tied": 0, "no_pair": 0, "empty": 2, "rows": 1}
    assert (rows[0]["chosen"], rows[0]["rejected"], rows[0]["source"]) == ("good", "bad", "f:1 [1>3]")


def test_a_round_without_rows_is_explained_by_what_dropped_each_prompt():
    scored = [{"prompt": "p", "responses": ["a", "b", ""], "scores": [1.0, 1.05, 0.0],
               "origin": "f:1"},
              {"prompt": "q", "responses": ["c", "d"], "scores": [2.0, 2.0], "origin": "f:2"}]
    rows, counts = build_rows(scored, "best_vs_worst", min_margin=0.1)
    assert rows == [] and counts == {"prompts": 2, "tied": 1, "no_pair": 1, "empty": 1, "rows": 0}
    assert why_no_rows(counts, "my:scorer") == (
        "1 of 2 prompts: every sample scored alike by my:scorer; 1 of 2 prompts: no score gap of "
        "at least online.pairs.min_margin (or no pair drawn by rejection sampling); 1 empty "
        "samples left out")


def test_build_rows_carries_win_probabilities_for_sppo():
    scored = [{"prompt": "p", "responses": ["a", "b"], "scores": [0.0, 1.0],
               "win_probs": [0.25, 0.75], "origin": "f:1"}]
    rows, _ = build_rows(scored, "best_vs_worst")
    assert (rows[0]["chosen_win_prob"], rows[0]["rejected_win_prob"]) == (0.75, 0.25)


def test_d2o_lists_the_samples_as_anchors_and_the_data_negative_last():
    scored = [{"prompt": "p", "responses": ["s1", "s2", "s3"], "scores": [0.0, 0.0, 9.0],
               "negative": "bad answer", "origin": "f:1", "round": 1},
              {"prompt": "q", "responses": ["x", "y", "z"], "scores": [1.0, 0.0, 0.0],
               "origin": "f:2"}]
    rows, counts = build_rows(scored, "d2o")
    assert rows == [{"prompt": "p", "responses": ["s1", "s2", "s3", "bad answer"],
                     "scores": [1.0, 1.0, 1.0, 0.0], "source": "f:1 [0, 1, 2] + rejected",
                     "round": 1}]
    assert counts["without_negative"] == 1


@pytest.mark.parametrize("builder", ["list", "d2o"])
def test_a_list_with_an_empty_sample_is_left_out_whole(builder):
    """Every list of a round has the same length (training needs that), so a prompt with an
    empty sample makes no list, and the round says why."""
    scored = [{"prompt": "p", "responses": ["a", "", "c"], "scores": [1.0, 0.0, 2.0],
               "negative": "n", "origin": "f:1"},
              {"prompt": "q", "responses": ["a", "b", "c"], "scores": [1.0, 0.0, 2.0],
               "negative": "n", "origin": "f:2"}]
    rows, counts = build_rows(scored, builder)
    assert [row["source"].split(" ")[0] for row in rows] == ["f:2"]
    assert (counts["incomplete"], counts["empty"], counts["rows"]) == (1, 1, 1)
    rows, counts = build_rows(scored[:1], builder)
    assert why_no_rows(counts, "s") == ("1 of 1 prompts: an empty sample in the list (lists "
                                        "train at one length: every sample of a prompt); 1 "
                                        "empty samples left out")


def test_selm_ranks_the_reference_sample_with_the_data_pair_and_keeps_it_as_gold():
    base = {"prompt": "p", "positive": "good", "negative": "bad", "origin": "f:1", "round": 2}
    scored = [
        {**base, "responses": ["s"], "scores": [0.5], "data_scores": [0.9, 0.1]},  # middle
        {**base, "responses": ["", "s"], "scores": [0.0, 2.0], "data_scores": [0.9, 0.1]},  # best
        {**base, "responses": ["s"], "scores": [1.0], "data_scores": [1.0, 1.0]},  # all tie
        {"prompt": "q", "responses": ["t"], "scores": [1.0], "origin": "f:2"}]  # no data pair
    rows, counts = build_rows(scored, "selm")
    assert rows == [
        {"prompt": "p", "chosen": "good", "rejected": "bad", "gold": "s", "chosen_score": 0.9,
         "rejected_score": 0.1, "gold_score": 0.5, "source": "f:1 [0] chosen>rejected",
         "round": 2},
        {"prompt": "p", "chosen": "s", "rejected": "bad", "gold": "s", "chosen_score": 2.0,
         "rejected_score": 0.1, "gold_score": 2.0, "source": "f:1 [1] sample>rejected",
         "round": 2}]
    assert (counts["tied"], counts["without_data_pair"], counts["empty"]) == (1, 1, 1)
    # ties go by the data's label (its chosen above the sample above its rejected): the
    # data's chosen was made the rejected response when it tied the rejected one
    tied = [{**base, "responses": ["s"], "scores": [2.0], "data_scores": [1.0, 1.0]},
            {**base, "responses": ["s"], "scores": [1.0], "data_scores": [1.0, 0.0]}]
    rows, _ = build_rows(tied, "selm")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("s", "bad"), ("good", "bad")]
    assert [r["source"] for r in rows] == ["f:1 [0] sample>rejected", "f:1 [0] chosen>rejected"]
