"""Compute TRL 1.16's preference losses on fixed inputs and write tests/fixtures/trl_dpo_losses.json.

    pip install -e ".[bench]"            # trl==1.16.0, a benchmark-only extra
    python benchmarks/trl_loss_fixture.py

TRL's own loss code runs, not a copy: ``DPOTrainer._compute_loss`` is called unbound on a stub
``self`` that carries the attributes DPOTrainer.__init__ derives from a real ``DPOConfig``, with
stub policy/reference "models" that return fixed per-token log-probs (zeros at non-completion
positions, as TRL's fused LM head returns them). The reference goes through TRL's live-reference
branch, so ld_alpha weighting is applied by TRL to both models. ``CPOTrainer.cpo_loss`` and
``ORPOTrainer.odds_ratio_loss`` are plain tensor functions and are called unbound the same way.

Each DPOTrainer entry records the batch-mean loss, TRL's gradient of it w.r.t. every policy token
log-prob, and (unless the loss couples the batch) per-example losses from one-example batches.
tests/test_trl_parity.py (which does not import trl) checks the mapped preftune objective
against these numbers. Mapped entries must match to 1e-6; the differences that are conventions,
not bugs, are listed under "not_matched" and in the objectives' docstrings.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import trl  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "trl_dpo_losses.json"
COMMAND = "python benchmarks/trl_loss_fixture.py"
SIDES = ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected")


def make_inputs(seed: int, chosen_lengths: list[int], rejected_lengths: list[int],
                same_as_reference: int) -> dict:
    """Per-token log-probs per response, rounded so the JSON holds the exact float32 inputs.

    The reference moves each token by up to +-1.5 nats (margins of several nats), except example
    ``same_as_reference``, where policy and reference agree (h = 0).
    """
    generator = torch.Generator().manual_seed(seed)

    def tokens(length):
        return [round(-0.01 - 3.99 * float(u), 3) for u in torch.rand(length, generator=generator)]

    def near(values):
        return [round(min(v + 3.0 * (float(u) - 0.5), -0.001), 3)
                for v, u in zip(values, torch.rand(len(values), generator=generator))]

    data = {"policy_chosen": [tokens(n) for n in chosen_lengths],
            "policy_rejected": [tokens(n) for n in rejected_lengths]}
    data["reference_chosen"] = [near(t) for t in data["policy_chosen"]]
    data["reference_rejected"] = [near(t) for t in data["policy_rejected"]]
    for side in ("chosen", "rejected"):
        data[f"reference_{side}"][same_as_reference] = list(data[f"policy_{side}"][same_as_reference])
    # WPO's sampled alignment divides by sum_v pi(v)^2 >= pi(y_t)^2; 0.5 * log pi(y_t) respects that.
    data["log_sum_sq_chosen"] = [[round(0.5 * v, 4) for v in t] for t in data["policy_chosen"]]
    data["log_sum_sq_rejected"] = [[round(0.5 * v, 4) for v in t] for t in data["policy_rejected"]]
    return data


INPUTS = {
    "varied": make_inputs(0, [3, 1, 5, 2, 7, 4], [2, 1, 6, 5, 3, 4], same_as_reference=1),
    "equal_chosen": make_inputs(1, [4, 4, 4, 4, 4], [2, 6, 1, 4, 3], same_as_reference=3),
}


def grid(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


class StubModel(torch.nn.Module):
    """Stands in for the model: returns the fixed per-token log-probs TRL's fused head would give."""

    is_gradient_checkpointing = False

    def __init__(self, log_probs: torch.Tensor, log_sum_sq_probs: torch.Tensor):
        super().__init__()
        self.log_probs, self.log_sum_sq_probs = log_probs, log_sum_sq_probs

    def forward(self, **kwargs):
        zeros = torch.zeros_like(self.log_probs)
        return SimpleNamespace(log_probs=self.log_probs, log_sum_sq_probs=self.log_sum_sq_probs,
                               entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trainer_stub(args: DPOConfig, policy: StubModel, reference: StubModel) -> SimpleNamespace:
    """The attributes DPOTrainer.__init__ sets from its config (trl/trainer/dpo_trainer.py)."""
    return SimpleNamespace(
        model=policy, ref_model=reference, args=args, aux_loss_enabled=False,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t,
                                    gather_for_metrics=lambda t: t),
        beta=args.beta, precompute_ref_logps=False, loss_types=args.loss_type,
        loss_weights=args.loss_weights or [1.0] * len(args.loss_type), ld_alpha=args.ld_alpha,
        f_divergence_type=args.f_divergence_type,
        f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        label_smoothing=args.label_smoothing, use_weighting=args.use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )


def dpo_trainer_loss(config: dict, data: dict, rows: list[int], zero_log_sum_sq: bool):
    """TRL's batch loss on examples ``rows`` and its gradient per policy token log-prob."""
    pick = lambda side: [data[side][i] for i in rows]  # noqa: E731
    chosen_lengths = [len(t) for t in pick("policy_chosen")]
    lengths = chosen_lengths + [len(t) for t in pick("policy_rejected")]
    width = max(lengths)
    # Row layout: [chosen..., rejected...]; one prompt token, then the completion.
    completion_mask = torch.zeros(len(lengths), width + 1, dtype=torch.long)
    for i, n in enumerate(lengths):
        completion_mask[i, 1 : 1 + n] = 1
    attention_mask = completion_mask.clone()
    attention_mask[:, 0] = 1
    policy_logps = grid(pick("policy_chosen") + pick("policy_rejected"), width).requires_grad_()
    reference_logps = grid(pick("reference_chosen") + pick("reference_rejected"), width)
    log_sum_sq = grid(pick("log_sum_sq_chosen") + pick("log_sum_sq_rejected"), width)
    if zero_log_sum_sq:
        log_sum_sq = torch.zeros_like(log_sum_sq)
    with tempfile.TemporaryDirectory() as output_dir:
        args = DPOConfig(output_dir=output_dir, report_to="none", use_cpu=True, bf16=False, **config)
    policy, reference = StubModel(policy_logps, log_sum_sq), StubModel(reference_logps, log_sum_sq)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": attention_mask,
              "completion_mask": completion_mask}
    loss = DPOTrainer._compute_loss(trainer_stub(args, policy, reference), policy, inputs, False)
    loss.backward()
    grads = [policy_logps.grad[i, :n].tolist() for i, n in enumerate(lengths)]
    half = len(rows)
    return loss.item(), {"chosen": grads[:half], "rejected": grads[half:]}


