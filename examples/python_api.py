"""The Python API end to end: an objective and a scorer of your own, a run configured from a
dict that names them, training, then evaluation. Run it from anywhere:

    python examples/python_api.py                           # SmolLM2-135M-Instruct; minutes on CPU
    python examples/python_api.py --model DIR --steps 2     # any Hugging Face model directory
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F

import preftune
from preftune.api import Config, evaluate, train


@dataclass
class SoftMarginParams:
    beta: float = 0.1
    target: float = 0.5  # the per-token implied-reward margin past which a pair earns no loss


# The declaration is what the built-in objectives declare: the data shape it trains on, whether
# it needs the reference's log-probs, and its parameters (a dataclass with defaults; a config
# sets them beside the name). From the implied rewards it returns, preftune logs
# rewards/chosen, rewards/rejected, rewards/margins and rewards/accuracies for it.
@preftune.register_objective(params=SoftMarginParams, needs_reference=True, data="pairs")
def soft_margin(inputs: preftune.ObjectiveInputs, params: SoftMarginParams):
    """Soft hinge on the per-token log-ratio margin: softplus(target - (r_w - r_l)),
    r(y) = beta * (log pi(y|x) - log pi_ref(y|x)) / |y|."""
    policy, reference = inputs.policy, inputs.reference  # [examples, 2]: chosen, rejected
    rewards = params.beta * (policy.logps - reference.logps) / policy.token_counts
    losses = F.softplus(params.target - (rewards[:, 0] - rewards[:, 1]))
    return preftune.ObjectiveOutput(losses, rewards)


@preftune.register_scorer()
def says_yes(prompt, response: str) -> float:
    """1.0 when the answer starts with "yes"."""
    return float(response.strip().lower().startswith("yes"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model.path (default: SmolLM2)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--output-dir", default="runs/python_api")
    args = parser.parse_args(argv)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = out / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}: is {i} a number? Answer yes "
                                         "or no.", "chosen": "yes", "rejected": "I am not sure."})
                             + "\n" for i in range(16)))

    config = Config.from_dict({  # the same sections, checks and error messages as a YAML file
        "output_dir": str(out / "run"),
        "model": {"path": args.model},
        "data": {"train": str(pairs)},
        "objective": {"name": "soft_margin", "target": 1.0},
        "reference": {"cache_dir": str(out / "reference-cache")},
        "train": {"max_steps": args.steps, "batch_size": 4, "learning_rate": 1e-5,
                  "warmup_ratio": 0.0},
    })
    run_dir = train(config, overwrite=True, show_progress=False)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    print(f"step {last['step']}: loss {last['loss']:.4f}, reward margin "
          f"{last['rewards/margins']:.4f}, reward accuracy {last['rewards/accuracies']:.2f}")

    results = evaluate(str(run_dir), str(pairs), reference=args.model, samples=0,
                       scorer="says_yes", max_new_tokens=8)
    print(f"eval: implied-reward accuracy {results['rewards/accuracy']:.2f}, win rate over the "
          f"reference under says_yes {results['win_rate']:.2f}")
    return results


if __name__ == "__main__":
    main()
