"""QLoRA (``model.quantize``): LoRA adapters trained on a base held in 4 bits.

A quantized run is the fast path; LoRA on the base's dequantized weights, written out as a
plain model, is the plain path. They must train the same, in every layout. The reference is the
quantized base itself (so the first loss is log 2), the saved ``model/`` is the adapter merged
into the unquantized base, and a pass without gradients sees the numbers training sees.
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from preftune.config import ConfigError, ModelConfig, build_config
from preftune.model.load import load_model, load_tokenizer
from preftune.model.quantize import four_bit_storage, loading_arguments
from preftune.reward.config import build_reward_config
from preftune.reward.train import train_reward_model
from preftune.train import loop
from preftune.train.engines import refuse_sharding
from preftune.train.logging import read_metrics
from test_lora_variants import merged_and_parts, merged_is_w_plus_scaled_update
from test_train_loop import write_sum_pairs
from tiny_models import save_tiny_encoder_dir, save_tiny_model_dir

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore")

LORA = {"r": 4, "alpha": 8}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama, chat pairs, and for each 4-bit type the base's dequantized twin."""
    root = tmp_path_factory.mktemp("qlora")
    save_tiny_model_dir(root / "model")
    write_sum_pairs(root / "pairs.jsonl", 24)
    for kind in ("nf4", "fp4"):
        dequantized_twin(root / "model", root / f"dequantized-{kind}", kind)
    save_tiny_encoder_dir(root / "encoder")
    dequantized_twin(root / "encoder", root / "encoder-dequantized-nf4", "nf4", AutoModel)
    (root / "rm_pairs.jsonl").write_text("".join(
        json.dumps({"prompt": f"Q{i}: pick one.", "chosen": f"yes {i}", "rejected": "no"}) + "\n"
        for i in range(24)))
    return root


def dequantized_twin(source, target, kind: str, auto=AutoModelForCausalLM):
    """The model at ``source`` with each linear layer's weight replaced by its ``kind``
    quantization, dequantized: a plain model holding the numbers a quantized run computes
    with."""
    quantized = auto.from_pretrained(source, **loading_arguments(kind, torch.float32, "cpu"))
    plain = auto.from_pretrained(source)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data,
                                                        module.weight.quant_state)
                plain.get_submodule(name).weight.copy_(weight)
    plain.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)


def run(workspace, name: str, **overrides):
    """The run ``name`` (trained once per module: tests share runs by name)."""
    if name in RUNS:
        return RUNS[name]
    tree = {
        "output_dir": str(workspace / "runs" / name),
        "model": {"path": str(workspace / "model"), "lora": LORA},
        "data": {"train": str(workspace / "pairs.jsonl"), "eval_fraction": 0.25},
        "reference": {"cache_dir": str(workspace / "cache")},
        "train": {"learning_rate": 5e-3, "batch_size": 6, "max_steps": 3, "warmup_ratio": 0.0,
                  "eval_every": 3, "seed": 3},
    }
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    RUNS[name] = loop.train(build_config(tree), show_progress=False)
    return RUNS[name]


RUNS = {}


@pytest.mark.parametrize("kind, layout, reference, dora", [
    ("nf4", "auto", "precomputed", False), ("nf4", "padded", "live", False),  # live: 4-bit copy
    ("fp4", "packed_prefix_shared", "adapter-off", False),
    ("nf4", "prefix_shared", "adapter-off", True)])  # DoRA's norms of the dequantized weights
def test_a_quantized_base_trains_as_lora_on_its_dequantized_weights(workspace, kind, layout,
                                                                    reference, dora):
    name = (f"{kind}-{layout}" + ("" if reference == "precomputed" else f"-{reference}")
            + ("-dora" if dora else ""))
    lora = {**LORA, "dora": dora}
    quantized = run(workspace, name, model__quantize=kind, train__layout=layout,
                    reference__strategy=reference, model__lora=lora)
    plain = run(workspace, f"dequantized-{name}", train__layout=layout, model__lora=lora,
                reference__strategy=reference, model__path=str(workspace / f"dequantized-{kind}"))
    log, expected = (read_metrics(path / "metrics.jsonl") for path in (quantized, plain))
    assert len(log) == len(expected) == 3
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/ref_rejected"):
        assert [r[key] for r in log] == pytest.approx([r[key] for r in expected],
                                                      rel=1e-5, abs=1e-6), key
    assert log[2]["eval/loss"] == pytest.approx(expected[2]["eval/loss"], rel=1e-5)
    # the reference is the quantized base: policy and reference agree before the first update
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[0]["logps/chosen"] == log[0]["logps/ref_chosen"]
    adapters = [load_file(path / "adapter" / "adapter_model.safetensors")
                for path in (quantized, plain)]
    assert adapters[0].keys() == adapters[1].keys()
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(tensor, adapters[1][name], rtol=1e-5, atol=1e-6)
    info = [json.loads((path / "run.json").read_text()) for path in (quantized, plain)]
    assert info[0]["quantize"] == kind and "quantize" not in info[1]
    assert info[0]["layout"] == info[1]["layout"]


