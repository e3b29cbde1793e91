"""SPO's step-aware preference model (Liang et al. 2024, arXiv:2406.04314, section 4.1): a
PickScore-style CLIP scorer that also reads the noise level an image was predicted from.

During SPO, candidates are compared at every denoising step through their predicted clean
image x̂_0, which is blurry at high noise and sharp near the end. A scorer trained on clean
images alone misjudges the blurry ones; the step-aware model is trained on x̂_0 predicted from
noised training pairs at random timesteps, and told the timestep. Its score is PickScore's,

    s(prompt, x̂_0, t) = exp(logit_scale) * cos(text_embedding(prompt), image_embedding(x̂_0, t)),

and its loss for a pair with preference labels (y_w, y_l) ((1, 0), or (1/2, 1/2) for a tie) is
PickScore's cross-entropy  -[y_w log p_w + y_l log p_l],  p = softmax(s_w, s_l).

The timestep enters the vision tower as in DiT's adaLN: a sinusoidal embedding of t through an
MLP gives, per encoder layer, a shift and scale after each of its two layer norms and a gate on
the attention and MLP outputs, and a shift and scale of the pooled output. Departure from the
paper's code: every modulation starts as the identity (shift 0, scale 0, gate 1), so the model
starts as exactly the CLIP it was made from (e.g. PickScore) at every t. The CLIP weights stay
a plain ``CLIPModel`` directory (the modulation runs through forward hooks, not new layers);
the time conditioning is ``time_conditioning.safetensors`` beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError

TIME_FILE = "time_conditioning.safetensors"
IMAGE_FILE = "preprocessor_config.json"
FREQUENCIES = 256


def timestep_features(timesteps: torch.Tensor, dim: int = FREQUENCIES) -> torch.Tensor:
    """[N, dim] sinusoidal features of (possibly fractional) timesteps: cos then sin of
    t * 10000^(-k / (dim/2)), k = 0 .. dim/2 - 1."""
    half = dim // 2
    rates = torch.exp(-math.log(10000.0) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * rates[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimeConditioning(nn.Module):
    """t -> per-layer (shift, scale, gate) x 2 and a pooled (shift, scale); zero at init."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(FREQUENCIES, width), nn.SiLU(),
                                   nn.Linear(width, width))
        self.layers = nn.ModuleList(nn.Linear(width, 6 * width) for _ in range(layers))
        self.pooled = nn.Linear(width, 2 * width)
        for linear in [*self.layers, self.pooled]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, timesteps: torch.Tensor) -> tuple[list, tuple]:
        condition = F.silu(self.embed(timestep_features(timesteps).to(self.pooled.weight)))
        return ([layer(condition).chunk(6, dim=-1) for layer in self.layers],
                self.pooled(condition).chunk(2, dim=-1))


