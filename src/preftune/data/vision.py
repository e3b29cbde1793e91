"""Images through a vision-language model's own HF processor: prompt tokens and pixel inputs.

Text is tokenized exactly as for language models (``tokenize.py``: chat template, exact
prompt/response boundary); each image placeholder in the prompt ids is then replaced by the
tokens the model's processor writes for that image (LLaVA: N ``<image>`` tokens; Idefics3 /
SmolVLM: the image tokens wrapped in ``<fake_token_around_image>``...; Qwen2-VL:
``<|vision_start|><|image_pad|>...<|vision_end|>``, GLM-4.1V:
``<|begin_of_image|><|image|>...<|end_of_image|>``, whose grid also sets the M-RoPE positions,
``vision_qwen.py``; Gemma 3: ``<start_of_image>`` becomes that token between blank lines,
followed by N ``<image_soft_token>`` and ``<end_of_image>``). When a batch is built the
distinct images of the batch are turned into the processor's pixel inputs once, whatever the
layout, and the model's image features are scattered onto the image-token positions of every
row that shows them (``model/forward.py``).
"""

from __future__ import annotations

import torch

from .images import PLACEHOLDER, ImageRef
from .records import DataError
from .vision_qwen import IMAGE_WRAPS


# what image processors return for their processor's text, which models take no input of:
# Gemma 3's number of pan-and-scan crops per image
NOT_MODEL_INPUTS = ("num_crops",)


class ImageInputs:
    """A processor's image side, attached to its tokenizer as ``tokenizer.image_inputs``."""

    def __init__(self, processor, mrope: bool = False):
        self.processor = processor
        tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        # the token whose positions take the image features: the processor's image token, but
        # Gemma 3's names the image's opening token (what a prompt holds), the tokenizer the one
        # its expansion repeats
        feature = self.image_token
        if self.image_token == getattr(processor, "boi_token", None):
            feature = tokenizer.image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(feature)
        # M-RoPE models (Qwen2-VL, GLM-4.1V): 3-D positions from each image's grid
        # (data/vision_qwen.py)
        self.mrope = mrope
        # the text that stands for one image in a rendered prompt (M-RoPE models wrap their
        # token; transformers' processors do not all name the wrapping tokens)
        start, end = (getattr(processor, name, None) for name in ("vision_start_token",
                                                                  "vision_end_token"))
        if mrope and not (start and end):
            if self.image_token not in IMAGE_WRAPS:
                raise ValueError(f"the processor's image token {self.image_token!r} is none of "
                                 f"the M-RoPE image tokens preftune knows {sorted(IMAGE_WRAPS)}, "
                                 "so the text around each image in a prompt is unknown")
            start, end = IMAGE_WRAPS[self.image_token]
        self.image_text = f"{start}{self.image_token}{end}" if start and end else self.image_token
        self.span = tokenizer(self.image_text, add_special_tokens=False)["input_ids"]
        self._expansions: dict = {}
        self._grids: dict = {}

    def prompt_text(self, text: str) -> str:
        """A plain-string prompt with ``<image>`` placeholders in the model's own image text."""
        return text.replace(PLACEHOLDER, self.image_text) if self.image_text != PLACEHOLDER \
            else text

    def expansion(self, image: ImageRef) -> list[int]:
        """The ids the processor writes for ``image`` where its placeholder was."""
        pil = image.load()
        size = pil.size  # the expansion depends on the image's size only
        if size not in self._expansions:
            out = self.processor(text=[self.image_text], images=[pil], add_special_tokens=False)
            self._expansions[size] = list(out["input_ids"][0])
            if "image_grid_thw" in out:  # M-RoPE: (t, h, w) in patches, before the merge
                merge = self.processor.image_processor.merge_size
                t, h, w = (int(n) for n in out["image_grid_thw"][0])
                self._grids[size] = (t, h // merge, w // merge)
        return self._expansions[size]

    def grid(self, image: ImageRef) -> tuple:
        """An M-RoPE model's (t, h, w) grid of ``image`` in image tokens (after the merge)."""
        if image.key not in self._grids:  # by content: collate asks for each unit
            size = image.load().size
            if size not in self._grids:
                self.expansion(image)
            self._grids[image.key] = self._grids[size]
        return self._grids[image.key]

    def expand(self, prompt_ids: list[int], images: tuple, origin: str) -> tuple[list, list]:
        """``prompt_ids`` with each image placeholder replaced by its image's tokens, and the
        number of image tokens of each image."""
        out, counts, at, span = [], [], 0, self.span
        for image in images:
            found = _find(prompt_ids, span, at)
            if found < 0:
                raise DataError(f"{origin}: field 'prompt': the rendered prompt has fewer image "
                                f"placeholders than the record's {len(images)} image(s); give "
                                "one placeholder per image.")
            tokens = self.expansion(image)
            out += prompt_ids[at:found] + tokens
            counts.append(sum(t == self.image_token_id for t in tokens))
            at = found + len(span)
        if _find(prompt_ids, span, at) >= 0:
            raise DataError(f"{origin}: field 'prompt': the rendered prompt has more image "
                            f"placeholders than the record's {len(images)} image(s); mark each "
                            f"image with <image>, not the model's own {self.image_text!r}.")
        out += prompt_ids[at:]
        written = sum(t == self.image_token_id for t in out) - sum(counts)
        if written:  # the model's image token typed into the text, outside a placeholder
            raise DataError(f"{origin}: field 'prompt': the text holds the model's image token "
                            f"{self.image_token!r} outside an image placeholder ({written} "
                            "time(s)); mark each image with <image> and remove the model's "
                            "token from the text.")
        return out, counts

    def pixels(self, images: list[ImageRef]) -> dict[str, torch.Tensor]:
        """Pixel inputs of ``images`` (one processor call each), stacked along the first dim in
        order, so the model's image features come out in the same order."""
        parts = [self.processor.image_processor(images=[image.load()], return_tensors="pt")
                 for image in images]
        return {name: _stack([dict(part)[name] for part in parts]) for name in parts[0].keys()
                if name not in NOT_MODEL_INPUTS}


def _find(ids: list[int], span: list[int], start: int) -> int:
    for position in range(start, len(ids) - len(span) + 1):
        if ids[position : position + len(span)] == span:
            return position
    return -1


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding dim 1 where images were split into different
    numbers of tiles (Idefics3 leaves out all-zero tiles)."""
    if tensors[0].dim() >= 2 and len({t.shape[1:] for t in tensors}) > 1:
        width = max(t.shape[1] for t in tensors)
        tensors = [torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1], *t.shape[2:])], 1)
                   for t in tensors]
    return torch.cat(tensors, 0)
