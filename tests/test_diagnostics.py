"""Evaluation diagnostics against hand computations (plain Python math, not the library)."""

import math
import random

import pytest
import torch

from preftune.data.layout import choose_layout
from preftune.data.tokenize import TokenizedExample
from preftune.evaluate import diagnostics as D
from preftune.evaluate.sampling import score_responses
from preftune.model.forward import SequenceStats
from tiny_models import char_tokenizer, tiny_llama

POLICY = [[-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-4.0, -9.0]]
REFERENCE = [[-1.5, -1.5], [-2.0, -2.0], [-2.0, -2.0], [-3.0, -8.0]]
COUNTS = [[2.0, 4.0], [6.0, 1.0], [1.0, 1.0], [4.0, 9.0]]
BETA = 0.5


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_implied_reward_accuracy_and_margin_count_ties_as_wrong():
    rewards = [[BETA * (p - r) for p, r in zip(ps, rs)] for ps, rs in zip(POLICY, REFERENCE)]
    # pair 0: 0.25 vs -0.25 right; 1: -0.5 vs 0.5 wrong; 2: 0 vs 0 tie; 3: -0.5 vs -0.5 tie
    computed = D.implied_rewards(t(POLICY), t(REFERENCE), BETA)
    assert computed.flatten().tolist() == pytest.approx(sum(rewards, []))
    assert D.reward_accuracy(computed) == pytest.approx(1 / 4)
    assert D.reward_margin(computed) == pytest.approx((0.5 - 1.0 + 0.0 + 0.0) / 4)


def test_ranking_accuracy_summed_and_length_normalised():
    summed = [p[0] > p[1] for p in POLICY]
    normalised = [p[0] / c[0] > p[1] / c[1] for p, c in zip(POLICY, COUNTS)]
    assert summed == [True, False, False, True]  # pair 2 is a tie: not correct
    assert normalised == [False, True, False, False]  # pairs 0 and 3 are ties
    assert D.ranking_correct(t(POLICY)).tolist() == summed
    assert D.ranking_correct(t(POLICY) / t(COUNTS)).tolist() == normalised


def test_idealized_ranking_from_votes_and_from_scores():
    reference = [[-10.0, -9.5], [-10.0, -9.5], [-4.0, -6.0]]
    votes = [(0.75, 0.25), (6, 2), (0.5, 0.5)]  # counts give the same ratio as fractions
    beta = 0.1
    expected = [math.log(w / l) / beta + r[0] - r[1] > 0 for (w, l), r in zip(votes, reference)]
    assert expected == [True, True, True]
    gap = D.vote_reward_gap(t([w for w, _ in votes]), t([l for _, l in votes]))
    assert gap.tolist() == pytest.approx([math.log(3), math.log(3), 0.0])
    assert D.idealized_correct(t(reference), gap, beta).tolist() == expected
    # scores: the score difference is the true reward gap r*(y_w) - r*(y_l)
    scores = [(1.0, 0.98), (2.0, 1.0), (0.0, 0.5)]
    expected = [(w - l) / beta + r[0] - r[1] > 0 for (w, l), r in zip(scores, reference)]
    assert expected == [False, True, False]
    gap = t([w - l for w, l in scores])
    assert D.idealized_correct(t(reference), gap, beta).tolist() == expected


def test_likelihood_displacement_is_the_log_ratio_to_the_initial_model():
    delta = D.likelihood_displacement(t(POLICY), t(REFERENCE))
    assert delta.flatten().tolist() == pytest.approx([0.5, -0.5, -1.0, 1.0, 0, 0, -1.0, -1.0])


def test_ches_and_length_normalised_ches():
    rng = random.Random(0)
    h_w = [[rng.uniform(-1, 1) for _ in range(3)] for _ in range(4)]
    h_l = [[rng.uniform(-1, 1) for _ in range(3)] for _ in range(4)]
    n_w, n_l = [2, 5, 1, 3], [4, 1, 2, 3]
    expected, expected_normalised = [], []
    for a, b, m, n in zip(h_w, h_l, n_w, n_l):
        dot = sum(x * y for x, y in zip(a, b))
        square = sum(x * x for x in a)
        expected.append(dot - square)
        expected_normalised.append(dot / (m * n) - square / m**2)
    scores, normalised = D.ches(t(h_w), t(h_l), t(n_w), t(n_l))
    assert scores.tolist() == pytest.approx(expected)
    assert normalised.tolist() == pytest.approx(expected_normalised)