@pytest.mark.parametrize("setting", [pytest.param("compile", marks=pytest.mark.slow),
                                     "gradient_checkpointing"])  # (compile: test_compile.py)
def test_compiled_or_checkpointed_layers_on_a_4_bit_base_train_as_plain_ones(workspace,
                                                                            setting):
    plain = read_metrics(run(workspace, "nf4-auto", model__quantize="nf4") / "metrics.jsonl")
    fast = read_metrics(run(workspace, f"nf4-auto-{setting}", model__quantize="nf4",
                            **{f"train__{setting}": True}) / "metrics.jsonl")
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert [r[key] for r in fast] == pytest.approx([r[key] for r in plain],
                                                       rel=1e-5, abs=1e-6), key
    assert fast[-1]["eval/loss"] == pytest.approx(plain[-1]["eval/loss"], rel=1e-5)


def test_quantizing_changes_the_numbers(workspace):
    """The base really is held in 4 bits: its log-probs are not the original model's."""
    quantized = read_metrics(run(workspace, "nf4-auto", model__quantize="nf4")
                             / "metrics.jsonl")
    original = read_metrics(run(workspace, "original") / "metrics.jsonl")
    assert abs(quantized[0]["logps/chosen"] - original[0]["logps/chosen"]) > 1e-3


def test_the_saved_model_is_the_adapter_merged_into_the_unquantized_base(workspace):
    output = run(workspace, "nf4-auto", model__quantize="nf4")
    assert "quantization_config" not in json.loads((output / "model" / "config.json").read_text())
    merged, base, adapter = merged_and_parts(output)
    assert merged.keys() == base.keys()
    assert {weight.dtype for weight in merged.values()} == {torch.float32}
    # every linear layer of both decoder layers moved
    assert merged_is_w_plus_scaled_update(merged, base, adapter,
                                          LORA["alpha"] / LORA["r"]) == 2 * len(LINEAR)


def test_passes_without_gradients_see_the_numbers_training_sees(workspace):
    """bitsandbytes on a CPU with bf16 instructions would repack a weight on a pass without
    gradients and then train with wrong gradients; ``load_model`` turns that off."""
    tokenizer = load_tokenizer(str(workspace / "model"))
    model = load_model(str(workspace / "model"), tokenizer, quantize="nf4")
    ids = torch.tensor([tokenizer("What is 3+4? It is 7.")["input_ids"]] * 2)

    def trained_pass():
        model.train()
        model.zero_grad()
        logits = model(ids).logits
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), model.model.embed_tokens.weight.grad.clone()

    logits, grad = trained_pass()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    again, grad_again = trained_pass()
    assert torch.equal(again, logits)
    assert torch.equal(grad_again, grad)


def test_four_bit_storage_counts_the_linear_weights(workspace):
    tokenizer = load_tokenizer(str(workspace / "model"))
    model = load_model(str(workspace / "model"), tokenizer, quantize="nf4")
    original = AutoModelForCausalLM.from_pretrained(workspace / "model")
    linear = sum(module.weight.numel() for name, module in original.named_modules()
                 if name.endswith(LINEAR))
    weights, scale_bytes = four_bit_storage(model)
    assert weights == linear
    # NF4 with double quantization: one 8-bit scale per 64 weights, and an fp32 scale of those
    # per 256 of them
    blocks = [module.weight.numel() // 64 for name, module in original.named_modules()
              if name.endswith(LINEAR)]
    assert scale_bytes == sum(n + 4 * math.ceil(n / 256) for n in blocks)
    assert four_bit_storage(original) == (0, 0)


