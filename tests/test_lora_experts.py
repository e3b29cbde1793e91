"""model.lora.target_parameters: LoRA on a mixture of experts' 3-D expert weights, which
all-linear leaves out. Each expert gets its own rank-r update; adapter/ loads onto the base
with PEFT and gives model/ (the merge); the adapters-off reference is the base."""

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from preftune.config import ConfigError, build_config
from preftune.train import loop
from preftune.train.logging import read_metrics
from test_train_loop import write_sum_pairs
from tiny_models import save_tiny_model_dir, save_tiny_moe_dir

pytestmark = pytest.mark.filterwarnings("ignore")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-lora")
    save_tiny_moe_dir(root / "model")
    write_sum_pairs(root / "pairs.jsonl", 8)
    return root


def run(workspace, name, lora, model="model", **train):
    return loop.train(build_config({
        "output_dir": str(workspace / "runs" / name),
        "model": {"path": str(workspace / model), "lora": lora},
        "data": {"train": str(workspace / "pairs.jsonl")},
        "reference": {"cache_dir": str(workspace / "cache")},
        "train": {"learning_rate": 2e-2, "batch_size": 4, "max_steps": 2, "warmup_ratio": 0.0,
                  "seed": 1, **train}}), show_progress=False)


def test_each_expert_trains_its_own_low_rank_update_and_the_saved_model_is_the_merge(workspace):
    output = run(workspace, "experts", {"r": 2, "alpha": 4, "target_modules": ["q_proj"],
                                        "target_parameters": EXPERTS})
    records = read_metrics(output / "metrics.jsonl")
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the base
    adapter = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_parameters"]) == sorted(EXPERTS)

    # (in memory: transformers writes Mixtral's experts to disk one 2-D weight each)
    base = AutoModelForCausalLM.from_pretrained(workspace / "model").state_dict()
    merged = AutoModelForCausalLM.from_pretrained(output / "model").state_dict()
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed == {f"model.layers.{i}.{part}" for i in (0, 1)
                       for part in ["self_attn.q_proj.weight", *EXPERTS]}
    for i in (0, 1):
        for part in EXPERTS:
            delta = merged[f"model.layers.{i}.{part}"] - base[f"model.layers.{i}.{part}"]
            assert delta.shape[0] == 4  # one update per expert, each of rank r = 2 at most
            ranks = [torch.linalg.matrix_rank(delta[e], atol=1e-7).item() for e in range(4)]
            assert max(ranks) == 2 and all(rank <= 2 for rank in ranks), (part, ranks)

    # PEFT puts adapter/ onto the untouched base and gets model/'s outputs
    ids = torch.tensor([[5, 17, 30, 41, 9, 22, 60]])
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(workspace / "model"), output / "adapter").eval()
    saved = AutoModelForCausalLM.from_pretrained(output / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(input_ids=ids).logits,
                                   saved(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_settings_peft_cannot_apply_to_expert_weights_and_wrong_names_stop_the_run(workspace,
                                                                                   tmp_path):
    for key, value in [("dropout", 0.1), ("dora", True), ("init", "pissa")]:
        with pytest.raises(ConfigError, match=rf"model.lora.target_parameters adapts weights "
                                              rf"outside any layer, .* model.lora.{key}: "):
            run(workspace, "bad", {"target_parameters": EXPERTS, key: value})
    with pytest.raises(ConfigError, match=r"no weight of MixtralForCausalLM is called "
                                          r"'experts.up_proj'; its 3-D weights \(experts\) are "
                                          r"mlp.experts.down_proj, mlp.experts.gate_up_proj"):
        run(workspace, "typo", {"target_parameters": ["experts.up_proj"]})
    save_tiny_model_dir(workspace / "dense")
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM is called 'mlp.experts.down_proj'; "
                                          r"it has no 3-D weights \(experts\): all-linear"):
        run(workspace, "dense", {"target_parameters": EXPERTS[1:]}, model="dense")
    assert not (workspace / "runs" / "typo" / "config.yaml").exists()
