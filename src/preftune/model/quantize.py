"""QLoRA: the base model's linear layers held in 4 bits, LoRA adapters trained on top.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs". The frozen base is
stored as 4-bit NormalFloat (NF4, a data type whose 16 levels are quantiles of a normal
distribution, so weights that are roughly normal lose little), with double quantization (the
per-block scales are quantized too, saving about 0.37 bits per weight). Each layer's weight is
dequantized to ``model.dtype`` when it runs; gradients flow through it into the adapters, which
train in ``model.dtype`` as usual. The linear layers take about a quarter of their bf16
memory.

bitsandbytes does the storage and the matmuls (CUDA, and CPUs since 0.46.1). Embeddings, norms
and the output layer stay in ``model.dtype``: the output layer is what the chunked log-probs
read (``chunked_logps.py``).
"""

from __future__ import annotations

import logging

KINDS = ("nf4", "fp4")


class _NoKernelsHubNotice(logging.Filter):
    """bitsandbytes, imported on a CPU with bf16 instructions, tries to fetch a faster kernel
    from the Hugging Face Hub and logs a warning when it cannot (offline, or an untrusted
    publisher); it then uses its own kernel, which is what preftune expects."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


def quiet_bitsandbytes() -> None:
    """Drop that one warning. Called when preftune is imported: peft imports bitsandbytes
    whenever it is installed, for every LoRA run, quantized or not."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHubNotice())


def quantization_config(kind: str, dtype, keep: tuple[str, ...] = ()):
    """transformers' bitsandbytes settings for ``model.quantize`` ``kind``: 4-bit weights of that
    type computing in ``dtype``; NF4 with double quantization, as in QLoRA. Modules named in
    ``keep`` stay in ``dtype`` (a reward head, which trains in full); without it,
    transformers keeps the output layer."""
    import torch
    from transformers import BitsAndBytesConfig

    if kind not in KINDS:
        raise ValueError(f"model.quantize: {kind!r} is not one of {', '.join(KINDS)}")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                              bnb_4bit_use_double_quant=kind == "nf4",
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8,
                              llm_int8_skip_modules=list(keep) or None)


def loading_arguments(kind: str, dtype, device, keep: tuple[str, ...] = ()) -> dict:
    """``from_pretrained``'s arguments for a model whose linear layers load in 4 bits
    (``quantization_config``), quantized where it will run: on ``device``, or the host."""
    import torch

    return {"quantization_config": quantization_config(kind, dtype, keep),
            "device_map": {"": torch.device(device or "cpu")}}


def settle(model) -> None:
    """What a model loaded with ``loading_arguments`` needs before it trains or runs:
    ``keep_training_layout`` and ``own_host_memory``."""
    keep_training_layout(model)
    own_host_memory(model)


def four_bit_storage(model) -> tuple[int, int]:
    """(how many weights of ``model`` are held in 4 bits, bytes of their per-block scales)."""
    weights = scale_bytes = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)  # bitsandbytes' Params4bit
        if state is None:
            continue
        weights += 2 * param.numel()  # two to a stored byte
        nested = getattr(state, "state2", None)
        scale_bytes += state.absmax.nbytes + (nested.absmax.nbytes if nested is not None else 0)
    return weights, scale_bytes


def keep_training_layout(model) -> None:
    """bitsandbytes (0.50; not 0.47), on a CPU with bf16 instructions, repacks a 4-bit weight in
    place the first time its layer runs without gradients (an evaluation pass: the probes of
    ``verify.py``, the reference), into a layout whose kernel has no backward. Training after
    that gets wrong gradients with no error (measured on a tiny Llama: its embedding gradient
    off by 250), and the pass itself differs from a training pass. Turned off here, every pass
    dequantizes as training does: the same numbers with and without gradients."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def own_host_memory(model) -> None:
    """On the host, the weights a quantized model keeps as they are (embeddings, norms) still
    view the safetensors file transformers mapped to read them, and while that mapping is open
    every page of the file that quantizing read stays resident: the whole file, counted in the
    process's memory beside the 4-bit copy. Copied into memory of their own, they let the
    mapping close."""
    for param in model.parameters():
        if param.device.type == "cpu" and getattr(param, "quant_state", None) is None:
            param.data = param.data.clone()
