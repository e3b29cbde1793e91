"""Framework metrics per data shape, against hand computations."""

import pytest
import torch

from preftune.data.prepare import with_mismatched_completions
from preftune.data.tokenize import TokenizedExample
from preftune.model.forward import SequenceStats
from preftune.objectives import ObjectiveInputs, ObjectiveOutput
from preftune.objectives.metrics import metric_sums


def stats(logps):
    logps = torch.tensor(logps)
    return SequenceStats(logps, torch.ones_like(logps))


def test_pair_metrics():
    inputs = ObjectiveInputs(stats([[-1.0, -2.0], [-3.0, -1.0]]), stats([[-1.5, -1.5], [-2.0, -2.0]]))
    out = ObjectiveOutput(torch.tensor([0.5, 1.5]), torch.tensor([[0.3, -0.1], [0.0, 0.2]]))
    m = metric_sums("pairs", inputs, out)
    assert m["loss"] == (2.0, 2)
    assert m["rewards/chosen"] == pytest.approx((0.3, 2))
    assert m["rewards/margins"] == pytest.approx((0.4 - 0.2, 2))
    assert m["rewards/accuracies"] == (1.0, 2)
    assert m["logps/rejected"] == (-3.0, 2)
    assert m["logps/ref_chosen"] == (-3.5, 2)


def test_unpaired_metrics_split_by_label():
    inputs = ObjectiveInputs(stats([[-1.0], [-2.0], [-4.0]]), scores={"label": torch.tensor([1.0, 0.0, 1.0])})
    out = ObjectiveOutput(torch.zeros(3), torch.tensor([[0.5], [-1.0], [0.25]]))
    m = metric_sums("unpaired", inputs, out)
    assert m["rewards/desirable"] == pytest.approx((0.75, 2))
    assert m["rewards/undesirable"] == pytest.approx((-1.0, 1))
    assert m["logps/desirable"] == pytest.approx((-5.0, 2))


def test_ranked_metrics_count_ordered_pairs_and_skip_ties():
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 5.0]])
    rewards = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.4, 0.3]])
    inputs = ObjectiveInputs(stats([[0.0] * 3] * 2), scores={"response_scores": scores})
    m = metric_sums("ranked", inputs, ObjectiveOutput(torch.zeros(2), rewards))
    # list 0: 3 ordered pairs, all agree; list 1: 2 ordered pairs (the tie is skipped),
    # 0.3 > 0.2 agrees and 0.3 > 0.4 does not
    assert m["rewards/accuracies"] == (4.0, 5.0)
    assert m["rewards/top1_accuracy"] == (1.0, 2)
    assert m["rewards/margins"] == pytest.approx((0.9 - 0.1 + 0.3 - 0.2, 2))
    # a list scored all alike has no best: it counts in no top-1, best, worst or margin (its
    # top-1 scored 1.0, every item being "best"); its pairs are all ties, so none either
    scores = torch.tensor([[3.0, 1.0, 2.0], [4.0, 4.0, 4.0]])
    inputs = ObjectiveInputs(stats([[0.0] * 3] * 2), scores={"response_scores": scores})
    m = metric_sums("ranked", inputs, ObjectiveOutput(torch.zeros(2), rewards))
    assert [float(v) for v in m["rewards/top1_accuracy"]] == [1.0, 1]
    assert [float(v) for v in m["rewards/margins"]] == pytest.approx([0.9 - 0.1, 1])
    assert [float(v) for v in m["rewards/best"]] == pytest.approx([0.9, 1])
    assert [float(v) for v in m["rewards/accuracies"]] == [3.0, 3.0]


def test_top1_accuracy_shares_a_tie_for_the_highest_reward_whatever_the_order():
    from preftune.objectives.metrics import top1_hits

    tied = torch.zeros(1, 3)  # step 1: the policy is the reference
    best_first, best_last = torch.tensor([[1.0, 0.5, 0.0]]), torch.tensor([[0.0, 0.5, 1.0]])
    assert top1_hits(tied, best_first).tolist() == pytest.approx([1 / 3])
    assert top1_hits(tied, best_last).tolist() == pytest.approx([1 / 3])
    # two of three tie for the top reward, one of them best-scored; a padded slot is no item
    rewards, scores = torch.tensor([[0.7, 0.7, 0.1, 0.0]]), torch.tensor([[2.0, 1.0, 0.0, 9.0]])
    present = torch.tensor([[True, True, True, False]])
    assert top1_hits(rewards, scores, present).tolist() == [0.5]


def test_mismatched_completions_pair_each_prompt_with_the_next_completion():
    examples = [TokenizedExample([1, 2], [[10 + i, 2]], index=i) for i in range(3)]
    paired = with_mismatched_completions(examples, max_length=3)
    assert [ex.response_ids for ex in paired] == [[[10, 2], [11]], [[11, 2], [12]], [[12, 2], [10]]]
    assert all(ex.prompt_ids == [1, 2] for ex in paired)
