"""TDPO's per-token KL to the reference distribution and MRPO's several references.

The chunked KL is checked against full-vocabulary logits; the end-to-end test recomputes TDPO's
loss from plain transformers forwards of both models, for the padded and prefix-shared layouts.
"""

import math

import pytest
import torch
from objective_cases import finite_difference, log_sigmoid

from preftune.data.layout import collate
from preftune.data.tokenize import TokenizedExample
from preftune.model.chunked_logps import chunked_token_logps_and_kl
from preftune.model.forward import LogpModel, SequenceStats
from preftune.model.reference import LiveReference
from preftune.objectives import ObjectiveInputs, get_objective
from preftune.objectives.compose import Objective
from preftune.objectives.pairwise_extra import MRPOParams
from preftune.objectives.token_level import TDPOParams
from preftune.train.loop import objective_inputs
from tiny_models import tiny_llama


def test_chunked_kl_matches_full_logits_values_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(29, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    ref_hidden, ref_weight = torch.randn(29, 16), torch.randn(40, 16)
    targets = torch.randint(0, 40, (29,))
    up_logp, up_kl = torch.randn(29), torch.randn(29)

    logps, kl = chunked_token_logps_and_kl(hidden, weight, targets, ref_hidden, ref_weight, 8)
    ((logps * up_logp).sum() + (kl * up_kl).sum()).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    log_pi = torch.log_softmax(hidden @ weight.T, dim=-1)
    log_ref = torch.log_softmax(ref_hidden @ ref_weight.T, dim=-1)
    plain_kl = torch.stack([sum(math.exp(log_ref[i, v]) * (log_ref[i, v] - log_pi[i, v])
                                for v in range(40)) for i in range(29)])
    plain_logps = log_pi[torch.arange(29), targets]
    ((plain_logps * up_logp).sum() + (plain_kl * up_kl).sum()).backward()
    torch.testing.assert_close(logps, plain_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl, plain_kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=1e-5)
    assert (kl >= -1e-6).all()


# (policy w, policy l, reference w, reference l, D(y_w), D(y_l))
TDPO_CASES = [(-12.0, -15.0, -13.0, -14.0, 0.3, 0.9), (-5.0, -5.0, -5.0, -5.0, 0.0, 0.0),
              (-1.0, -900.0, -400.0, -400.0, 2.0, 50.0), (-900.0, -1.0, -400.0, -400.0, 40.0, 1.0)]


def tdpo_inputs(cases, dtype=torch.float32, requires_grad=False):
    policy = torch.tensor([c[:2] for c in cases], dtype=dtype, requires_grad=requires_grad)
    kl = torch.tensor([c[4:] for c in cases], dtype=dtype, requires_grad=requires_grad)
    counts = torch.ones_like(policy)
    ref = SequenceStats(torch.tensor([c[2:4] for c in cases], dtype=dtype), counts)
    return ObjectiveInputs(SequenceStats(policy, counts, kl=kl), ref), policy, kl


def tdpo_formula(case, p):
    pw, pl, rw, rl, dw, dl = case
    u = (pw - rw) - (pl - rl)
    delta = p.alpha * (dl - dw) if p.variant == "tdpo2" else dl - dw
    return -log_sigmoid(p.beta * (u - delta))


@pytest.mark.parametrize("params", [TDPOParams(), TDPOParams(variant="tdpo2"),
                                    TDPOParams(beta=1.0, alpha=0.2, variant="tdpo2")])
def test_tdpo_matches_formula(params):
    inputs, _, _ = tdpo_inputs(TDPO_CASES)
    out = get_objective("tdpo")(inputs, params)
    assert torch.isfinite(out.losses).all()
    for i, case in enumerate(TDPO_CASES):
        assert out.losses[i].item() == pytest.approx(tdpo_formula(case, params), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("params", [TDPOParams(beta=0.5), TDPOParams(beta=0.5, alpha=0.2,
                                                                     variant="tdpo2")])
def test_tdpo_reward_margin_is_the_loss_logit(params):
    """r(y) = beta (rho(y) + w D(y)), w = 1 (TDPO1) or alpha (TDPO2): the logged margin is the
    loss's logit, so accuracy says whether the loss ranks the chosen response first."""
    inputs, _, _ = tdpo_inputs(TDPO_CASES)
    out = get_objective("tdpo")(inputs, params)
    weight = params.alpha if params.variant == "tdpo2" else 1.0
    for i, (pw, pl, rw, rl, dw, dl) in enumerate(TDPO_CASES):
        expected = [params.beta * (pw - rw + weight * dw), params.beta * (pl - rl + weight * dl)]
        assert out.rewards[i].tolist() == pytest.approx(expected, rel=1e-5)
        logit = params.beta * ((pw - rw) - (pl - rl) - weight * (dl - dw))
        assert out.losses[i].item() == pytest.approx(-log_sigmoid(logit), rel=1e-5, abs=1e-6)
    # case 0: u = 2, and D(y_l) - D(y_w) = 0.6 comes off the margin (beta rho alone logs 2 beta)
    assert (out.rewards[0, 0] - out.rewards[0, 1]).item() == pytest.approx(
        params.beta * (2 - weight * 0.6), rel=1e-5)


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo_gradients_and_stop_gradient(variant):
    p = TDPOParams(beta=0.5, alpha=0.3, variant=variant) if variant == "tdpo2" else \
        TDPOParams(beta=0.5, variant=variant)  # (alpha weighs TDPO2's term only)
    inputs, policy, kl = tdpo_inputs(TDPO_CASES[:1], torch.float64, requires_grad=True)
    get_objective("tdpo")(inputs, p).losses.sum().backward()
    case = list(TDPO_CASES[0])
    for slot, grad in ((0, policy.grad[0, 0]), (1, policy.grad[0, 1]), (5, kl.grad[0, 1])):
        expected = finite_difference(lambda v: tdpo_formula(tuple(v), p), case, slot)
        assert grad.item() == pytest.approx(expected, rel=1e-5, abs=1e-9)
    chosen_kl_grad = finite_difference(lambda v: tdpo_formula(tuple(v), p), case, 4)
    assert kl.grad[0, 0].item() == pytest.approx(0.0 if variant == "tdpo2" else chosen_kl_grad)


def _examples():
    return [TokenizedExample([1, 5, 6, 7], [[8, 9, 2], [10, 2]], index=0),
            TokenizedExample([1, 11], [[12, 13, 14, 2], [15, 16, 2]], index=1),
            TokenizedExample([1, 20, 21, 22, 23], [[24, 2], [25, 26, 27, 2]], index=2)]


def _plain_tdpo_loss(policy, reference, beta):
    """Per example: full-vocabulary forwards of each [prompt | response] sequence on its own."""
    losses = []
    for example in _examples():
        rho, seq_kl = [], []
        for response in example.response_ids:
            ids = torch.tensor([example.prompt_ids + response])
            log_pi = torch.log_softmax(policy(ids).logits[0], dim=-1)
            with torch.no_grad():
                log_ref = torch.log_softmax(reference(ids).logits[0], dim=-1)
            start = len(example.prompt_ids) - 1
            rows = range(start, start + len(response))
            rho.append(sum(log_pi[t, tok] - log_ref[t, tok] for t, tok in zip(rows, response)))
            seq_kl.append(sum((log_ref[t].exp() * (log_ref[t] - log_pi[t])).sum() for t in rows))
        u = rho[0] - rho[1]
        losses.append(-torch.nn.functional.logsigmoid(beta * (u - (seq_kl[1] - seq_kl[0]))))
    return torch.stack(losses)


def assert_batch_path_matches_plain(name, beta, plain_loss, layout, per_token):
    """objective_inputs -> objective on a collated batch equals ``plain_loss`` (full-vocabulary
    forwards of each sequence on its own), in value and in every policy gradient."""
    reference, policy = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():  # move the policy away from the reference
        for param in policy.parameters():
            param.add_(0.05 * torch.randn_like(param))
    expected = plain_loss(policy, reference, beta)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()

    objective = Objective.from_config([_Cfg(name, {"beta": beta})], total_steps=1)
    batch = collate(_examples(), pad_token_id=0, layout=layout, max_row_tokens=40)
    inputs, _ = objective_inputs(LogpModel(policy, chunk_tokens=3),
                                 LiveReference(reference, chunk_tokens=3, per_token=per_token),
                                 [], batch, objective, step=0)
    losses = objective(inputs)[0].losses
    losses.sum().backward()
    torch.testing.assert_close(losses, expected.detach(), atol=1e-5, rtol=1e-5)
    for got, want in zip((p.grad for p in policy.parameters()), expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    return inputs


@pytest.mark.parametrize("layout", ["padded", "prefix_shared", "packed"])
def test_tdpo_through_the_batch_path_matches_plain_forwards(layout):
    assert_batch_path_matches_plain("tdpo", 0.5, _plain_tdpo_loss, layout, per_token=False)


class _Cfg:
    """The two attributes Objective.from_config reads from a config entry."""

    def __init__(self, name, params):
        self.name, self.model_extra, self.weight = name, params, 1.0


# --- MRPO ----------------------------------------------------------------------------------------


def test_mrpo_matches_formula_with_weights_and_defaults():
    policy = torch.tensor([[-12.0, -15.0], [-1.0, -900.0]])
    refs = [torch.tensor([[-13.0, -14.0], [-400.0, -400.0]]),
            torch.tensor([[-11.0, -16.0], [-2.0, -500.0]]),
            torch.tensor([[-10.0, -19.0], [-300.0, -1.0]])]
    counts = torch.ones(2, 2)
    inputs = ObjectiveInputs(SequenceStats(policy, counts), SequenceStats(refs[0], counts),
                             extra_references=[SequenceStats(r, counts) for r in refs[1:]])
    for weights in (None, [0.5, 0.3, 0.2], [1.0, 0.0, 0.0]):
        p = MRPOParams(beta=0.2, weights=weights)
        out = get_objective("mrpo")(inputs, p)
        alphas = weights or [1 / 3] * 3
        for i in range(2):
            combined = [sum(a * float(r[i, s]) for a, r in zip(alphas, refs)) for s in (0, 1)]
            z = 0.2 * ((float(policy[i, 0]) - combined[0]) - (float(policy[i, 1]) - combined[1]))
            assert out.losses[i].item() == pytest.approx(-log_sigmoid(z), rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="one weight per reference"):
        get_objective("mrpo")(inputs, MRPOParams(weights=[0.5, 0.5]))
    with pytest.raises(ValueError, match="sum to 1"):
        MRPOParams(weights=[0.5, 0.6])


# --- SparsePO ------------------------------------------------------------------------------------


def _plain_sparse_po_loss(policy, reference, beta):
    """Full forwards per sequence; the mask from every layer's output, rescaled per response."""
    losses = []
    for example in _examples():
        u, k = [], []
        for response in example.response_ids:
            ids = torch.tensor([example.prompt_ids + response])
            log_pi = torch.log_softmax(policy(ids).logits[0], dim=-1)
            with torch.no_grad():
                out = reference(ids, output_hidden_states=True)
                log_ref = torch.log_softmax(out.logits[0], dim=-1)
            start = len(example.prompt_ids) - 1
            rows = list(range(start, start + len(response)))
            per_layer = []
            for layer in out.hidden_states[1:]:
                values = [layer[0, t].mean().item() for t in rows]
                low, high = min(values), max(values)
                per_layer.append([(v - low) / (high - low) if high > low else 1.0 for v in values])
            mask = [sum(layer[i] for layer in per_layer) / len(per_layer) for i in range(len(rows))]
            u.append(sum(m * (log_pi[t, tok] - log_ref[t, tok])
                         for m, t, tok in zip(mask, rows, response)))
            k.append(sum(m * (log_ref[t].exp() * (log_ref[t] - log_pi[t])).sum()
                         for m, t in zip(mask, rows)))
        logits = (u[0] - u[1]) - (k[1] - k[0])
        losses.append(-torch.nn.functional.logsigmoid(beta * logits))
    return torch.stack(losses)


@pytest.mark.parametrize("layout", ["padded", "prefix_shared"])
def test_sparse_po_through_the_batch_path_matches_plain_forwards(layout):
    inputs = assert_batch_path_matches_plain("sparse_po", 0.8, _plain_sparse_po_loss, layout,
                                             per_token=True)
    mask = inputs.reference.token_activation[inputs.policy.token_mask]
    assert ((mask >= 0) & (mask <= 1)).all() and (mask < 1).any()


def test_sparse_po_with_a_uniform_mask_is_tdpo1():
    """All weights 1: U and K are the summed log-ratio and sequence KL, i.e. TDPO1."""
    torch.manual_seed(3)
    token_logps, ref_logps = -torch.rand(2, 2, 4) * 3, -torch.rand(2, 2, 4) * 3
    token_kl, mask = torch.rand(2, 2, 4), torch.ones(2, 2, 4, dtype=torch.bool)
    counts = torch.full((2, 2), 4.0)
    policy = SequenceStats(token_logps.sum(-1), counts, token_logps, mask, token_kl.sum(-1), token_kl)
    reference = SequenceStats(ref_logps.sum(-1), counts, ref_logps, mask,
                              token_activation=torch.ones(2, 2, 4))
    inputs = ObjectiveInputs(policy, reference)
    sparse = get_objective("sparse_po")(inputs, get_objective("sparse_po").params(beta=0.3))
    tdpo = get_objective("tdpo")(inputs, TDPOParams(beta=0.3))
    torch.testing.assert_close(sparse.losses, tdpo.losses)
    half = SequenceStats(ref_logps.sum(-1), counts, ref_logps, mask,
                         token_activation=torch.full((2, 2, 4), 0.5))
    halved = get_objective("sparse_po")(ObjectiveInputs(policy, half),
                                        get_objective("sparse_po").params(beta=0.6))
    torch.testing.assert_close(halved.losses, tdpo.losses)  # 0.5 weights = half beta
    torch.testing.assert_close(sparse.rewards, tdpo.rewards)  # and the same implied rewards


def test_sparse_po_reward_margin_is_the_loss_logit():
    """One token per response: U = m rho, K = m KL; r(y) = beta (U + K), so the logged margin
    beta [(U_w + K_w) - (U_l + K_l)] is the loss's logit. Here the chosen token's log-ratio is
    only 0.1 above the rejected one's but its KL is 0.5 higher: the loss ranks it first
    (logit +0.06 at beta 0.1), and so must the logged accuracy."""
    token_logps = torch.tensor([[[-1.0], [-1.1]]])
    ref_logps = torch.tensor([[[-1.0], [-1.0]]])
    token_kl, mask = torch.tensor([[[0.5], [0.0]]]), torch.ones(1, 2, 1, dtype=torch.bool)
    counts = torch.ones(1, 2)
    policy = SequenceStats(token_logps.sum(-1), counts, token_logps, mask, token_kl.sum(-1),
                           token_kl)
    reference = SequenceStats(ref_logps.sum(-1), counts, ref_logps, mask,
                              token_activation=torch.full((1, 2, 1), 0.5))
    spec = get_objective("sparse_po")
    out = spec(ObjectiveInputs(policy, reference), spec.params(beta=0.1))
    assert out.rewards[0].tolist() == pytest.approx([0.1 * 0.5 * (0.0 + 0.5),
                                                     0.1 * 0.5 * (-0.1 + 0.0)])
    logit = 0.1 * 0.5 * ((0.0 - -0.1) - (0.0 - 0.5))
    assert out.losses.item() == pytest.approx(-log_sigmoid(logit))