# (TRL DPOConfig overrides, input set, preftune objective, TRL loss / preftune loss, batch-coupled,
#  WPO log-sum-sq zeroed, note)
DPO_CASES = [
    ({"loss_type": ["sigmoid"], "beta": 0.1}, "varied", ("dpo", {"beta": 0.1}), 1.0, False, True, ""),
    ({"loss_type": ["hinge"], "beta": 0.5}, "varied", ("hinge", {"beta": 0.5}), 1.0, False, True, ""),
    ({"loss_type": ["ipo"], "beta": 0.1}, "varied",
     ("ipo", {"beta": 0.1, "normalize_length": True}), 1.0, False, True, ""),
    ({"loss_type": ["exo_pair"], "beta": 0.1, "label_smoothing": 1e-3}, "varied",
     ("exo_pair", {"beta": 0.1, "epsilon": 1e-3}), 1.0, False, True, ""),
    ({"loss_type": ["nca_pair"], "beta": 0.1}, "varied",
     ("nca_pair", {"beta": 0.1}), 1.0, False, True, ""),
    ({"loss_type": ["robust"], "beta": 0.1, "label_smoothing": 0.1}, "varied",
     ("robust_dpo", {"beta": 0.1, "epsilon": 0.1}), 1.0, False, True, ""),
    ({"loss_type": ["bco_pair"], "beta": 0.1}, "varied",
     ("bco_pair", {"beta": 0.1}), 1.0, False, True, ""),
    ({"loss_type": ["sppo_hard"], "beta": 0.1}, "varied",
     ("sppo_hard", {"beta": 0.1}), 2.0, False, True,
     "TRL sums the two squares; preftune (like uclaml/SPPO) averages them, so TRL = 2 x preftune"),
    ({"loss_type": ["aot"], "beta": 0.1}, "varied", ("aot_pair", {"beta": 0.1}), 1.0, True, True, ""),
    ({"loss_type": ["aot"], "beta": 0.1, "label_smoothing": 0.1}, "varied",
     ("aot_pair", {"beta": 0.1, "epsilon": 0.1}), 1.0, True, True, ""),
    ({"loss_type": ["aot_unpaired"], "beta": 0.1}, "varied",
     ("aot_unpaired", {"beta": 0.1}), 1.0, True, True, ""),
    ({"loss_type": ["apo_zero"], "beta": 0.1}, "varied",
     ("anchored_po_zero", {"beta": 0.1}), 1.0, False, True, ""),
    ({"loss_type": ["apo_down"], "beta": 0.1}, "varied",
     ("anchored_po_down", {"beta": 0.1}), 1.0, False, True, ""),
    ({"loss_type": ["discopop"], "beta": 0.05, "discopop_tau": 0.05}, "varied",
     ("discopop", {"beta": 0.05, "tau": 0.05}), 1.0, False, True, ""),
    ({"loss_type": ["sigmoid_norm"], "beta": 1.0}, "varied",
     ("ln_dpo", {"beta": 1.0}), 1.0, False, True, ""),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.1}, "equal_chosen",
     ("dpo_sft", {"beta": 0.1, "alpha": 0.5}), 1.0, False, True,
     "TRL's sft term is one token mean over the batch; equal to preftune's per-example mean only "
     "when chosen lengths are equal, hence the equal_chosen inputs"),
    ({"loss_type": ["sft"]}, "equal_chosen", ("sft", {}), 1.0, False, True,
     "TRL's sft loss is one token mean over the batch; equal to preftune's per-example mean only "
     "when chosen lengths are equal, hence the equal_chosen inputs"),
    ({"loss_type": ["sigmoid"], "beta": 0.1, "f_divergence_type": "forward_kl"}, "varied",
     ("f_dpo", {"beta": 0.1, "divergence": "forward_kl"}), 1.0, False, True, ""),
    ({"loss_type": ["sigmoid"], "beta": 0.1, "f_divergence_type": "js_divergence"}, "varied",
     ("f_dpo", {"beta": 0.1, "divergence": "js"}), 1.0, False, True, ""),
    ({"loss_type": ["sigmoid"], "beta": 0.1, "f_divergence_type": "alpha_divergence",
      "f_alpha_divergence_coef": 0.3}, "varied",
     ("f_dpo", {"beta": 0.1, "divergence": "alpha", "alpha": 0.7}), 1.0, False, True,
     "TRL's f_alpha_divergence_coef c is the paper's alpha = 1 - c"),
    ({"loss_type": ["sigmoid"], "beta": 0.1, "f_divergence_type": "alpha_divergence",
      "f_alpha_divergence_coef": 0.5}, "varied",
     ("f_dpo", {"beta": 0.1, "divergence": "alpha", "alpha": 0.5}), 1.0, False, True, ""),
    ({"loss_type": ["sigmoid"], "beta": 0.1, "use_weighting": True}, "varied",
     ("wpo", {"beta": 0.1, "alignment": "none"}), 1.0, False, True,
     "TRL always aligns by log sum_v pi^2; with that set to 0 it is the unaligned WPO weight"),
    ({"loss_type": ["sigmoid"], "beta": 0.1, "use_weighting": True}, "varied",
     ("wpo", {"beta": 0.1, "alignment": "sampled"}), 1.0, False, False,
     "preftune reads log sum_v pi^2 from stats.token_log_sum_sq_probs; inputs keep weights < 1 "
     "because preftune clamps the weight at 1 (authors' code) and TRL does not"),
    ({"loss_type": ["sigmoid"], "beta": 0.1, "ld_alpha": 0.3}, "varied",
     ("ld_dpo", {"beta": 0.1, "alpha": 0.3}), 1.0, False, True, ""),
    ({"loss_type": ["sigmoid"], "beta": 0.1, "ld_alpha": 0.0}, "varied",
     ("ld_dpo", {"beta": 0.1, "alpha": 0.0}), 1.0, False, True, ""),
]