class StepAwarePreferenceModel(nn.Module):
    """A ``CLIPModel`` (with its tokenizer and image settings) plus ``TimeConditioning``."""

    def __init__(self, clip: nn.Module, tokenizer, image_settings: dict):
        super().__init__()
        self.clip, self.tokenizer = clip, tokenizer
        vision = clip.vision_model
        layers = vision.encoder.layers
        self.time = TimeConditioning(clip.config.vision_config.hidden_size, len(layers))
        self.time.to(next(clip.parameters()).dtype)
        self.size = _side(image_settings)
        self.register_buffer("mean", torch.tensor(image_settings["image_mean"]).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(image_settings["image_std"]).view(1, 3, 1, 1),
                             persistent=False)
        self.image_settings = image_settings
        self._modulation = None  # set for the span of one image_embeddings call
        for index, layer in enumerate(layers):
            layer.layer_norm1.register_forward_hook(self._modulate(index, 0))
            layer.self_attn.register_forward_hook(self._gate(index, 2))
            layer.layer_norm2.register_forward_hook(self._modulate(index, 3))
            layer.mlp.register_forward_hook(self._gate(index, 5))
        vision.post_layernorm.register_forward_hook(self._modulate_pooled)

    def _modulate(self, index: int, first: int):
        def hook(module, inputs, output):
            if self._modulation is None:
                return output
            shift, scale = self._modulation[0][index][first : first + 2]
            return output * (1 + scale[:, None]) + shift[:, None]
        return hook

    def _gate(self, index: int, position: int):
        def hook(module, inputs, output):
            if self._modulation is None:
                return output
            gate = 1 + self._modulation[0][index][position][:, None]
            if isinstance(output, tuple):  # attention: (hidden states, weights)
                return (output[0] * gate, *output[1:])
            return output * gate
        return hook

    def _modulate_pooled(self, module, inputs, output):
        if self._modulation is None:
            return output
        shift, scale = self._modulation[1]
        return output * (1 + scale) + shift

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] -> the vision tower's input: [0, 1], resized
        (bicubic) to its side, normalised by the image settings' mean and std."""
        x = ((images.float() + 1) / 2).clamp(0, 1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic",
                          align_corners=False).clamp(0, 1)
        return ((x - self.mean) / self.std).to(next(self.clip.parameters()).dtype)

    def image_embeddings(self, images: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Unit-length image embeddings [N, P] of images in [-1, 1] predicted at
        ``timesteps`` [N] (0: a clean image)."""
        self._modulation = self.time(timesteps.to(images.device))
        try:
            features = self.clip.get_image_features(pixel_values=self.pixels(images))
        finally:
            self._modulation = None
        return F.normalize(_pooled(features).float(), dim=-1)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length,
                                return_tensors="pt").to(self.mean.device)
        features = self.clip.get_text_features(input_ids=tokens.input_ids,
                                               attention_mask=tokens.attention_mask)
        return F.normalize(_pooled(features).float(), dim=-1)

    def forward(self, prompts: list[str], images: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
        """Scores [N]: exp(logit_scale) * cos(text, image) per (prompt, image, timestep)."""
        cosine = (self.text_embeddings(prompts) * self.image_embeddings(images, timesteps)).sum(-1)
        return self.clip.logit_scale.float().exp() * cosine

    # -- storage ----------------------------------------------------------------------------

    def save_pretrained(self, directory) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        self.clip.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        (directory / IMAGE_FILE).write_text(json.dumps(self.image_settings, indent=2))
        save_file({name: value.detach().contiguous().cpu()
                   for name, value in self.time.state_dict().items()}, directory / TIME_FILE)
        return directory

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32):
        """A CLIP directory (model, tokenizer, ``preprocessor_config.json``) or a Hugging Face
        Hub id of one (fetched once), with its time conditioning when it has one (a trained
        step-aware model), else the identity."""
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, CLIPModel

        from ..data.hub import HUB_NAME
        from ..model.hub import hub_snapshot

        if not Path(path).exists() and HUB_NAME.match(str(path)):  # e.g. a CLIP on the Hub
            path = hub_snapshot(str(path))
        directory = Path(path)
        for needed in ("config.json", IMAGE_FILE):
            if not (directory / needed).is_file():
                raise ConfigError(f"{directory}: no {needed}; a step-aware preference model "
                                  "starts from a CLIP directory holding the model, its "
                                  "tokenizer and preprocessor_config.json (e.g. PickScore's "
                                  "weights with its CLIP-H processor files copied in).")
        clip = CLIPModel.from_pretrained(directory, dtype=dtype, use_safetensors=True)
        settings = json.loads((directory / IMAGE_FILE).read_text())
        model = cls(clip, AutoTokenizer.from_pretrained(directory), settings)
        if (directory / TIME_FILE).is_file():
            model.time.load_state_dict(load_file(directory / TIME_FILE))
        return model


def _side(settings: dict) -> int:
    """The vision tower's input side from a CLIP image processor's settings."""
    for key in ("crop_size", "size"):
        value = settings.get(key)
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            side = value.get("height") or value.get("shortest_edge")
            if side:
                return int(side)
    raise ConfigError(f"{IMAGE_FILE} names no image size (crop_size or size).")


def _pooled(features):
    """The projected embedding from ``get_*_features`` (a tensor, or an output holding it)."""
    return getattr(features, "pooler_output", features)


class StepModelScorer:
    """``spm:PATH``, a step-aware preference model as a scorer: SPO calls ``score(prompts,
    images, timesteps)`` with x̂_0 tensors [N, 3, H, W] in [-1, 1]; ``preftune diffusion rank``
    and ``eval`` call ``score(prompts, PIL images)``, clean images (t = 0)."""

    def __init__(self, path: str, setting: str | None = None):
        from accelerate import PartialState

        device = PartialState().device  # each process's own GPU under a launch
        self.model = StepAwarePreferenceModel.from_pretrained(path).to(device).eval()
        self.name, self.setting = f"spm:{path}", setting  # (setting: what named it)

    @torch.no_grad()
    def score(self, prompts, images, timesteps=None) -> list[float]:
        device = self.model.mean.device
        if not torch.is_tensor(images):  # PIL images, each its own size
            return [self.score([prompt], _pil_pixels(image)[None])[0]
                    for prompt, image in zip(prompts, images, strict=True)]
        steps = torch.zeros(len(prompts)) if timesteps is None else torch.as_tensor(
            list(timesteps), dtype=torch.float32)
        return self.model(list(prompts), images.to(device), steps.to(device)).tolist()


def _pil_pixels(image) -> torch.Tensor:
    """[3, H, W] in [-1, 1] from a PIL image."""
    import numpy as np

    data = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    return data.permute(2, 0, 1).float() / 127.5 - 1