def test_the_plan_counts_the_4_bit_weights(workspace, capsys):
    tree = {"output_dir": str(workspace / "runs" / "plan"),
            "model": {"path": str(workspace / "model"), "lora": LORA, "quantize": "nf4"},
            "data": {"train": str(workspace / "pairs.jsonl")}}
    loop.train(build_config(tree), plan_only=True)
    printed = capsys.readouterr().out
    original = AutoModelForCausalLM.from_pretrained(workspace / "model")
    total = sum(p.numel() for p in original.parameters())
    linear = sum(module.weight.numel() for name, module in original.named_modules()
                 if name.endswith(LINEAR))
    from preftune.train.plan import _millions

    adapters = sum(LORA["r"] * (module.in_features + module.out_features)  # all-linear LoRA
                   for name, module in original.named_modules() if name.endswith(LINEAR))
    assert f"parameters         {_millions(total + adapters)}, trainable " \
        f"{_millions(adapters)}, {_millions(linear)} in 4 bits (nf4)\n" in printed
    assert (_millions(135_300_000), _millions(24_576), _millions(1_536)) == (
        "135.3M", "0.02M", "0.0015M")  # as many decimals as a small count needs


def test_settings_that_cannot_train_a_quantized_base_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="model.quantize: nf4 weights do not train; add "
                                         "model.lora"):
        ModelConfig(quantize="nf4")
    assert ModelConfig(quantize="fp4", lora=LORA).quantize == "fp4"
    with pytest.raises(ValueError, match="Input should be 'nf4' or 'fp4'"):
        ModelConfig(quantize="int4", lora=LORA)
    for engine, name in ((DistributedType.DEEPSPEED, "DeepSpeed"), (DistributedType.FSDP, "FSDP")):
        with pytest.raises(ConfigError, match=f"model.quantize does not run under {name}, which "
                                              "would shard the 4-bit weights; launch it with DDP"):
            refuse_sharding(SimpleNamespace(distributed_type=engine), "model.quantize")
    refuse_sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU), "model.quantize")
    real = __import__("importlib").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match=r"model.quantize needs the bitsandbytes package: pip "
                                         r"install 'preftune\[qlora\]'"):
        ModelConfig(quantize="nf4", lora=LORA)


def count_a(prompt, response):
    """The online tests' verifier: more letters 'a' is better."""
    return float(response.count("a"))


def online_tree(workspace, output_dir, **online):
    prompts = workspace / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say a{'a' * k} {k}"}) + "\n"
                               for k in range(6)))
    return {"output_dir": str(output_dir),
            "model": {"path": str(workspace / "model"), "lora": LORA, "quantize": "nf4"},
            "data": {"train": str(prompts), "max_length": 64, "max_prompt_length": 32},
            "reference": {"cache_dir": str(workspace / "cache")},
            "train": {"learning_rate": 1e-2, "batch_size": 2, "max_steps": 2, "seed": 0,
                      "warmup_ratio": 0.0},
            "online": {"scorer": "test_qlora:count_a",
                       "sampling": {"samples": 4, "max_new_tokens": 10, "batch_size": 4},
                       **online}}


def test_each_online_round_trains_on_the_quantized_previous_model(workspace, tmp_path):
    from preftune.api import run_online

    out = run_online(online_tree(workspace, tmp_path / "rounds", rounds=2,
                                 reference="previous"))
    summary = json.loads((out / "online.json").read_text())
    assert summary["rounds"][1]["policy"] == str(out / "round-1" / "model")
    for r in (1, 2):
        here = out / f"round-{r}"
        assert json.loads((here / "run.json").read_text())["quantize"] == "nf4"
        # policy and reference are the same 4-bit model before the round's first update
        assert read_metrics(here / "metrics.jsonl")[0]["loss"] == pytest.approx(math.log(2),
                                                                                 abs=1e-6)
        assert "quantization_config" not in json.loads((here / "model" / "config.json")
                                                       .read_text())


def test_per_step_online_trains_a_quantized_base(workspace, tmp_path):
    from preftune.api import run_online

    out = run_online(online_tree(workspace, tmp_path / "per-step", mode="per_step"))
    here = out / "round-1"
    assert json.loads((here / "run.json").read_text())["quantize"] == "nf4"
    log = read_metrics(here / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)