NOT_MATCHED = {
    "f_divergence_type with hinge/ipo/exo_pair/robust/discopop/sigmoid_norm/sft": "f_dpo uses the "
        "paper's logistic form only; the other combinations are TRL compositions, not papers",
    "use_weighting or ld_alpha with losses other than sigmoid": "wpo and ld_dpo are DPO-based, as "
        "in their papers' main results",
    "sigmoid + sft with unequal chosen lengths": "TRL's sft is a batch token mean, preftune's "
        "dpo_sft a per-example token mean",
    "sppo_hard": "matched up to the constant factor 2 (TRL sums the squares, preftune averages "
                 "them as the SPPO authors' code does); the parity test checks TRL = 2 x preftune",
    "cpo/orpo NLL terms": "TRL computes them with a cross-entropy over logits (ORPO over prompt and "
        "completion, CPO one token mean over the batch); preftune uses the chosen response's "
        "per-example token mean, so only the preference terms are compared",
}


def cpo_orpo_cases(data: dict) -> list[dict]:
    """TRL's CPO/ORPO preference terms (without their NLL) on the same inputs."""
    sums = {side: torch.tensor([sum(t) for t in data[side]]) for side in SIDES[:2]}
    means = {side: torch.tensor([sum(t) / len(t) for t in data[side]]) for side in SIDES[:2]}
    device = SimpleNamespace(device=torch.device("cpu"))
    cases = []
    for loss_type, beta, gamma, logps, preftune in (
        ("sigmoid", 0.1, 0.5, sums, ("cpo", {"beta": 0.1})),
        ("simpo", 2.0, 1.0, means, ("simpo", {"beta": 2.0, "gamma_beta_ratio": 0.5})),
    ):
        stub = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=0.0,
                               simpo_gamma=gamma, accelerator=device)
        losses, _, _ = CPOTrainer.cpo_loss(stub, logps["policy_chosen"], logps["policy_rejected"])
        cases.append({"trl": {"trainer": "CPOTrainer.cpo_loss", "loss_type": loss_type, "beta": beta,
                              "simpo_gamma": gamma, "cpo_alpha": 0.0},
                      "preftune": {"name": preftune[0], "params": preftune[1]},
                      "compare": "preference term: preftune loss minus alpha * chosen NLL"
                                 if preftune[0] == "cpo" else "whole loss",
                      "per_example_losses": losses.tolist()})
    stub = SimpleNamespace(beta=0.1, accelerator=device)
    losses = ORPOTrainer.odds_ratio_loss(stub, means["policy_chosen"], means["policy_rejected"])[0]
    cases.append({"trl": {"trainer": "ORPOTrainer.odds_ratio_loss", "beta": 0.1},
                  "preftune": {"name": "orpo", "params": {"odds_ratio_weight": 0.1}},
                  "compare": "TRL returns beta * log sigmoid(log odds ratio) and subtracts it: "
                             "preftune loss minus chosen NLL = -TRL",
                  "per_example_losses": losses.tolist()})
    return cases


def main() -> None:
    entries = []
    for config, inputs_name, (name, params), scale, coupled, zero_lss, note in DPO_CASES:
        data = INPUTS[inputs_name]
        rows = list(range(len(data["policy_chosen"])))
        batch_loss, grads = dpo_trainer_loss(config, data, rows, zero_lss)
        per_example = None if coupled else [
            dpo_trainer_loss(config, data, [i], zero_lss)[0] for i in rows]
        entries.append({"trl": config, "inputs": inputs_name, "zero_log_sum_sq": zero_lss,
                        "preftune": {"name": name, "params": params}, "trl_over_preftune": scale,
                        "batch_coupled": coupled, "batch_loss": batch_loss,
                        "per_example_losses": per_example, "policy_token_grads": grads,
                        "note": note})
    fixture = {
        "command": COMMAND,
        "trl_version": trl.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "dtype": "float32",
        "inputs": INPUTS,
        "dpo_trainer": entries,
        "cpo_orpo": cpo_orpo_cases(INPUTS["varied"]),
        "not_matched": NOT_MATCHED,
    }
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {OUTPUT} ({len(entries)} DPOTrainer cases, trl {trl.__version__})", file=sys.stderr)


if __name__ == "__main__":
    main()
