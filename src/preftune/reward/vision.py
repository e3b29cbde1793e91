"""Reward models on vision-language backbones (LLaVA-, Idefics3-, Qwen2/2.5/3-VL-, Gemma 3-style).

transformers gives text decoders a ``*ForSequenceClassification`` class (a linear ``score``
on the last token's hidden state), but almost no vision-language model has one.
``VisionRewardModel`` is that class for any of them: the image-text-to-text model whose
language model runs on preftune's layouts (image features written once per prompt, as for
policies) and a bias-free linear ``score`` on the final hidden state of each response's last
token. Saved, it is the VLM's own directory (``AutoModelForImageTextToText`` and its processor
load it; its language-model head is kept, unused) plus ``score.safetensors``, the head's
[outputs, hidden] weight, and ``preftune_reward.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

SCORE_FILE = "score.safetensors"


class VisionRewardModel(nn.Module):
    """``vlm`` (an image-text-to-text model) with a reward head ``score``."""

    base_model_prefix = "vlm"  # where the pretrained model sits (transformers and PEFT read it)

    def __init__(self, vlm: nn.Module, num_outputs: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.vlm = vlm
        self.config = vlm.config
        text = vlm.config.get_text_config()
        device = vlm.get_input_embeddings().weight.device
        dtype = dtype or vlm.get_input_embeddings().weight.dtype  # (not a 4-bit weight's)
        self.score = nn.Linear(text.hidden_size, num_outputs, bias=False, dtype=dtype,
                               device=device)
        nn.init.normal_(self.score.weight, std=getattr(text, "initializer_range", 0.02))

    def get_decoder(self) -> nn.Module:
        """The language model (decoder stack) the head reads."""
        return self.vlm.get_decoder()

    base_model = property(get_decoder)  # where sequence classifiers keep it

    def get_input_embeddings(self) -> nn.Module:
        return self.vlm.get_input_embeddings()

    def get_output_embeddings(self):
        """The VLM's language-model head (so that LoRA's ``all-linear`` leaves it out)."""
        return self.vlm.get_output_embeddings()

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.vlm.gradient_checkpointing_enable(**kwargs)

    def disable_input_require_grads(self) -> None:
        self.vlm.disable_input_require_grads()

    def save_pretrained(self, directory, **kwargs) -> None:
        from safetensors.torch import save_file

        self.vlm.save_pretrained(directory, **kwargs)
        save_file({"weight": self.score.weight.detach().contiguous().cpu()},
                  Path(directory) / SCORE_FILE, metadata={"format": "pt"})


def load_vision_backbone(source: str, num_outputs: int, dtype: torch.dtype,
                         trust_remote_code: bool = False, extra: dict | None = None,
                         path: str | None = None, announce: bool = True) -> VisionRewardModel:
    """The VLM at ``source`` with a reward head: a saved one's ``score.safetensors`` when its
    size fits, else a fresh head (said in one line)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    vlm = AutoModelForImageTextToText.from_pretrained(
        source, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
        **(extra or {}))
    model = VisionRewardModel(vlm, num_outputs, dtype)
    saved = Path(source) / SCORE_FILE
    weight = load_file(saved)["weight"] if saved.is_file() else None
    if weight is not None and tuple(weight.shape) == tuple(model.score.weight.shape):
        with torch.no_grad():
            model.score.weight.copy_(weight)
    elif announce:
        why = "is new" if weight is None else (f"replaces the saved one ({weight.shape[0]} "
                                               f"outputs; this run's head has {num_outputs})")
        print(f"{path or source}: the reward head (score.weight) {why} and starts from random "
              "weights")
    return model
