"""What only a GPU can check: the layouts and FlexAttention on CUDA (forward and backward), bf16
models with fp32 log-prob accumulation, and the training loop on CUDA in bf16.

Skipped where torch sees no CUDA device (CI has none). On a GPU machine:
``pytest tests/test_cuda.py``.
"""

import copy
import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from preftune.data.layout import LAYOUTS, collate
from preftune.model.forward import LogpModel, sequence_stats
from preftune.train import loop
from preftune.train.logging import read_metrics
from test_layouts import WEIGHTS, examples
from tiny_models import char_tokenizer

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore")]


def small_llama(vocab_size: int = 128, seed: int = 1) -> LlamaForCausalLM:
    """Head dim 16: FlexAttention's CUDA kernels need at least 16."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).float().eval()


def stats_and_grads(model, layout, batch_examples, attn="sdpa"):
    model = copy.deepcopy(model).cuda()
    model.set_attn_implementation(attn)
    batch = collate(batch_examples, pad_token_id=0, layout=layout, max_row_tokens=40).to("cuda")
    stats = sequence_stats(LogpModel(model, chunk_tokens=5)(batch), batch, per_token=True)
    weights = WEIGHTS[: stats.logps.numel()].view_as(stats.logps).cuda()
    (stats.logps * weights).sum().backward()
    return stats, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
@pytest.mark.parametrize("responses_per_example", [1, 2, 3])  # unpaired, pairs, ranked lists
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "padded"])
def test_layouts_on_cuda_match_the_padded_path(layout, responses_per_example, attn):
    """Prefix-shared and packed rows, with the dense mask (sdpa) or the BlockMask (FlexAttention,
    backward included), give the padded path's stats and gradients on the GPU in fp32."""
    model, batch_examples = small_llama(), examples(responses_per_example)
    plain, plain_grads = stats_and_grads(model, "padded", batch_examples)
    fast, fast_grads = stats_and_grads(model, layout, batch_examples, attn)
    torch.testing.assert_close(fast.logps, plain.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.token_logps, plain.token_logps, atol=1e-5, rtol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_model_log_probs_are_accumulated_in_fp32():
    """A bf16 model's response log-probs come back in fp32 and agree with the plain forward
    whose bf16 logits are upcast before the log-softmax; summing in bf16 instead is far worse."""
    batch_examples = examples(2)
    model = small_llama().cuda().to(torch.bfloat16)
    batch = collate(batch_examples, pad_token_id=0, layout="prefix_shared").to("cuda")
    with torch.no_grad():
        stats = sequence_stats(LogpModel(model, chunk_tokens=5)(batch), batch)
    assert stats.logps.dtype == torch.float32
    upcast, in_bf16 = torch.zeros_like(stats.logps), torch.zeros_like(stats.logps)
    for e, example in enumerate(batch_examples):
        for r, response in enumerate(example.response_ids):
            ids = torch.tensor([example.prompt_ids + response], device="cuda")
            with torch.no_grad():
                logits = model(ids).logits[0, len(example.prompt_ids) - 1 : -1]
            target = torch.tensor(response, device="cuda")[:, None]
            upcast[e, r] = torch.log_softmax(logits.float(), -1).gather(1, target).sum()
            picked = torch.log_softmax(logits, -1).gather(1, target)
            in_bf16[e, r] = picked.sum(dtype=torch.bfloat16).float()
    error = (stats.logps - upcast).abs().max().item()
    assert error < 0.05, error  # bf16 attention in two layouts: tiny, not zero
    assert error < (in_bf16 - upcast).abs().max().item()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-loop")
    tokenizer = char_tokenizer()
    small_llama(vocab_size=len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    lines = []
    for _ in range(32):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        history = " ".join(f"Earlier: {rng.randint(1, 99)} apples." for _ in range(rng.randint(4, 8)))
        lines.append(json.dumps({
            "prompt": [{"role": "user", "content": f"{history} What is {a}+{b}?"}],
            "chosen": [{"role": "assistant", "content": str(a + b)}],
            "rejected": [{"role": "assistant", "content": f"It is {a + b + rng.randint(1, 9)}."}]}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def train(root, name, layout="prefix_shared", **model):
    from preftune.config import build_config

    config = build_config({
        "output_dir": str(root / name), "model": {"path": str(root / "model"), **model},
        "data": {"train": str(root / "pairs.jsonl")},
        "reference": {"strategy": "precomputed", "cache_dir": str(root / f"cache-{name}")},
        "train": {"learning_rate": 1e-3, "batch_size": 8, "max_steps": 3, "warmup_ratio": 0.0,
                  "seed": 0, "layout": layout},
    })
    out = loop.train(config, show_progress=False)
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")], json.loads((out / "run.json").read_text())


def test_training_loop_on_cuda_flex_equals_sdpa_and_runs_in_bf16(model_dir):
    sdpa, run = train(model_dir, "sdpa")
    assert run["device"] == "cuda"
    flex, _ = train(model_dir, "flex", attn_implementation="flex_attention")
    assert flex == pytest.approx(sdpa, rel=1e-4)
    bf16, _ = train(model_dir, "bf16", dtype="bfloat16", attn_implementation="flex_attention")
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert bf16 == pytest.approx(sdpa, rel=0.05)  # same run, bf16 rounding only


def test_varlen_kernel_on_cuda_equals_one_sequence_at_a_time():
    """torch's variable-length attention (grouped-query, causal inside each sequence) against
    SDPA run on each sequence in turn (bf16 inputs, the reference in fp32)."""
    from preftune.model import varlen

    generator = torch.Generator(device="cuda").manual_seed(0)
    cu_seqlens = torch.tensor([0, 5, 17, 18, 40], dtype=torch.int32, device="cuda")
    query, key, value = (torch.randn(40, heads, 16, device="cuda", dtype=torch.bfloat16,
                                     generator=generator) for heads in (4, 2, 2))
    fast = varlen.sequences_cuda(query, key, value, cu_seqlens, 22, 0.25)
    slow = varlen.sequences_one_by_one(query.float(), key.float(), value.float(), cu_seqlens,
                                       22, 0.25)
    torch.testing.assert_close(fast.float(), slow, atol=2e-2, rtol=2e-2)


def test_training_loop_on_cuda_varlen_equals_sdpa_in_bf16(model_dir):
    sdpa, _ = train(model_dir, "sdpa-padded-bf16", layout="padded", dtype="bfloat16")
    fast, run = train(model_dir, "varlen-packed-bf16", layout="packed", dtype="bfloat16",
                      attn_implementation="varlen")
    assert run["layout"] == "packed"
    assert fast == pytest.approx(sdpa, rel=0.02)  # the same run, bf16 rounding only


@pytest.mark.parametrize("layout,checkpointed", [("padded", False), ("prefix_shared", False),
                                                 ("prefix_shared", True)])
def test_a_cuda_training_step_waits_for_the_device_once(model_dir, layout, checkpointed):
    """torch's sync debug mode warns at every operation that makes the host wait for the GPU:
    a whole optimizer step (two micro-batches, precomputed reference) waits once, at its end,
    also with its layers recomputed in backward (their random state is read on the host)."""
    import warnings

    from accelerate import Accelerator

    from preftune.config import build_config
    from preftune.train.trainer import Trainer

    config = build_config({
        "output_dir": str(model_dir / f"syncs-{layout}-{checkpointed}"),
        "model": {"path": str(model_dir / "model")},
        "data": {"train": str(model_dir / "pairs.jsonl")},
        "reference": {"cache_dir": str(model_dir / "cache-syncs")},
        "train": {"batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 8,
                  "layout": layout, "learning_rate": 1e-3,
                  "gradient_checkpointing": checkpointed}})
    accelerator = Accelerator()
    task, steps = loop.policy_task(config, accelerator)
    trainer = Trainer(task, config.train, model_dir / f"syncs-{layout}-{checkpointed}",
                      accelerator, steps, show_progress=False)
    for step in range(4):  # past the one-off check that the weights moved (step 3)
        trainer.step(step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.step(4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_layers_on_cuda_match_eager(mode):
    """train.compile's layers (inductor, Triton kernels; reduce-overhead: CUDA graphs) give
    eager's stats and gradients two steps in a row, and its log-probs without gradients (an
    evaluation's forward) between them."""
    from preftune.model.compile import compile_layers

    torch._dynamo.reset()
    model, batch_examples = small_llama(), examples(2)
    plain, plain_grads = stats_and_grads(model, "prefix_shared", batch_examples)
    compiled = copy.deepcopy(model).cuda()
    compile_layers(compiled, mode)
    batch = collate(batch_examples, pad_token_id=0, layout="prefix_shared",
                    max_row_tokens=40).to("cuda")
    for _ in range(2):
        fast, fast_grads = stats_and_grads(compiled, "prefix_shared", batch_examples)
        with torch.no_grad():
            evaluated = sequence_stats(LogpModel(compiled, chunk_tokens=5)(batch), batch).logps
        torch.testing.assert_close(evaluated, plain.logps.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.logps, plain.logps, atol=1e-4, rtol=1e-4)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)


def test_compiled_checkpointed_layers_on_cuda_match_eager():
    """train.compile with gradient checkpointing: each layer's compiled forward runs without
    gradients, then again with them in backward (inductor), and gives eager's stats and
    gradients, two steps in a row."""
    from preftune.model.checkpointing import enable_checkpointing
    from preftune.model.compile import compile_layers

    torch._dynamo.reset()
    model, batch_examples = small_llama().train(), examples(2)
    plain, plain_grads = stats_and_grads(model, "prefix_shared", batch_examples)
    compiled = copy.deepcopy(model)
    enable_checkpointing(compiled)
    compile_layers(compiled)
    for _ in range(2):
        fast, fast_grads = stats_and_grads(compiled, "prefix_shared", batch_examples)
    torch.testing.assert_close(fast.logps, plain.logps, atol=1e-4, rtol=1e-4)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)


def test_masked_attention_on_cuda_leaves_out_cudnn_and_checkpointing_recomputes_alike():
    """In bf16 with prefix sharing's dense mask, SDPA runs the memory-efficient kernel, not
    cuDNN's (2.5 ms of host time a call on an H200); activation checkpointing recomputes with
    the same kernel (``enable_checkpointing``; another kernel would save other tensors and
    fail the backward) and gives the plain backward's gradients."""
    from torch.profiler import ProfilerActivity, profile

    from preftune.model.checkpointing import enable_checkpointing

    batch_examples = examples(2)
    model = small_llama().cuda().to(torch.bfloat16).train()
    batch = collate(batch_examples, pad_token_id=0, layout="prefix_shared").to("cuda")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sequence_stats(LogpModel(model, chunk_tokens=5)(batch), batch).logps.sum().backward()
    ops = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_efficient_attention" in ops, sorted(ops)
    assert not [op for op in ops if "cudnn_attention" in op]
    plain = {name: p.grad.float() for name, p in model.named_parameters()}

    checkpointed = copy.deepcopy(model)
    checkpointed.zero_grad()
    enable_checkpointing(checkpointed)
    stats = sequence_stats(LogpModel(checkpointed, chunk_tokens=5)(batch), batch)
    stats.logps.sum().backward()
    for name, p in checkpointed.named_parameters():
        torch.testing.assert_close(p.grad.float(), plain[name], atol=2e-2, rtol=2e-2, msg=name)


@pytest.mark.parametrize("dtype,attn", [
    (torch.float32, "sdpa"), (torch.float32, "flex_attention"), (torch.bfloat16, "sdpa"),
    (torch.bfloat16, "flex_attention"), (torch.bfloat16, "varlen")])  # (varlen: bf16/fp16 only)
def test_the_mask_probe_finds_no_leak_in_an_attention_model_on_cuda(dtype, attn):
    """model/verify.py keeps a model to padded rows when tokens hidden by the mask move a
    response's hidden states at all; on CUDA a Llama must come out exactly unmoved in every
    layout its attention runs, or prefix sharing would be switched off on GPUs. (varlen in
    float32 is refused before a run: ``check_attention_device``.)"""
    from preftune.model.varlen import transformers_name
    from preftune.model.verify import decoder_of, mask_leak

    model = small_llama().to("cuda", dtype)
    model.set_attn_implementation(transformers_name(attn))
    layouts = ["packed"] if attn == "varlen" else [l for l in LAYOUTS if l != "padded"]
    for layout in layouts:
        assert mask_leak(*decoder_of(model), layout) == 0.0, layout


@pytest.mark.parametrize("family, layout", [("llama", "padded"), ("llama", "prefix_shared"),
                                            ("qwen3", "padded"), ("mixtral", "prefix_shared")])
def test_the_plans_probe_predicts_what_cuda_kernels_keep(family, layout):
    """--plan's probe rows (train/kept.py) on CUDA, where SDPA runs flash or memory-efficient
    kernels that keep other tensors than the CPU's, against a real batch of another shape."""
    from preftune.train.kept import measure_kept
    from preftune.train.plan import _activation_bytes
    from test_architectures import examples as short_examples
    from test_kept import autograd_keeps, build

    model = build(family).cuda()
    batch = collate(short_examples() * 2, 0, layout, max_row_tokens=40).to("cuda")
    rows, width = batch.input_ids.shape
    padded = batch.unit_ids is None and batch.real_tokens < batch.attention_mask.numel()
    planned = _activation_bytes(measure_kept(model, layout, padded), rows, width, 128 * 2)
    assert planned == pytest.approx(autograd_keeps(model, batch), rel=0.005)


@pytest.mark.parametrize("train", [{}, {"gradient_checkpointing": True}],
                         ids=["default", "checkpointing"])
def test_the_plans_total_is_near_a_cuda_runs_peak(train, tmp_path, capsys, monkeypatch):
    """--plan counts tensors as torch.cuda.max_memory_allocated does: its total against the
    CUDA peak of a real two-step bf16 run (tests/test_plan.py holds it within 5% of the CPU
    allocator's)."""
    from common import PhaseMemory
    from test_plan import (config_of, measured_name, measured_peak, plan_of, plan_workspace,
                           planned_total)

    root = plan_workspace(tmp_path)
    printed = plan_of(root, capsys, **train)
    fit = next(line for line in printed.splitlines() if line.startswith("  this GPU "))
    available = float(fit.split()[2])  # free, and what the plan's process held (its model)
    assert (": fits" in fit) == (planned_total(printed) < available)
    assert available >= torch.cuda.mem_get_info()[0] / 2**20 - 1
    planned = planned_total(printed)
    assert planned == pytest.approx(measured_peak(
        config_of(root, measured_name(train), **train), PhaseMemory("cuda"), monkeypatch),
        rel=0.05)


@pytest.mark.parametrize("path", ["decoder", "encoder"])
def test_the_reward_models_plan_is_near_a_cuda_runs_peak(path, tmp_path, capsys, monkeypatch):
    """``rm train --plan`` against the CUDA peak of a real two-step bf16 run
    (tests/test_rm_plan.py: the CPU allocator's)."""
    from common import PhaseMemory
    from test_rm_plan import measured_peak, plan_of, rm_plan_workspace
    from test_plan import planned_total

    root = rm_plan_workspace(tmp_path)
    planned = planned_total(plan_of(root, capsys, path))
    assert planned == pytest.approx(measured_peak(root, path, {}, PhaseMemory("cuda"),
                                                  monkeypatch), rel=0.05)


def test_eval_and_rm_score_run_their_models_on_the_gpu(model_dir, tmp_path):
    """``preftune eval`` loads policy and reference on the process's device (not the host),
    in the policy's saved dtype; ``rm score`` its reward model. Both models' weights are
    counted in the CUDA peak above what was allocated before."""
    import gc

    from preftune.cli import main
    from preftune.reward.config import build_reward_config
    from preftune.reward.train import train_reward_model

    def allocated_now() -> int:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    run, pairs = tmp_path / "run", str(model_dir / "pairs.jsonl")
    model = LlamaForCausalLM.from_pretrained(model_dir / "model", dtype=torch.bfloat16)
    model.save_pretrained(run / "model")
    char_tokenizer().save_pretrained(run / "model")
    (run / "run.json").write_text("{}")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    before = allocated_now()
    assert main(["eval", "--model", str(run), "--data", pairs, "--reference",
                 str(model_dir / "model"), "--samples", "2", "--max-new-tokens", "4"]) == 0
    assert json.loads((run / "eval.json").read_text())["settings"]["dtype"] == "bfloat16"
    assert torch.cuda.max_memory_allocated() - before >= 2 * weights
    rm = train_reward_model(build_reward_config({
        "output_dir": str(tmp_path / "rm"), "model": {"path": str(model_dir / "model")},
        "data": {"train": pairs}, "train": {"batch_size": 4, "max_steps": 1}}),
        show_progress=False)
    before = allocated_now()
    assert main(["rm", "score", "--model", str(rm), "--data", pairs,
                 "--output", str(tmp_path / "scored.jsonl")]) == 0
    assert torch.cuda.max_memory_allocated() - before >= weights


def test_diffusion_eval_samples_on_the_gpu(tmp_path):
    """``preftune diffusion eval`` (and so ``sample``, ``rank`` and the demo's measures, which
    load through ``load_for_sampling``) samples policy and reference on the GPU, one after
    the other."""
    pytest.importorskip("diffusers")
    import gc

    from diffusion_fixtures import tiny_pipeline
    from preftune.cli import main
    from preftune.diffusion.model import load_diffusion_model

    pipeline = tiny_pipeline(tmp_path / "pipe")
    weights = sum(p.numel() * p.element_size()
                  for p in load_diffusion_model(pipeline).parameters())
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    assert main(["diffusion", "eval", "--model", str(pipeline), "--reference", str(pipeline),
                 "--scorer", "shape_colour", "--prompt", "a red circle", "--seeds", "0,1",
                 "--steps", "2", "--output", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["win_rate"] == 0.5
    assert torch.cuda.max_memory_allocated() - before >= weights
