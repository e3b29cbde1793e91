"""A scorer for text written for a text-to-image model: the response is rendered and the images
are judged (Prompt-A-Video's reward pipeline, #251, for images). With it, ``preftune online``
trains a language model to rewrite user prompts into ones the pipeline renders better, scored
against what the user asked for.

A scorer file (YAML, named wherever a scorer is)::

    render:
      pipeline: runs/diffusion_demo/pretrain/model   # a pipeline dir, a run dir or a Hub id
      scorer: shape_colour    # an image scorer: shape_colour, spm:PATH, module:function
      seeds: [0, 1]           # each response rendered from each seed; its score is the mean
      steps: 20
      guidance_scale: 3.0
      resolution: null        # the denoiser's own size
      batch_size: 8           # responses rendered at a time
      dtype: auto             # the pipeline's: auto (as its denoiser is saved), float32, ...
      target_pattern: null    # a regex whose group 1 takes the user's prompt out of the record's

Every response is rendered from the same seeds (the same starting noise), so the samples of
one prompt are compared on equal terms, and the image scorer judges each image against the
record's prompt (its last user message for a chat prompt; with ``target_pattern``, the part
the pattern's first group captures), not against the rewritten text.
"""

from __future__ import annotations

import re

from ..arguments import DTYPE_CHOICES
from ..config import ConfigError
from ..score.base import checked, prefer_by_scores
from . import require_diffusers

KEYS = {"pipeline", "scorer", "seeds", "steps", "guidance_scale", "resolution", "batch_size",
        "target_pattern", "negative_prompt", "true_cfg_scale", "dtype"}


class RenderScorer:
    pairwise = False

    def __init__(self, model, image_scorer, seeds=(0,), steps: int = 20,
                 guidance_scale: float = 1.0, resolution: int | None = None,
                 batch_size: int = 8, target_pattern: str | None = None,
                 name: str = "render", negative_prompt: str = "", true_cfg_scale: float = 1.0):
        self.model, self.image_scorer, self.seeds = model, image_scorer, list(seeds)
        self.steps, self.guidance_scale, self.resolution = steps, guidance_scale, resolution
        self.negative_prompt, self.true_cfg_scale = negative_prompt, true_cfg_scale
        self.batch_size, self.name = batch_size, name
        self.pattern = re.compile(target_pattern, re.DOTALL) if target_pattern else None

    @classmethod
    def from_file(cls, path: str, tree: dict) -> "RenderScorer":
        """The scorer a file's ``render`` mapping describes; errors name the file and key."""
        require_diffusers(f"scorer file {path} (render)")
        from .evaluate import image_scorer
        from .model import load_for_sampling
        from .pipeline_files import pipeline_dir
        from .sample import check_negative_prompt

        settings = render_settings(path, tree)
        model = load_for_sampling(pipeline_dir(settings["pipeline"]),
                                  f"{path}: render.pipeline", settings.get("dtype", "auto"))
        guidance = float(settings.get("guidance_scale", 1.0))
        negative = str(settings.get("negative_prompt", ""))
        true_cfg = float(settings.get("true_cfg_scale", 1.0))
        check_negative_prompt(model.family, negative, guidance, true_cfg,
                              (f"{path}: render.negative_prompt", f"{path}: render.true_cfg_scale"))
        return cls(model, image_scorer(str(settings["scorer"])), settings.get("seeds", [0]),
                   settings.get("steps", 20), guidance, settings.get("resolution"),
                   settings.get("batch_size", 8), settings.get("target_pattern"),
                   f"render({settings['scorer']} on {settings['pipeline']})", negative, true_cfg)

    def target(self, prompt) -> str:
        """What the images should show: the prompt's text (a chat prompt's last user
        message), or the part ``target_pattern`` captures."""
        text = prompt if isinstance(prompt, str) else _last_user_text(prompt)
        if self.pattern is None:
            return text
        found = self.pattern.search(text)
        if found is None:
            raise ConfigError(f"scorer {self.name}: target_pattern {self.pattern.pattern!r} "
                              f"does not match the prompt {text[:80]!r}.")
        return found.group(1)

    def score(self, prompts, responses) -> list[float]:
        """Per response: the image scorer's mean over its renders from ``seeds``."""
        from .data import tensor_image
        from .sample import sample_images

        per, scores = len(self.seeds), []
        for start in range(0, len(responses), self.batch_size):
            chunk = [str(r) for r in responses[start : start + self.batch_size]]
            images = sample_images(self.model, chunk, self.seeds, self.steps,
                                   self.guidance_scale, resolution=self.resolution,
                                   negative_prompt=self.negative_prompt,
                                   true_cfg_scale=self.true_cfg_scale)
            targets = [self.target(prompt) for prompt in prompts[start : start + len(chunk)]
                       for _ in range(per)]
            values = checked(self.image_scorer.score(targets, [tensor_image(x) for x in images]),
                             self.image_scorer.name, len(targets))
            scores += [sum(values[k * per : (k + 1) * per]) / per for k in range(len(chunk))]
        return scores

    def prefer(self, prompts, first, second) -> list[float]:
        return prefer_by_scores(self, prompts, first, second)


