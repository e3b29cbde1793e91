"""What the online modules share: the prompts (read from data files, with their images and
tools), loading a model onto the device, the round's scorer, and atomic JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from accelerate import PartialState

from ..config import Config, ConfigError
from ..data.hub import locate
from ..data.images import attach_images, image_ref
from ..data.records import DataError, Unpaired, required_prompt
from ..data.rows import csv_text_columns, source_rows
from ..data.system import with_system
from ..data.tools import tools_of
from ..data.tokenize import TokenizeSettings
from ..generation import prompt_examples
from ..model.load import load_model_and_tokenizer
from ..score import load_scorer, prompt_key, text_only_parts
from ..score.base import IMAGE_SCORERS, scorer_prompt


class Prompt(NamedTuple):
    """A prompt to sample from, and where it was read (``file:line``)."""

    origin: str
    prompt: object
    negative: str | None = None  # the row's rejected response, if any (D2O's negative)
    positive: str | None = None  # the row's chosen response, if any (SELM ranks both)
    tools: tuple = ()  # the functions the prompt offers (data/tools.py)
    images: tuple = ()  # the images the prompt shows (ImageRef), placeholders in the prompt

    @property
    def question(self):
        """The prompt as scorers get it: with ``.images`` and ``.tools``."""
        return scorer_prompt(self.prompt, self.images, self.tools)


def read_prompts(paths, fields: dict, use: str, rename: str) -> list[Prompt]:
    """Each distinct prompt of the data file(s), in file order, with its origin. Any row with
    a prompt field works (pairs, lists, or prompts alone); ``fields`` may rename it (a row
    without one is refused, saying what needs it, ``use``, and how to ``rename`` the column).
    A prompt shows the images of the row's ``images`` field or its inline image parts, as in
    training data; the same question about another image is another prompt."""
    column, system = fields.get("prompt", "prompt"), fields.get("system", "system")
    seen: dict = {}
    for path in [paths] if isinstance(paths, str) else paths:
        for folder, origin, row in source_rows(locate(path), csv_text_columns(fields)):
            prompt = with_system(required_prompt(origin, row, column, (
                f"(the prompt) is missing or empty; {use} (a string or a list of chat "
                f"messages). Rename the column with {rename}.")), row, system, origin)
            tools = tools_of(row, fields.get("tools", "tools"), origin, isinstance(prompt, list))
            shown = attach_images(Unpaired(prompt, "", True), row, fields, origin, folder)
            key = prompt_key(scorer_prompt(shown.prompt, shown.images))
            seen.setdefault(key + json.dumps(tools, sort_keys=True), Prompt(
                origin, shown.prompt, _text(row.get(fields.get("rejected", "rejected"))),
                _text(row.get(fields.get("chosen", "chosen"))), tools, shown.images))
    if not seen:
        raise DataError(f"{', '.join(map(str, [paths] if isinstance(paths, str) else paths))}: "
                        f"no rows; {use}: give a file of rows with a prompt.")
    prompts = list(seen.values())
    chat = isinstance(prompts[0].prompt, list)
    other = next((p for p in prompts if isinstance(p.prompt, list) != chat), None)
    if other is not None:  # (the pairs a round writes are one format, as training reads)
        kinds = ("text", "a message list") if chat else ("a message list", "text")
        raise DataError(f"{other.origin}: field 'prompt' is {kinds[0]}, and the first prompt "
                        f"({prompts[0].origin}) is {kinds[1]}; write every prompt one way.")
    return prompts


def check_image_prompts(config, prompts: list) -> None:
    """Image prompts need a vision-language model (said before anything is written, naming
    the first prompt with images), readable images, a scorer that sees them, and sample
    through transformers; vLLM is refused by name."""
    from ..model.adapter_dirs import config_source
    from ..model.load import is_vision_language, resolve_model_dir

    shown = next((p for p in prompts if p.images), None)
    if shown is None:
        return
    source = config_source(resolve_model_dir(config.model.path, weights=False))
    if not is_vision_language(source, config.model.trust_remote_code):
        raise DataError(f"{shown.origin}: the prompt shows images, and model.path "
                        f"{config.model.path} is a text-only model; use a vision-language model "
                        "or leave the images out.")
    if config.online.sampling.backend == "vllm":
        raise ConfigError("online.sampling.backend: vllm does not take image prompts here; "
                          "use the transformers backend (online.sampling.backend: hf).")
    for prompt in prompts:  # each opened once: a corrupt one stops the run here, not later
        for image in prompt.images:
            image.load()
    blind = text_only_parts(config.online.scorer)
    if blind:
        raise ConfigError(f"online.scorer: {blind[0]} reads prompts as text, and "
                          f"{shown.origin}'s prompt shows images it would rate without seeing; "
                          f"{IMAGE_SCORERS}")


def _text(reply) -> str | None:
    """A response as text: a string, or the last message's content of a message list."""
    if isinstance(reply, list) and reply and isinstance(reply[-1], dict):
        return reply[-1].get("content")
    return reply if isinstance(reply, str) else None