def rm_run(workspace, name: str, path: str, **model):
    tree = {"output_dir": str(workspace / "runs" / name),
            "model": {"path": str(workspace / path), "lora": LORA, **model},
            "data": {"train": str(workspace / "rm_pairs.jsonl"), "eval_fraction": 0.25},
            "train": {"learning_rate": 3e-3, "batch_size": 6, "max_steps": 3, "eval_every": 3,
                      "warmup_ratio": 0.0, "seed": 0}}
    return train_reward_model(build_reward_config(tree), show_progress=False)


@pytest.mark.parametrize("backbone, head", [("model", "score"), ("encoder", "classifier")])
def test_a_reward_model_on_a_quantized_backbone_trains_as_on_its_dequantized_weights(
        workspace, backbone, head):
    from transformers import AutoModelForSequenceClassification

    quantized = rm_run(workspace, f"rm-{backbone}-nf4", backbone, quantize="nf4")
    twin = "dequantized-nf4" if backbone == "model" else "encoder-dequantized-nf4"
    plain = rm_run(workspace, f"rm-{backbone}-dequantized", twin)
    log, expected = (read_metrics(path / "metrics.jsonl") for path in (quantized, plain))
    assert len(log) == len(expected) == 3
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert [r[key] for r in log] == pytest.approx([r[key] for r in expected],
                                                      rel=1e-5, abs=1e-6), key
    assert log[2]["eval/loss"] == pytest.approx(expected[2]["eval/loss"], rel=1e-5)
    adapters = [load_file(path / "adapter" / "adapter_model.safetensors")
                for path in (quantized, plain)]
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(tensor, adapters[1][name], rtol=1e-5, atol=1e-6)
    assert json.loads((quantized / "run.json").read_text())["quantize"] == "nf4"
    # model/: the adapter and the trained head merged into the unquantized backbone
    assert "quantization_config" not in json.loads((quantized / "model" / "config.json")
                                                   .read_text())
    saved = AutoModelForSequenceClassification.from_pretrained(quantized / "model")
    trained_head = adapters[0][f"base_model.model.{head}.weight"]
    assert torch.equal(saved.get_submodule(head).weight.detach(), trained_head)


def test_a_quantized_model_on_the_host_lets_go_of_its_weights_file(workspace, tmp_path):
    """Its unquantized weights are copied out of the file transformers mapped to read them, so
    the mapping (and every page of the file that quantizing read) goes."""
    import gc
    import shutil
    from pathlib import Path

    shutil.copytree(workspace / "model", tmp_path / "model")
    weights_file = str(tmp_path / "model" / "model.safetensors")

    def mapped() -> bool:
        gc.collect()
        return any(line.endswith(weights_file) for line in
                   Path("/proc/self/maps").read_text().splitlines())

    tokenizer = load_tokenizer(str(tmp_path / "model"))
    model = load_model(str(tmp_path / "model"), tokenizer)  # as it is: it trains on the file's
    assert mapped()
    del model
    assert not mapped()
    model = load_model(str(tmp_path / "model"), tokenizer, quantize="nf4")
    assert not mapped()
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_a_vision_language_model_trains_on_a_4_bit_base(tmp_path):
    """An Idefics3-style model: its text and vision layers in 4 bits, the image side intact."""
    from tiny_vlms import save_tiny_vlm_dir, solid_image

    save_tiny_vlm_dir(tmp_path / "model", "idefics3")
    colours = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 200, 30)}
    for name, colour in colours.items():
        solid_image(tmp_path / f"{name}.png", colour)
    names = list(colours)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({
        "prompt": "What colour? <image>", "images": [f"{names[i % 3]}.png"],
        "chosen": names[i % 3], "rejected": names[(i + 1) % 3]}) + "\n" for i in range(8)))
    out = loop.train(build_config({
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(tmp_path / "model"), "lora": LORA, "quantize": "nf4"},
        "data": {"train": str(tmp_path / "pairs.jsonl"), "max_length": 48,
                 "max_prompt_length": 32},
        "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 5e-3}}),
        show_progress=False)
    log = read_metrics(out / "metrics.jsonl")
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[1]["loss"] < log[0]["loss"]
    assert "quantization_config" not in json.loads((out / "model" / "config.json").read_text())