def test_topk_entropy_renormalises_the_top_k_and_mass_sums_them():
    logits = [[2.0, 1.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    k = 2
    entropies, masses = [], []
    for row in logits:
        z = sum(math.exp(x) for x in row)
        top = sorted((math.exp(x) / z for x in row), reverse=True)[:k]
        mass = sum(top)
        entropies.append(-sum(p / mass * math.log(p / mass) for p in top))
        masses.append(mass)
    entropy, mass = D.topk_entropy_and_mass(torch.tensor(logits), k)
    assert entropy.tolist() == pytest.approx(entropies, abs=1e-6)
    assert mass.tolist() == pytest.approx(masses, abs=1e-6)
    assert entropy[1].item() == pytest.approx(math.log(2))  # uniform: H_k = log k, M_k = k / V
    assert mass[1].item() == pytest.approx(2 / 5)


def test_kl_length_statistics_correlation_and_win_rate():
    policy, reference = [-3.0, -5.0, -2.0], [-4.0, -4.0, -4.5]
    assert D.sampled_kl(t(policy), t(reference)) == pytest.approx((1.0 - 1.0 + 2.5) / 3)
    lengths = [2.0, 4.0, 9.0]
    mean = sum(lengths) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in lengths) / 3)
    assert D.length_stats(t(lengths)) == pytest.approx(
        {"mean": mean, "std": std, "min": 2.0, "max": 9.0})
    rewards = [0.1, -0.3, 0.7]
    mr = sum(rewards) / 3
    cov = sum((x - mean) * (y - mr) for x, y in zip(lengths, rewards))
    spread = sum((x - mean) ** 2 for x in lengths) * sum((y - mr) ** 2 for y in rewards)
    corr = cov / math.sqrt(spread)
    assert D.pearson(t(lengths), t(rewards)) == pytest.approx(corr)
    assert D.pearson(t([3.0, 3.0]), t([1.0, 2.0])) is None
    # win, tie, tie, loss
    assert D.win_rate(t([1.0, 0.0, 1.0, 0.5]), t([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.5)


def test_highest_positions_picks_the_rounded_top_fraction():
    assert D.highest_positions(t([3.0, 1.0, 5.0, 2.0]), 0.5) == {0, 2}
    assert D.highest_positions(t([3.0, 1.0, 5.0, 2.0]), 0.1) == set()


def test_cheap_signals_from_sequence_stats():
    policy = SequenceStats(t(POLICY), t(COUNTS))
    reference = SequenceStats(t(REFERENCE), t(COUNTS))
    signals = D.cheap_signals(policy, reference, BETA)
    assert signals == pytest.approx({
        "rewards/accuracy": 0.25, "rewards/margin": -0.125,
        "ranking/summed": 0.5, "ranking/normalised": 0.25,
        "displacement/chosen": (0.5 - 1.0 + 0.0 - 1.0) / 4,
        "displacement/rejected": (-0.5 + 1.0 + 0.0 - 1.0) / 4,
        "displacement/chosen_fell": 0.5,
    })


@pytest.fixture(scope="module")
def tiny():
    tokenizer = char_tokenizer()
    return tiny_llama(vocab_size=len(tokenizer), seed=3), tokenizer


def _examples(tokenizer, tail: str = ""):
    pairs = [("Q: 2+2?\nA:", " 4", " five or so"), ("Say yes.", " yes", " no"),
             ("A longer prompt here:", " ok then", " ?")]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    return [TokenizedExample(encode(p), [encode(w + tail) + [eos], encode(l + tail) + [eos]],
                             index=i) for i, (p, w, l) in enumerate(pairs)]


# short responses are scored with prefix sharing, long ones in the padded layout
@pytest.mark.parametrize("tail, layout", [("", "prefix_shared"),
                                          (", said the long answer", "padded")])
def test_ches_hidden_sums_logps_and_topk_match_a_plain_transformers_forward(tiny, tail, layout):
    model, tokenizer = tiny
    examples = _examples(tokenizer, tail)
    assert choose_layout(examples) == layout
    scores = score_responses(model, examples, tokenizer.pad_token_id, batch_size=2,
                             hidden_sums=True, top_k=3)
    entropies, masses = [], []
    for e, example in enumerate(examples):
        sums = []
        for r, response in enumerate(example.response_ids):
            ids = torch.tensor([example.prompt_ids + response])
            with torch.no_grad():
                out = model(ids, output_hidden_states=True)
            start = len(example.prompt_ids) - 1  # the last prompt token predicts token 1
            positions = range(start, start + len(response))
            hidden = out.hidden_states[-1][0]
            sums.append(sum(hidden[p].double() for p in positions))
            logps = torch.log_softmax(out.logits[0].double(), -1)
            logp = sum(logps[p, token].item() for p, token in zip(positions, response))
            assert scores.logps[e, r].item() == pytest.approx(logp, abs=1e-4)
            assert scores.token_counts[e, r].item() == len(response)
            assert scores.hidden_sums[e, r].double().tolist() == pytest.approx(
                sums[r].tolist(), abs=1e-4)
            for p in positions:
                top = sorted(logps[p].exp().tolist(), reverse=True)[:3]
                entropies.append(-sum(q / sum(top) * math.log(q / sum(top)) for q in top))
                masses.append(sum(top))
        h_w, h_l = sums[0].tolist(), sums[1].tolist()
        dot, square = sum(a * b for a, b in zip(h_w, h_l)), sum(a * a for a in h_w)
        ches, _ = D.ches(scores.hidden_sums[e, :1], scores.hidden_sums[e, 1:],
                         scores.token_counts[e, :1], scores.token_counts[e, 1:])
        assert ches.item() == pytest.approx(dot - square, rel=1e-4, abs=1e-3)
    assert sorted(scores.topk_entropy.tolist()) == pytest.approx(sorted(entropies), abs=1e-4)
    assert sorted(scores.topk_mass.tolist()) == pytest.approx(sorted(masses), abs=1e-4)