def prompts_to_ids(prompts: list, tokenizer, config: Config) -> list[list[int]]:
    """The prompts tokenized as training renders them, cut to the data limits."""
    return [example.prompt_ids for example in prompts_to_examples(prompts, tokenizer, config)]


def prompts_to_examples(prompts: list, tokenizer, config: Config) -> list:
    """``prompts_to_ids``' prompts as ``TokenizedExample``s (with their images' token counts)."""
    settings = TokenizeSettings(config.data.max_length, config.data.max_prompt_length,
                                tuple(config.data.mask_roles))
    return prompt_examples([p.prompt for p in prompts], tokenizer, settings,
                           images=[p.images for p in prompts], tools=[p.tools for p in prompts],
                           origins=[p.origin for p in prompts])


def prompt_images(prompts: list) -> list | None:
    """Each prompt's images for generation, or None when no prompt shows any."""
    return [p.images for p in prompts] if any(p.images for p in prompts) else None


def row_question(row: dict):
    """A round file row's prompt as scorers get it (with its ``.images`` and ``.tools``)."""
    return scorer_prompt(row["prompt"], tuple(
        image_ref(path, row.get("origin", ""), f"field 'images', item {k}")
        for k, path in enumerate(row.get("images", ()))), tuple(row.get("tools", ())))


def online_scorer(config, judge: str, data, policy=None):
    """The online scorer; ``judge:policy`` / ``judge-pair:policy`` (self-rewarding) judge with
    the model at ``judge``, and ``follow-up:policy`` scores with it, loaded as the policy is
    (its dtype, and ``model.chat_template``, which the initial model's tokenizer may lack), or
    with ``policy`` (model, tokenizer), the policy in training (per_step), as it is at each
    call; other judges' and reward models' models load in the policy's dtype too."""
    spec = config.online.scorer
    if spec in ("judge:policy", "judge-pair:policy", "follow-up:policy"):
        from ..score.follow_up import FollowUpScorer
        from ..score.judge import LLMJudge

        kind = spec.removesuffix(":policy")
        model, tokenizer = policy or load_on_device(judge, config)
        was_training = model.training
        scorer = FollowUpScorer(model, tokenizer, f"follow-up:{judge}") if kind == "follow-up" \
            else LLMJudge(model, tokenizer, f"{kind}:{judge}", pairwise=kind == "judge-pair")
        if policy is None:
            return scorer
        model.train(was_training)  # (the scorer switched its model to evaluation)
        return _InEvaluation(scorer)
    return load_scorer(spec, data, config.model.dtype)


class _InEvaluation:
    """A scorer whose model is the policy in training: each call scores in evaluation mode
    (no dropout) and puts the policy back in training mode."""

    def __init__(self, scorer):
        self.scorer = scorer

    def __getattr__(self, name):  # name, pairwise, ...: the scorer's
        return getattr(self.scorer, name)

    def score(self, prompts, responses):
        return self._in_evaluation(self.scorer.score, prompts, responses)

    def prefer(self, prompts, first, second):
        return self._in_evaluation(self.scorer.prefer, prompts, first, second)

    def _in_evaluation(self, call, *args):
        model = self.scorer.model
        was_training = model.training
        model.eval()
        try:
            return call(*args)
        finally:
            model.train(was_training)


def load_on_device(path: str, config: Config):
    """A model for sampling, scoring or evaluation, on the accelerator when there is one; in 4
    bits under model.quantize, as the policy trains (and so that it fits where that does)."""
    return load_model_and_tokenizer(path, config.model.dtype, config.model.trust_remote_code,
                                    chat_template=config.model.chat_template,
                                    quantize=config.model.quantize,
                                    device=PartialState().device)


def read_jsonl(path: Path) -> list[dict]:
    """The rows a round wrote; a damaged file (cut short) is named with what to do."""
    return [read_json_text(line, f"{path}:{number}") for number, line
            in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)]


def read_json_text(text: str, where) -> dict | list:
    """``text`` as JSON, or a ``DataError`` naming ``where`` (a file a run wrote itself, now
    damaged: a crash mid-write, a full disk, an edit) and how to get past it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON ({error.msg}), so this run's file is damaged. "
                        "Delete that round's folder (round-N, and any later one) to redo it "
                        "with --resume, or start over with --overwrite.") from None


