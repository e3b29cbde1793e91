"""What the online modules share: the prompts, loading a model onto the device, the round's
scorer, and atomic JSON / JSONL files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from accelerate import PartialState

from ..config import Config
from ..data.tokenize import TokenizeSettings
from ..generation import prompt_ids
from ..model.load import load_model_and_tokenizer
from ..score import load_scorer


class Prompt(NamedTuple):
    """A prompt to sample from, and where it was read (``file:line``)."""

    origin: str
    prompt: object
    negative: str | None = None  # the row's rejected response, if any (D2O's negative)
    positive: str | None = None  # the row's chosen response, if any (SELM ranks both)
    tools: tuple = ()  # the functions the prompt offers (data/tools.py)


def prompts_to_ids(prompts: list, tokenizer, config: Config) -> list[list[int]]:
    """The prompts tokenized as training renders them, cut to the data limits."""
    settings = TokenizeSettings(config.data.max_length, config.data.max_prompt_length)
    return prompt_ids([p.prompt for p in prompts], tokenizer, settings,
                      tools=[p.tools for p in prompts])


def online_scorer(config, judge: str, data):
    """The online scorer; ``judge:policy`` / ``judge-pair:policy`` (self-rewarding) judge with
    the model at ``judge``, loaded as the policy is (its dtype, and ``model.chat_template``,
    which the initial model's tokenizer may lack)."""
    spec = config.online.scorer
    if spec in ("judge:policy", "judge-pair:policy"):
        from ..score.judge import LLMJudge

        kind = spec.removesuffix(":policy")
        model, tokenizer = load_on_device(judge, config)
        return LLMJudge(model, tokenizer, f"{kind}:{judge}", pairwise=kind == "judge-pair")
    return load_scorer(spec, data)


def load_on_device(path: str, config: Config):
    """A model for sampling, scoring or evaluation, on the accelerator when there is one; in 4
    bits under model.quantize, as the policy trains (and so that it fits where that does)."""
    return load_model_and_tokenizer(path, config.model.dtype, config.model.trust_remote_code,
                                    chat_template=config.model.chat_template,
                                    quantize=config.model.quantize,
                                    device=PartialState().device)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """``rows`` as JSONL, written aside and renamed into place."""
    staging = path.with_suffix(".tmp")
    with open(staging, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(staging, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_json(path: Path, value) -> None:
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(value, indent=2))
    os.replace(staging, path)
