"""Every registered reward loss trains 3 steps through the real trainer on data of its shape,
and its saved model scores through ``rm score``: nothing registered is left untested end to end."""

import json
import random

import pytest

from preftune.cli import main
from preftune.reward.config import build_reward_config
from preftune.reward.losses import REWARD_LOSSES
from preftune.reward.train import train_reward_model
from tiny_models import save_tiny_model_dir

pytestmark = pytest.mark.filterwarnings("ignore")


def rows_for(shape: str, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(24):
        prompt = f"Question {i}: {rng.choice(['hi', 'what', 'why'])}?"
        good, bad = f"answer {i % 7}", f"no {rng.randint(0, 9)}"
        if shape == "pairs":
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad, "margin": 1.0,
                         "magnitude": float(1 + i % 3), "chosen_score": 3.0 + i % 2,
                         "rejected_score": 1.0, "chosen_help": 4.0, "rejected_help": 2.0})
        elif shape == "ranked":
            rows.append({"prompt": prompt, "responses": [good, bad, bad + "!"],
                         "scores": [2, 0, 1]})
        elif shape == "unpaired":
            rows.append({"prompt": prompt, "completion": good if i % 2 else bad,
                         "label": bool(i % 2)})
        else:
            rows.append({"prompt": prompt, "response": good, "score": float(i % 5),
                         "help": float(i % 4)})
    return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("every-rm")
    save_tiny_model_dir(root / "model")
    rng = random.Random(0)
    for shape in ("pairs", "ranked", "unpaired", "rated"):
        (root / f"{shape}.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in rows_for(shape, rng)))
    return root


CASES = [(name, shape) for name, spec in sorted(REWARD_LOSSES.items()) for shape in spec.data]


@pytest.mark.parametrize("name, shape", CASES)
def test_reward_loss_trains_three_steps_and_scores(workspace, name, shape):
    head = {"attributes": ["help"]} if name == "regression" and shape == "rated" else {}
    loss = {"name": name, **({"target": "help"} if name == "regression" and not head else {})}
    out = train_reward_model(build_reward_config({
        "output_dir": str(workspace / "runs" / f"{name}-{shape}"),
        "model": {"path": str(workspace / "model"), "head": head},
        "data": {"train": str(workspace / f"{shape}.jsonl")},
        "loss": loss,
        "train": {"learning_rate": 1e-3, "batch_size": 8, "max_steps": 3, "seed": 0}}),
        show_progress=False)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["loss"] == m["loss"] for m in metrics)  # finite, not NaN
    assert metrics[0]["loss"] != metrics[-1]["loss"]  # it trained
    scored = workspace / "runs" / f"{name}-{shape}.scored.jsonl"
    assert main(["rm", "score", "--model", str(out), "--data",
                 str(workspace / f"{shape}.jsonl"), "--output", str(scored),
                 "--field", "rm"]) == 0
    first = json.loads(scored.read_text().splitlines()[0])
    expected = {"pairs": "chosen_rm", "ranked": "rms", "unpaired": "rm", "rated": "rm"}[shape]
    assert expected in first
