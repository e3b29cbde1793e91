"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL and GLM-4.1V / GLM-4.5V (M-RoPE) on preftune's layouts:
3-D positions and a processor that needs no torchvision.

M-RoPE gives every token three position components (temporal, height, width). Text tokens
have all three equal; an image's tokens get its (t, h, w) grid positions, all offset by the
position where the image starts, and the text after an image continues from that start plus
the larger of the grid's height and width (the rule of the model's own ``get_rope_index``,
the same in all these families).
``mrope_positions`` applies that rule to one prompt on the host, so each unit of every layout
(a padded row, a prefix-shared [prompt | responses], a packed unit) gets exactly the positions
HF computes for the sequence alone; response tokens continue as text after the prompt.

transformers' ``Qwen2VLProcessor`` and ``Glm4vProcessor`` cannot be built without torchvision
(their video processors); ``QwenImageProcessorParts`` and ``GlmImageProcessorParts`` stand in
for them then: the model directory's tokenizer and its image processor on the PIL backend,
expanding each image to ``<|vision_start|><|image_pad|> x N<|vision_end|>`` (GLM:
``<|begin_of_image|><|image|> x N<|end_of_image|>``) with N = grid t*h*w / merge_size**2, the
processors' own rule.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

GLM_MODEL_TYPES = ("glm4v", "glm4v_moe")
MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", *GLM_MODEL_TYPES)
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
GLM_IMAGE_START, GLM_IMAGE_END, GLM_IMAGE = "<|begin_of_image|>", "<|end_of_image|>", "<|image|>"
# the tokens around each family's image token in a rendered prompt
IMAGE_WRAPS = {IMAGE_PAD: (VISION_START, VISION_END),
               GLM_IMAGE: (GLM_IMAGE_START, GLM_IMAGE_END)}
# processor-side files of a model directory, carried over when a trained model is saved
_PROCESSOR_FILES = ("processor_config.json", "video_preprocessor_config.json",
                    "chat_template.json", "chat_template.jinja")


def mrope_positions(prompt_ids: list[int], image_token_id: int, grids: list[tuple],
                    start: int = 0) -> tuple[list[list[int]], int]:
    """The three position lists of ``prompt_ids`` (images in order, ``grids`` their (t, h, w)
    in language-model tokens, i.e. after the spatial merge) and the position the next text
    token takes."""
    temporal, height, width = [], [], []
    position, at, image = start, 0, 0
    while at < len(prompt_ids):
        if prompt_ids[at] != image_token_id:
            temporal.append(position)
            height.append(position)
            width.append(position)
            position, at = position + 1, at + 1
            continue
        t, h, w = grids[image]
        for i in range(t):
            for j in range(h):
                temporal += [position + i] * w
                height += [position + j] * w
                width += range(position, position + w)
        at += t * h * w
        position += max(h, w)
        image += 1
    if image != len(grids):
        raise ValueError(f"the prompt holds {image} image(s) but {len(grids)} were given")
    return [temporal, height, width], position


def is_mrope_config(config: dict) -> bool:
    """True for a config.json (as a dict) whose text model uses multimodal rotary positions."""
    text = config.get("text_config") or config
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    return "mrope_section" in rope or config.get("model_type") in MROPE_MODEL_TYPES


class QwenImageProcessorParts:
    """The parts of a Qwen2-VL processor preftune uses (tokenizer, image processor, chat
    template, one call that expands image tokens), loaded without torchvision."""

    image_token = IMAGE_PAD
    vision_start_token = VISION_START
    vision_end_token = VISION_END

    def __init__(self, tokenizer, image_processor, chat_template: str | None = None,
                 source: str | None = None):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.source = source

    @classmethod
    def from_pretrained(cls, source: str, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        image_processor = cls.image_processor_class().from_pretrained(source)
        return cls(tokenizer, image_processor, _chat_template(Path(source)), source)

    @staticmethod
    def image_processor_class():
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil)

        return Qwen2VLImageProcessorPil

    def __call__(self, text: list[str], images: list, add_special_tokens: bool = False,
                 **_ignored) -> dict:
        """Like the processor's call for one text: each image token becomes the image's N."""
        pixels = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        pieces = text[0].split(self.image_token)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"{len(pieces) - 1} image tokens in the text for {len(images)} "
                             "image(s)")
        expanded = pieces[0]
        for grid, piece in zip(pixels["image_grid_thw"], pieces[1:]):
            expanded += self.image_token * (int(grid.prod()) // merge) + piece
        ids = self.tokenizer(expanded, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": [ids], **pixels}

    def save_pretrained(self, target) -> None:
        """The tokenizer and image processor files, with the source directory's other
        processor files (so transformers' own processor loads the copy where it can)."""
        self.tokenizer.save_pretrained(target)
        self.image_processor.save_pretrained(target)
        if self.source is not None:
            for name in _PROCESSOR_FILES:
                if Path(self.source, name).is_file() and not Path(target, name).exists():
                    shutil.copyfile(Path(self.source, name), Path(target, name))
        elif self.chat_template and not Path(target, "chat_template.jinja").exists():
            Path(target, "chat_template.jinja").write_text(self.chat_template)


class GlmImageProcessorParts(QwenImageProcessorParts):
    """GLM-4.1V's processor parts: the same expansion rule with GLM's image tokens, and its
    PIL image processor (which sizes images by its own rule)."""

    image_token = GLM_IMAGE
    vision_start_token = GLM_IMAGE_START
    vision_end_token = GLM_IMAGE_END

    @staticmethod
    def image_processor_class():
        from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

        return Glm4vImageProcessorPil


def processor_parts(model_type: str | None) -> type[QwenImageProcessorParts]:
    """The stand-in processor class of an M-RoPE model type."""
    return GlmImageProcessorParts if model_type in GLM_MODEL_TYPES else QwenImageProcessorParts


def _chat_template(source: Path) -> str | None:
    if (source / "chat_template.jinja").is_file():
        return (source / "chat_template.jinja").read_text()
    if (source / "chat_template.json").is_file():
        return json.loads((source / "chat_template.json").read_text()).get("chat_template")
    return None