def render_settings(path: str, tree: dict) -> dict:
    """A scorer file's ``render`` mapping, its keys and values checked (not the pipeline);
    errors name the file and key."""
    settings = tree["render"]
    if set(tree) != {"render"} or not isinstance(settings, dict):
        raise ConfigError(f"{path}: expected one mapping, render, with {sorted(KEYS)}.")
    unknown = set(settings) - KEYS
    if unknown:
        raise ConfigError(f"{path}: render: unknown keys {sorted(unknown)}; expected "
                          f"{sorted(KEYS)}.")
    for key in ("pipeline", "scorer"):
        if not settings.get(key):
            raise ConfigError(f"{path}: render.{key} is required (the text-to-image "
                              "pipeline, and the image scorer that judges its images).")
    seeds = settings.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(seed, int) for seed in seeds):
        raise ConfigError(f"{path}: render.seeds must be a non-empty list of integers.")
    for key, low in (("steps", 1), ("batch_size", 1)):
        value = settings.get(key, 1)
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"{path}: render.{key} must be an integer >= {low}.")
    if settings.get("dtype", "auto") not in DTYPE_CHOICES:
        raise ConfigError(f"{path}: render.dtype {settings['dtype']!r}: give one of "
                          f"{', '.join(DTYPE_CHOICES)} (auto: the dtype the pipeline's "
                          "denoiser is saved in).")
    pattern = settings.get("target_pattern")
    if pattern is not None:
        try:
            if re.compile(pattern).groups < 1:
                raise re.error("it has no group")
        except re.error as error:
            raise ConfigError(f"{path}: render.target_pattern {pattern!r}: {error}; give a "
                              "regex whose group 1 is the user's prompt.") from None
    return settings


def check_render(path: str, tree: dict) -> None:
    """What a run checks before any work: the ``render`` mapping, its pipeline (a pipeline
    directory, a run's, or a Hub id; no weights read) and its image scorer."""
    require_diffusers(f"scorer file {path} (render)")
    from .evaluate import check_image_scorer
    from .pipeline_files import checked_pipeline, pipeline_dir

    settings = render_settings(path, tree)
    checked_pipeline(pipeline_dir(settings["pipeline"]), f"{path}: render.pipeline",
                     weights=False)
    try:
        check_image_scorer(str(settings["scorer"]))
    except ConfigError as error:
        raise ConfigError(f"{path}: render.scorer: {error}") from None


def _last_user_text(messages) -> str:
    for message in reversed(list(messages)):
        if message.get("role") == "user":
            content = message.get("content", "")
            if isinstance(content, list):  # parts: keep the text ones
                return " ".join(part.get("text", "") for part in content
                                if isinstance(part, dict) and part.get("type") == "text")
            return str(content)
    raise ConfigError("scorer render: a chat prompt without a user message has nothing to "
                      "render against.")
