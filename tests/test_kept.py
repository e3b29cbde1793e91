"""``--plan``'s activation bytes are measured on the model (train/kept.py): three probe rows
of 16, 32 and 48 slots predict, within 0.5%, what autograd keeps for a real batch of another shape,
for families that keep different things (per-head query/key norms, four norms a layer, fp32
norms, experts, LoRA adapters, frozen weights), in each attention path."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from preftune.data.layout import collate
from preftune.model.forward import causal_lm_of, run_decoder
from preftune.model.lean import kept_for_backward, use_lean_layers
from preftune.train.kept import measure_kept
from preftune.train.plan import _activation_bytes
from test_architectures import examples

pytestmark = pytest.mark.filterwarnings("ignore")

SIZES = dict(vocab_size=128, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
FAMILIES = {
    "llama": {},
    "qwen3": {"head_dim": 32},  # query and key norms per head
    "gemma3_text": {"head_dim": 32},  # four norms a layer, fp32 norms, GELU
    "olmo2": {},  # norms after attention and MLP, query and key norms over all heads
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 96,
                  "shared_expert_intermediate_size": 128, "decoder_sparse_step": 1},
}


def build(model_type: str, attention="sdpa", lean=True, lora=False, frozen_below=0):
    config = AutoConfig.for_model(model_type, **SIZES, **FAMILIES[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.set_attn_implementation(attention)
    if lora:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                                 target_modules="all-linear"))
    for name, param in model.named_parameters():
        if frozen_below and ("embed" in name or ".layers.0." in name):
            param.requires_grad_(False)
    if lean:
        use_lean_layers(model)
    return model.train()


def autograd_keeps(model, batch) -> int:
    """What autograd keeps over one forward of ``batch`` (weights and masks left out)."""
    lm = causal_lm_of(model)
    decoder = lm.get_decoder()
    kept = kept_for_backward(lambda: run_decoder(decoder, batch, decoder.config, vlm=lm),
                             leave_out=list(model.parameters()))
    masks = [m for m in batch._masks.values() if isinstance(m, torch.Tensor)]
    return kept - sum(m.untyped_storage().nbytes() for m in masks)


CASES = [pytest.param(family, "sdpa", "padded", {}, id=family) for family in FAMILIES] + [
    pytest.param("llama", "sdpa", "prefix_shared", {}, id="llama-shared-mask"),
    pytest.param("gemma3_text", "sdpa", "packed_prefix_shared", {}, id="gemma3-packed-mask"),
    pytest.param("llama", "eager", "padded", {}, id="llama-eager"),
    pytest.param("qwen3", "sdpa", "padded", {"lean": False}, id="qwen3-transformers-layers"),
    pytest.param("llama", "sdpa", "padded", {"lora": True}, id="llama-lora"),
    pytest.param("mixtral", "sdpa", "prefix_shared", {"lora": True}, id="mixtral-lora-shared"),
    pytest.param("llama", "sdpa", "padded", {"frozen_below": 1}, id="llama-bottom-frozen"),
]


@pytest.mark.parametrize("family, attention, layout, settings", CASES)
def test_three_probe_rows_predict_what_a_real_batch_keeps(family, attention, layout, settings):
    model = build(family, attention, **settings)
    batch = collate(examples() * 2, 0, layout, max_row_tokens=40)
    rows, width = batch.input_ids.shape
    padded = batch.unit_ids is None and batch.real_tokens < batch.attention_mask.numel()
    kept = measure_kept(model, layout, padded)
    if settings.get("frozen_below"):
        assert kept.per_slot[0] == 0 and kept.per_slot[1] > 0  # the bottom layer keeps nothing
    planned = _activation_bytes(kept, rows, width, 128 * 2)
    assert planned == pytest.approx(autograd_keeps(model, batch), rel=0.005)


def test_eager_attention_scores_grow_with_the_square_of_the_row():
    model = build("llama", "eager")
    kept = measure_kept(model, "padded")
    sdpa = measure_kept(build("llama", "sdpa"), "padded")
    # the fp32 softmax of [heads, W, W] scores and its bf16 copy: 4 heads x (4 + 2) bytes
    assert kept.per_row_slot2 == pytest.approx((24.0, 24.0), rel=1e-6)
    assert sdpa.per_row_slot2 == pytest.approx((0.0, 0.0), abs=1e-9)
