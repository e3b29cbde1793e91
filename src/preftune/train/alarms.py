"""Alarms: cheap checks on each step's metrics that say *why* a run is going wrong.

Each alarm is printed, written to ``alarms.jsonl`` in the run directory and added to that step's
metrics record. Apart from non-finite losses (reported every time, with the examples involved),
each kind fires once per run.
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .logging import keep_through


class WeightProbe:
    """A few leading elements of every trainable tensor, copied at the start: ``moved()`` says
    whether any of them changed. Cheap (at most 64 numbers per tensor) and exact: unlike
    rewards, which on a GPU differ from 0 by rounding even when nothing trains."""

    def __init__(self, parameters, per_tensor: int = 64):
        self.parameters = list(parameters)
        self.per_tensor = per_tensor
        self.start = [self._head(p).clone() for p in self.parameters]

    def _head(self, parameter):
        return _local(parameter).reshape(-1)[: self.per_tensor]

    def moved(self) -> bool:
        return any(not torch.equal(self._head(p), s) for p, s in zip(self.parameters, self.start))

    def non_finite(self) -> torch.Tensor:
        """How many trainable tensors (this process's part of them) hold a NaN or inf, on the
        device: a whole pass over the weights, for the rare step whose loss is not finite."""
        return sum(((~torch.isfinite(_local(p))).any().to(torch.int64) for p in self.parameters),
                   torch.tensor(0))


def _local(parameter) -> torch.Tensor:
    """This process's part of a parameter, no gather (ZeRO-3's partition, FSDP's shard)."""
    local = getattr(parameter, "ds_tensor", None)
    if local is None:
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
    return local.detach()


class Alarms:
    def __init__(self, path: Path, needs_reference: bool, weights: WeightProbe | None = None,
                 displacement_nats: float = 5.0, chance_window: int = 20,
                 frozen_after_steps: int = 3):
        self.path = path
        self.needs_reference = needs_reference
        self.weights = weights
        self.checked_moving = False
        self.displacement_nats = displacement_nats
        self.frozen_after_steps = frozen_after_steps
        self.accuracies: deque = deque(maxlen=chance_window)
        self.first_ended: float | None = None  # share of held-out answers that ended, first
        self.fired: set[str] = set()

    def state(self) -> dict:
        """What the checks remember, for a checkpoint: a resumed run fires each alarm once."""
        return {"fired": sorted(self.fired), "checked_moving": self.checked_moving,
                "accuracies": list(self.accuracies), "first_ended": self.first_ended}

    def resume(self, state: dict | None, through_step: int) -> None:
        """Continue after a checkpoint of step ``through_step``: ``alarms.jsonl`` loses the
        alarms of the steps after it (they are replayed), and the checks pick up ``state``
        (a checkpoint without one: the kinds that alarms.jsonl kept, as fired)."""
        kept = keep_through(self.path, through_step)
        state = state or {"fired": [alarm["kind"] for alarm in kept],
                          "checked_moving": through_step >= self.frozen_after_steps}
        self.fired = set(state["fired"])
        self.checked_moving = state["checked_moving"]
        self.accuracies.extend(state.get("accuracies", []))
        self.first_ended = state.get("first_ended")

    def check(self, record: dict, example_origins: list[str],
              examples: list | None = None, diverged: bool = False) -> list[dict]:
        """Alarms raised by one step's metrics ``record``; ``example_origins`` name its examples
        (``examples``, when given, are the tokenized examples themselves); ``diverged``: the
        weights hold NaN or inf."""
        step, raised = record["step"], []
        if examples and all(_same_responses(ex) for ex in examples):
            raised.append(self._alarm(
                "no_signal", step,
                "every example of this step has identical responses (chosen == rejected), so "
                "nothing in it tells the objective which is better: "
                f"{', '.join(example_origins[:5])}. Check the data (data_report.json counts "
                "identical_responses).", repeat=True))
        if diverged:
            raised.append(self._alarm(
                "weights_non_finite", step,
                f"loss is {record['loss']} because the trainable weights hold NaN or inf values "
                "(not because of this step's examples): an earlier update made them so. Usual "
                "causes: a learning rate far too high, no gradient clipping "
                "(train.max_grad_norm), fp16 overflow. Training stops here."))
        elif not math.isfinite(record["loss"]):
            raised.append(self._alarm("non_finite_loss", step,
                                      f"loss is {record['loss']}; optimizer step skipped. Examples "
                                      f"in this batch: {', '.join(example_origins)}", repeat=True))
        elif not math.isfinite(record.get("grad_norm", 0.0)):
            raised.append(self._alarm(
                "non_finite_gradient", step,
                f"the loss is finite but the gradient norm is {record['grad_norm']}; optimizer "
                "step skipped. Something in the loss has an infinite slope at these values (a "
                "sqrt or log at 0, a division by a count of 0: a custom objective?) or fp16 "
                f"overflows. Examples in this batch: {', '.join(example_origins)}", repeat=True))
        if step >= self.frozen_after_steps and not self.checked_moving:  # once: reads weights
            self.checked_moving = True
            raised.append(self._not_moving(record))
        if "logps/ref_chosen" in record:
            drop = record["logps/chosen"] - record["logps/ref_chosen"]
            if drop < -self.displacement_nats:
                raised.append(self._alarm(
                    "likelihood_displacement", step,
                    f"chosen responses are {-drop:.1f} nats less likely than under the reference "
                    f"(threshold {self.displacement_nats}): both responses are being pushed down. "
                    "Consider dpo_sft / an sft term, a larger beta or a lower learning rate."))
        raised += self._answers(record)
        if "rewards/accuracies" in record:
            self.accuracies.append(record["rewards/accuracies"])
            window = self.accuracies.maxlen
            if len(self.accuracies) == window and abs(sum(self.accuracies) / window - 0.5) < 0.05:
                raised.append(self._alarm(
                    "accuracy_at_chance", step,
                    f"reward accuracy has averaged {sum(self.accuracies) / window:.2f} over the "
                    f"last {window} steps: the objective is not separating chosen from rejected. "
                    "Check the labels (chosen/rejected swapped?), the learning rate and beta."))
        raised = [alarm for alarm in raised if alarm is not None]
        for alarm in raised:
            tqdm.write(f"ALARM [{alarm['kind']}] step {step}: {alarm['message']}")
            with self.path.open("a") as handle:
                handle.write(json.dumps(alarm) + "\n")
        return raised

    def _answers(self, record: dict) -> list:
        """What the held-out answers of an evaluation (train.eval_generations) show: most of
        them empty, or most no longer ending where most ended at the first evaluation."""
        step, raised = record["step"], []
        empty, ended = record.get("eval/answers_empty"), record.get("eval/answers_ended")
        if empty is not None and empty >= 0.5:
            raised.append(self._alarm(
                "answers_empty", step,
                f"{empty:.0%} of the held-out answers are empty or only blank space: the policy "
                "ends at once (EOS has become its likeliest first token) or writes nothing but "
                "spaces and newlines. Usual causes: a learning rate too high, "
                "or an objective pushing both responses' likelihood down (see logps/chosen; "
                "raise beta or add an sft term). The answers are in eval_generations.jsonl."))
        if ended is not None:
            if self.first_ended is None:
                self.first_ended = ended
            elif ended < 0.5 <= self.first_ended:
                raised.append(self._alarm(
                    "answers_unended", step,
                    f"only {ended:.0%} of the held-out answers end within "
                    f"train.eval_max_new_tokens, against {self.first_ended:.0%} at the first "
                    "evaluation: answers grow longer (length exploitation) or repeat. Check "
                    "eval_generations.jsonl; a length-normalised objective (simpo, ln_dpo) or "
                    "a lower learning rate helps."))
        return raised

    def _not_moving(self, record: dict) -> dict | None:
        step = record["step"]
        if self.weights is not None and not self.weights.moved():
            return self._alarm(
                "policy_not_moving", step,
                f"the trainable weights are bit-for-bit unchanged after {step} optimizer steps. "
                "Check the learning rate (0, or steps too small to change bf16/fp16 weights: "
                "bf16 rounds away updates under ~1/256 of a weight; train in float32 or raise "
                "it) and that parameters train (LoRA adapters attached, not frozen).")
        chosen, rejected = record.get("rewards/chosen"), record.get("rewards/rejected")
        if self.needs_reference and chosen == 0.0 and rejected == 0.0:
            return self._alarm(
                "policy_not_moving", step,
                f"implied rewards are still exactly 0 after {step} optimizer steps: the policy "
                "equals the reference. Check that parameters train (LoRA adapters attached, "
                "learning rate above 0) and that the reference is not the live policy itself.")
        return None

    def _alarm(self, kind: str, step: int, message: str, repeat: bool = False) -> dict | None:
        if kind in self.fired and not repeat:
            return None
        self.fired.add(kind)
        return {"kind": kind, "step": step, "message": message}


def _same_responses(example) -> bool:
    """A tokenized example with several responses, all the same tokens (no preference in it)."""
    responses = getattr(example, "response_ids", None)
    return bool(responses) and len(responses) > 1 and all(r == responses[0] for r in responses)
