"""WPO and LD-DPO (per-token objectives) against plain-Python computations of their formulas."""

import math

import pytest
import torch
from objective_cases import finite_difference, log_sigmoid, token_inputs

from preftune.model.forward import SequenceStats
from preftune.objectives import ObjectiveInputs, get_objective
from preftune.objectives.pairwise import DPOParams
from preftune.objectives.token_weighted import LDDPOParams, WPOParams

# (policy chosen, policy rejected, reference chosen, reference rejected) per-token log-probs
TOKEN_CASES = [
    ([-1.0, -2.0, -0.5], [-3.0, -1.0], [-1.5, -1.0, -1.0], [-2.0, -2.5]),
    ([-0.7], [-0.7], [-0.7], [-0.7]),  # equal logps, length-1 responses
    ([-0.1, -0.2], [-300.0, -300.0, -300.0], [-150.0, -150.0], [-100.0, -100.0, -100.0]),  # huge
    ([-300.0, -300.0, -300.0, -1.0], [-0.1], [-100.0] * 4, [-50.0]),  # very negative margin
    ([-2.0, -1.0], [-2.0, -1.0000001], [-1.0, -1.0], [-1.0, -1.0]),  # tiny margin, equal lengths
]


def dpo_term(h, beta):
    return -log_sigmoid(beta * h)


# --- WPO ---------------------------------------------------------------------------------------

def wpo_weight(case, log_sum_sq=None):
    """exp(mean_t log pi(y_t) [- log sum_v pi(v)^2]) for chosen times rejected, capped at 1."""
    weight = 1.0
    for slot in (0, 1):
        tokens = case[slot] if log_sum_sq is None else [
            t - s for t, s in zip(case[slot], log_sum_sq[slot])]
        weight *= math.exp(sum(tokens) / len(tokens))
    return min(weight, 1.0)


def wpo_formula(case, p, weight):
    pw, pl, rw, rl = case
    return weight * dpo_term((sum(pw) - sum(rw)) - (sum(pl) - sum(rl)), p.beta)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_wpo_matches_formula(beta):
    params = WPOParams(beta, alignment="none")
    inputs, _ = token_inputs(TOKEN_CASES, dtype=torch.float32)
    out = get_objective("wpo")(inputs, params)
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.rewards).all()
    for i, case in enumerate(TOKEN_CASES):
        expected = wpo_formula(case, params, wpo_weight(case))
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6), i


def half_log_probs(case):
    return [[0.5 * t for t in case[0]], [0.5 * t for t in case[1]]]


def with_log_sum_sq(inputs, per_case):
    grid = torch.zeros_like(inputs.policy.token_logps)
    for i, (chosen, rejected) in enumerate(per_case):
        grid[i, 0, : len(chosen)] = torch.tensor(chosen, dtype=grid.dtype)
        grid[i, 1, : len(rejected)] = torch.tensor(rejected, dtype=grid.dtype)
    inputs.policy.token_log_sum_sq_probs = grid
    return inputs


def test_wpo_sampled_alignment_matches_formula_and_caps_weights_at_one():
    params = WPOParams(0.1, "sampled")
    cases = TOKEN_CASES[:2]
    log_sum_sq = [half_log_probs(cases[0]), [[-1.0], [-1.0]]]  # case 1: aligned weight e^0.6 > 1
    inputs = with_log_sum_sq(token_inputs(cases, dtype=torch.float32)[0], log_sum_sq)
    out = get_objective("wpo")(inputs, params)
    for i, case in enumerate(cases):
        expected = wpo_formula(case, params, wpo_weight(case, log_sum_sq[i]))
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert wpo_weight(cases[1], log_sum_sq[1]) == 1.0


@pytest.mark.parametrize("alignment", ["none", "sampled"])
def test_wpo_gradient_holds_the_weight_constant(alignment):
    params = WPOParams(0.5, alignment)
    case = TOKEN_CASES[0]
    inputs, grid = token_inputs([case], requires_grad=True)
    log_sum_sq = half_log_probs(case) if alignment == "sampled" else None
    if log_sum_sq:
        with_log_sum_sq(inputs, [log_sum_sq])
    get_objective("wpo")(inputs, params).losses.sum().backward()
    weight = wpo_weight(case, log_sum_sq)  # detached in WPO: no gradient through the weight
    assert_token_gradients(grid, case, lambda c: wpo_formula(c, params, weight))


def test_wpo_sampled_alignment_says_what_is_missing():
    inputs, _ = token_inputs(TOKEN_CASES[:1])
    with pytest.raises(ValueError, match="token_log_sum_sq_probs"):
        get_objective("wpo")(inputs, WPOParams(alignment="sampled"))


# --- LD-DPO ------------------------------------------------------------------------------------

