"""preftune objectives against TRL 1.16's own loss code, via the recorded fixture (no trl import).

The fixture is written by ``python benchmarks/trl_loss_fixture.py`` (see its docstring); each entry
names the TRL configuration and the preftune objective + params it maps to.
"""

import json
from pathlib import Path

import pytest
import torch
from pydantic import TypeAdapter

from preftune.model.forward import SequenceStats
from preftune.objectives import ObjectiveInputs, get_objective

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "trl_dpo_losses.json").read_text())
TOLERANCE = dict(rel=1e-6, abs=1e-6)


def token_stats(chosen: list[list[float]], rejected: list[list[float]], requires_grad=False):
    """SequenceStats with token grids [E, 2, L] and logps summed from them (grads reach tokens)."""
    rows = [[c, r] for c, r in zip(chosen, rejected)]
    width = max(len(t) for pair in rows for t in pair)
    grid = torch.zeros(len(rows), 2, width)
    mask = torch.zeros(len(rows), 2, width, dtype=torch.bool)
    for i, pair in enumerate(rows):
        for j, tokens in enumerate(pair):
            grid[i, j, : len(tokens)] = torch.tensor(tokens)
            mask[i, j, : len(tokens)] = True
    grid.requires_grad_(requires_grad)
    stats = SequenceStats(grid.sum(-1), mask.sum(-1).float(), grid, mask)
    return stats, grid


def preftune_inputs(entry, rows=None):
    data = FIXTURE["inputs"][entry["inputs"]]
    pick = lambda side: [data[side][i] for i in (rows or range(len(data[side])))]  # noqa: E731
    policy, grid = token_stats(pick("policy_chosen"), pick("policy_rejected"), requires_grad=True)
    reference, _ = token_stats(pick("reference_chosen"), pick("reference_rejected"))
    if not entry["zero_log_sum_sq"]:  # WPO's sampled alignment reads log sum_v pi(v)^2 per token
        log_sum_sq, _ = token_stats(pick("log_sum_sq_chosen"), pick("log_sum_sq_rejected"))
        policy.token_log_sum_sq_probs = log_sum_sq.token_logps
    return ObjectiveInputs(policy, reference), grid


def params_of(entry):
    spec = get_objective(entry["preftune"]["name"])
    return TypeAdapter(spec.params).validate_python(entry["preftune"]["params"])


def run(entry, inputs):
    return get_objective(entry["preftune"]["name"])(inputs, params_of(entry)).losses


def case_id(entry):
    trl = entry.get("trl", {})
    extras = ",".join(f"{k}={v}" for k, v in sorted(trl.items()) if k not in ("loss_type", "beta"))
    loss_types = "+".join(trl.get("loss_type", []))
    return f"{entry['preftune']['name']}[{loss_types}{',' + extras if extras else ''}]"


def test_fixture_was_made_by_trl_1_16():
    assert FIXTURE["trl_version"] == "1.16.0"
    assert FIXTURE["command"] == "python benchmarks/trl_loss_fixture.py"


@pytest.mark.parametrize("entry", FIXTURE["dpo_trainer"], ids=case_id)
def test_batch_loss_and_gradients_match_trl(entry):
    inputs, grid = preftune_inputs(entry)
    losses = run(entry, inputs)
    batch_loss = losses.mean() * entry["trl_over_preftune"]
    assert batch_loss.item() == pytest.approx(entry["batch_loss"], **TOLERANCE)
    batch_loss.backward()
    for slot, side in enumerate(("chosen", "rejected")):
        for i, expected in enumerate(entry["policy_token_grads"][side]):
            got = grid.grad[i, slot, : len(expected)].tolist()
            assert got == pytest.approx(expected, **TOLERANCE), (side, i)


@pytest.mark.parametrize("entry", [e for e in FIXTURE["dpo_trainer"] if not e["batch_coupled"]],
                         ids=case_id)
def test_per_example_losses_match_trl(entry):
    inputs, _ = preftune_inputs(entry)
    losses = run(entry, inputs) * entry["trl_over_preftune"]
    assert losses.tolist() == pytest.approx(entry["per_example_losses"], **TOLERANCE)


@pytest.mark.parametrize("entry", FIXTURE["cpo_orpo"], ids=lambda e: e["preftune"]["name"])
def test_cpo_orpo_preference_terms_match_trl(entry):
    data = FIXTURE["inputs"]["varied"]
    policy, _ = token_stats(data["policy_chosen"], data["policy_rejected"])
    losses = run(entry, ObjectiveInputs(policy))
    chosen_nll = -policy.logps[:, 0] / policy.token_counts[:, 0]
    name = entry["preftune"]["name"]
    if name == "cpo":
        got = losses - params_of(entry).alpha * chosen_nll
    elif name == "orpo":
        got = -(losses - chosen_nll)
    else:
        got = losses
    assert got.tolist() == pytest.approx(entry["per_example_losses"], **TOLERANCE)


def test_every_trl_dpo_loss_type_is_mapped_or_explained():
    trl_loss_types = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                      "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                      "sigmoid_norm"}
    mapped = {t for e in FIXTURE["dpo_trainer"] for t in e["trl"]["loss_type"]}
    assert trl_loss_types <= mapped
    assert {"forward_kl", "js_divergence", "alpha_divergence"} <= {
        e["trl"].get("f_divergence_type") for e in FIXTURE["dpo_trainer"]}
    assert any(e["trl"].get("use_weighting") for e in FIXTURE["dpo_trainer"])
    assert any(e["trl"].get("ld_alpha") is not None for e in FIXTURE["dpo_trainer"])
    assert FIXTURE["not_matched"]
