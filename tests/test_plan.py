"""``--plan``'s memory estimate against the tensor bytes a real run peaks at, counted by the
CPU allocator (benchmarks/common.py's PhaseMemory, the figure torch.cuda.max_memory_allocated
gives on a GPU), for the default run and the memory-saving settings."""

import json

import pytest
import torch
from common import PhaseMemory
from test_fsdp import planned_memory
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import preftune.train.loop as loop
from preftune.config import build_config
from tiny_models import char_tokenizer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return plan_workspace(tmp_path_factory.mktemp("plan"))


def plan_workspace(root):
    """A 3M-parameter Llama saved in fp32 (trained in bf16, so loading allocates its weights)
    and 16 pairs of one length, so the plan's worst micro-batch is every micro-batch."""
    save_model(root / "model", LlamaConfig, LlamaForCausalLM)
    save_model(root / "moe", MixtralConfig, MixtralForCausalLM, num_local_experts=8,
               num_experts_per_tok=2)
    rows = [{"prompt": [{"role": "user", "content": f"question {i:02d} " + "abcd " * 20}],
             "chosen": [{"role": "assistant", "content": "yes " * 6}],
             "rejected": [{"role": "assistant", "content": "nope " * 5 + "n"}]}
            for i in range(16)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def save_model(directory, config_class, model_class, **extra):
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0, **extra)
    model_class(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def planned_total(printed: str) -> float:
    return planned_memory(printed)["total"]


def config_of(workspace, name: str, model=None, **train):
    """Two bf16 steps of 8 pairs, with ``train`` (and ``model``) settings on top (a model
    ``path`` inside the workspace)."""
    model = dict(model or {})
    path = workspace / model.pop("path", "model")
    return build_config({"output_dir": str(workspace / name),
                         "model": {"path": str(path), "dtype": "bfloat16", **model},
                         "data": {"train": str(workspace / "pairs.jsonl")},
                         "reference": {"cache_dir": str(workspace / "cache")},
                         "train": {"batch_size": 8, "max_steps": 2, "seed": 0, **train}})


def plan_of(workspace, capsys, **train) -> str:
    loop.train(config_of(workspace, "planned", **train), plan_only=True, show_progress=False)
    return capsys.readouterr().out


def test_plan_without_checkpointing_names_what_checkpointing_would_need(workspace, capsys):
    printed = plan_of(workspace, capsys)
    line = next(x for x in printed.splitlines() if x.strip().startswith("with checkpointing"))
    every_layer, every_other = line.split()[2], line.rstrip(")").split()[-1]
    assert float(every_layer) == planned_total(plan_of(workspace, capsys,
                                                       gradient_checkpointing=True)) == 40
    assert float(every_other) == planned_total(plan_of(
        workspace, capsys, gradient_checkpointing=True, checkpoint_every=2)) == 49
    assert planned_total(printed) == 71
    assert "with checkpointing" not in plan_of(workspace, capsys, gradient_checkpointing=True)


SLOW = pytest.mark.slow  # (bf16 on CPUs without bf16 units: ~17 s each; `pytest -m slow`)


@pytest.mark.parametrize("train", [
    pytest.param({}, id="default"),
    pytest.param({"gradient_checkpointing": True}, id="checkpointing"),
    pytest.param({"lean_activations": False}, id="transformers-layers", marks=SLOW),
    pytest.param({"layout": "padded"}, id="padded", marks=SLOW),
    pytest.param({"gradient_checkpointing": True, "checkpoint_every": 2},
                 id="checkpoint-every-2", marks=SLOW),
    pytest.param({"optimizer": "adamw_8bit"}, id="8bit-adamw"),
    pytest.param({"model": {"train_layers": 2}}, id="top-2-layers", marks=SLOW),
    pytest.param({"model": {"train_layers": 1}, "gradient_checkpointing": True},
                 id="top-layer-checkpointed"),
    pytest.param({"model": {"train_layers": 1}}, id="top-layer", marks=SLOW),
    pytest.param({"model": {"lora": {"r": 16, "alpha": 32}}}, id="lora"),
    pytest.param({"model": {"path": "moe"}}, id="mixture-of-experts", marks=SLOW),
])
def test_plan_total_is_within_a_few_percent_of_the_measured_peak(workspace, train, capsys,
                                                                monkeypatch):
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")  # weights load on this thread: counted
    planned = planned_total(plan_of(workspace, capsys, **train))
    measured = measured_peak(config_of(workspace, measured_name(train), **train),
                             PhaseMemory("tensors"), monkeypatch)
    assert planned == pytest.approx(measured, rel=0.05)


def measured_name(settings: dict) -> str:
    return "measured-" + "-".join(map(str, settings.values())).replace("'", "").replace(" ", "")


def measured_peak(config, memory, monkeypatch) -> float:
    """The peak (MiB, as ``memory`` counts it) of a real run of ``config``, once its
    reference is built."""
    build_reference = loop.build_reference

    def then_train(*args, **kwargs):
        references = build_reference(*args, **kwargs)
        memory.enter("train")
        return references

    monkeypatch.setattr(loop, "build_reference", then_train)
    loop.train(config, show_progress=False)
    return memory.stop()["train"]



def test_on_a_gpu_the_plan_says_whether_it_fits_in_what_is_free(monkeypatch):
    """What the run could have is the device's free memory and what this process holds (the
    model the plan loaded, which the total counts, and the allocator's cache)."""
    from preftune.train.plan import MIB, device_fit

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (800 * MIB, 81559 * MIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 200 * MIB)
    cuda = torch.device("cuda")
    assert device_fit(900 * MIB, None, cuda) == [
        "  this GPU               1000  free or held by this process, of 81559: fits"]
    assert device_fit(1500 * MIB, 800 * MIB, cuda) == [
        "  this GPU               1000  free or held by this process, of 81559: short by 500 "
        "MiB; with gradient checkpointing it fits"]
    assert device_fit(1500 * MIB, 1200 * MIB, cuda)[0].endswith(
        "short by 500 MiB: see train.gradient_checkpointing, a smaller batch with "
        "accumulation, LoRA, 8-bit AdamW")
    assert device_fit(1500 * MIB, None, torch.device("cpu")) == []  # (RAM: not judged)


def test_an_eval_scorers_models_are_counted_with_what_training_holds(workspace, capsys):
    """train.eval_scorer's models are loaded before training and held through it: the plan
    adds their weights in the run's dtype (here a saved Mixtral as judge, bf16) to the total."""
    from transformers import AutoModelForCausalLM

    judge = AutoModelForCausalLM.from_pretrained(workspace / "moe")
    judged = sum(p.numel() for p in judge.parameters()) * 2 / 2**20
    plain = plan_of(workspace, capsys)
    tree = config_of(workspace, "planned").model_dump()
    tree["data"]["eval"] = tree["data"]["train"]
    tree["train"].update(eval_generations=4, eval_every=1,
                         eval_scorer=f"judge:{workspace / 'moe'}")
    loop.train(build_config(tree), plan_only=True, show_progress=False)
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("  eval scorer"))
    assert line == (f"  eval scorer      {judged:10.0f}  (judge:{workspace / 'moe'}, "
                    "train.eval_scorer: held by the main process)")
    assert planned_total(printed) == pytest.approx(planned_total(plain) + judged, abs=1)