def ld_dpo_formula(case, p):
    pw, pl, rw, rl = case
    shared = min(len(pw), len(pl))

    def desensitized(tokens):
        return sum(tokens[:shared]) + p.alpha * sum(tokens[shared:])

    h = (desensitized(pw) - desensitized(rw)) - (desensitized(pl) - desensitized(rl))
    return dpo_term(h, p.beta)


@pytest.mark.parametrize("params", [LDDPOParams(), LDDPOParams(0.1, 0.0), LDDPOParams(0.5, 1.0)])
def test_ld_dpo_matches_formula(params):
    inputs, _ = token_inputs(TOKEN_CASES, dtype=torch.float32)
    out = get_objective("ld_dpo")(inputs, params)
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.rewards).all()
    for i, case in enumerate(TOKEN_CASES):
        assert out.losses[i].item() == pytest.approx(ld_dpo_formula(case, params), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("case", [TOKEN_CASES[0], TOKEN_CASES[3]])
def test_ld_dpo_gradient(case):
    params = LDDPOParams(0.1, 0.3)
    inputs, grid = token_inputs([case], requires_grad=True)
    get_objective("ld_dpo")(inputs, params).losses.sum().backward()
    assert_token_gradients(grid, case, lambda c: ld_dpo_formula(c, params))


def test_ld_dpo_with_alpha_one_is_dpo():
    inputs, _ = token_inputs(TOKEN_CASES, dtype=torch.float32)
    ld = get_objective("ld_dpo")(inputs, LDDPOParams(0.1, 1.0)).losses
    assert torch.allclose(ld, get_objective("dpo")(inputs, DPOParams(0.1)).losses)


def test_token_objectives_refuse_stats_without_token_logps():
    stats = SequenceStats(torch.tensor([[-1.0, -2.0]]), torch.tensor([[1.0, 1.0]]))
    for name, params in (("wpo", WPOParams()), ("ld_dpo", LDDPOParams())):
        with pytest.raises(ValueError, match="per-token"):
            get_objective(name)(ObjectiveInputs(stats, stats), params)


def assert_token_gradients(grid, case, formula):
    """autograd d loss / d policy token log-prob vs finite differences of the plain formula."""
    chosen, rejected = len(case[0]), len(case[1])
    flat = list(case[0]) + list(case[1])

    def loss(values):
        return formula((values[:chosen], values[chosen:], case[2], case[3]))

    for index in range(chosen + rejected):
        slot, t = (0, index) if index < chosen else (1, index - chosen)
        expected = finite_difference(loss, flat, index)
        assert grid.grad[0, slot, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-8), (slot, t)


@pytest.mark.parametrize("layout", ["padded", "prefix_shared"])
def test_wpo_through_the_training_forward_equals_trls_weighting_on_whole_sequences(layout):
    """The loop's forward gives wpo the alignment term (log sum_v pi(v)^2 per response token)
    it declares for alignment='sampled', its default; the loss equals TRL 1.16's use_weighting
    (no clamp needed here: weights < 1) computed from each whole sequence's own logits."""
    from preftune.config import ObjectiveConfig
    from preftune.data.layout import collate
    from preftune.data.tokenize import TokenizedExample
    from preftune.model.forward import LogpModel, sequence_stats
    from preftune.objectives.compose import Objective
    from preftune.train.loop import objective_inputs
    from tiny_models import tiny_llama

    policy, reference = tiny_llama(seed=1), tiny_llama(seed=2)
    examples = [TokenizedExample(prompt_ids=[1, 5, 6, 7], response_ids=[[8, 9, 2], [10, 2]],
                                 index=0),
                TokenizedExample(prompt_ids=[1, 11], response_ids=[[12, 13, 14, 2], [15, 2]],
                                 index=1)]
    batch = collate(examples, pad_token_id=0, layout=layout)

    class Reference:
        def stats(self, batch):
            with torch.no_grad():
                return sequence_stats(LogpModel(reference)(batch), batch, per_token=True)

    objective = Objective.from_config([ObjectiveConfig(name="wpo")], total_steps=1)
    assert objective.policy_collisions  # the default alignment asks for them
    inputs, _ = objective_inputs(LogpModel(policy, chunk_tokens=3), Reference(), [], batch,
                                 objective, 0)
    losses = objective(inputs)[0].losses

    def whole(model, prompt, response):  # token log-probs and log sum_v pi^2, plain forward
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].double(), -1)
        targets = torch.tensor(response)
        return log_probs[torch.arange(len(response)), targets], torch.log(
            (log_probs.exp() ** 2).sum(-1))

    for example, loss in zip(examples, losses):
        logits, log_weight = [], 0.0
        for response in example.response_ids:
            token_logps, collision = whole(policy, example.prompt_ids, response)
            reference_logps, _ = whole(reference, example.prompt_ids, response)
            logits.append(token_logps.sum() - reference_logps.sum())
            log_weight += (token_logps - collision).mean()
        weight = torch.exp(log_weight)
        assert weight < 1
        expected = weight * -torch.nn.functional.logsigmoid(0.1 * (logits[0] - logits[1]))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
