"""The memory a scorer takes, for the plans (``online --plan``'s scoring and evaluation
phases, ``train --plan`` with ``train.eval_scorer``): the models it loads (a judge, a reward
model, follow-up likelihood; every model of a combination, all loaded at once) in the run's
dtype, and the working tensors of the largest batch one of them scores. Weights are counted
from the saved files' headers (nothing is loaded); a batch's tensors follow what each scorer
runs:

- a judge: one forward of ``batch`` questions (its template, the prompt, the response; both
  responses for a pairwise judge) with no cache. It peaks in an MLP, holding per token three
  MLP-width tensors (the activated gate, the up projection and their product; two for a plain
  MLP) and four hidden-width ones (the residual, its norm, a sublayer's output and their
  sum), the rotary tables of each row's positions and a padded batch's boolean attention
  mask (``forward_bytes``), then the last position's logits and their fp32 copy;
- a reward model: one forward of ``batch`` prompt + response rows, the same MLP peak;
- follow-up likelihood: the conversation's cache of ``batch`` responses, repeated for each
  follow-up (and the original held while it is copied), the follow-ups' forward over it and
  their logits with two fp32 copies (``log_softmax``).

The samples' token counts are the policy's; another tokenizer counts somewhat differently."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

from ..model.adapter_dirs import adapter_base, is_adapter_dir
from ..model.load import load_tokenizer, resolve_model_dir, safetensors_header
from ..train.plan import (BYTES, gated_shapes, head_width, kv_bytes_per_token, mlp_width,
                          weight_bytes)

POLICY_KINDS = {"judge:policy": "judge", "judge-pair:policy": "judge-pair",
                "follow-up:policy": "follow-up"}


@dataclass(frozen=True)
class ScorerModel:
    """One model a scorer loads: ``kind`` (judge, judge-pair, follow-up, rm), its ``path``
    (None: the policy itself), the rows it runs at once and, for follow-up likelihood, how
    many follow-ups each response gets and the longest one's text."""

    name: str
    kind: str
    path: str | None
    batch: int
    follow_ups: int = 0
    longest_follow_up: str = ""


def scorer_models(spec: str) -> list[ScorerModel] | str:
    """The models ``spec`` loads, or why it has none to count (a function, a rendering
    pipeline)."""
    from . import read_scorer_file
    from .combine import check_combination
    from .follow_up import NEGATIVE, POSITIVE, follow_up_options

    if spec in POLICY_KINDS:
        kind = POLICY_KINDS[spec]
        return [_model(spec, kind, None, POSITIVE, NEGATIVE)]
    for prefix in ("judge:", "judge-pair:", "follow-up:"):
        if spec.startswith(prefix):
            return [_model(spec, prefix[:-1], spec[len(prefix):], POSITIVE, NEGATIVE)]
    if spec.endswith((".yaml", ".yml")):
        tree = read_scorer_file(spec)
        if isinstance(tree, dict) and "render" in tree:
            return "a rendering pipeline and an image scorer: not estimated here"
        if isinstance(tree, dict) and "follow_up" in tree:
            model, options = follow_up_options(spec, tree)
            return [_model(spec, "follow-up", model, options.get("positive", POSITIVE),
                           options.get("negative", NEGATIVE), options["batch_size"])]
        if isinstance(tree, dict) and "compositional" in tree:
            judged = tree["compositional"]
            return [ScorerModel(spec, "judge", str(judged["judge"]),
                                judged.get("batch_size", 8))]
        models = []
        for term in check_combination(spec, tree):
            found = scorer_models(term)
            models += found if isinstance(found, list) else []
        return models or "a combination of functions: no model"
    if spec.startswith("rm:") or Path(spec).is_dir():
        return [ScorerModel(spec, "rm", spec.removeprefix("rm:"), 16)]
    return "a Python function: no model"


def _model(name, kind, path, positive, negative, batch: int = 8) -> ScorerModel:
    follow_ups = list(positive) + list(negative)
    return ScorerModel(name, kind, path, batch, len(follow_ups) if kind == "follow-up" else 0,
                       max(follow_ups, key=len) if kind == "follow-up" else "")


class ScorerBytes(NamedTuple):
    """One scorer model's share of memory: what it is, its weights, one batch's working
    tensors and what that batch is."""

    name: str
    weights: int
    working: float
    batch: str


def scorer_memory(spec: str, dtype: str, policy, policy_tokenizer, longest_prompt: int,
                  new_tokens: int) -> list[ScorerBytes] | str:
    """``ScorerBytes`` of each model the scorer ``spec`` loads in ``dtype``, its batch of the
    longest prompt with a ``new_tokens`` response; or why the scorer has no model to count.
    ``policy`` (and its tokenizer) is the model of ``judge:policy`` and its kin."""
    found = scorer_models(spec)
    if isinstance(found, str):
        return found
    dtype_bytes = BYTES[dtype]
    counted = []
    for model in found:
        if model.path is None:
            text, tokenizer = policy.config.get_text_config(), policy_tokenizer
            held = weight_bytes(policy)
            shapes = {name: tuple(p.shape) for name, p in policy.named_parameters()}
        else:
            source = _source(model)
            text, tokenizer, shapes = _text_config(source), load_tokenizer(source), \
                _saved_shapes(source)
            held = sum(math.prod(shape) for shape in shapes.values()) * dtype_bytes
        first = [shape for name, shape in shapes.items() if len(shape) == 2 and
                 re.search(r"(^|\.)(layers|layer|h|blocks)\.0\.", name)]
        tokens = longest_prompt + new_tokens * (2 if model.kind == "judge-pair" else 1) + \
            _overhead(model, tokenizer)
        tail = _follow_up_tokens(model, tokenizer) if model.kind == "follow-up" else 0
        need = _batch_bytes(model, text, tokens, dtype_bytes, gated_shapes(first, text), tail)
        counted.append(ScorerBytes(model.path or f"the policy, {model.name}", held, need,
                                   _what(model, tokens)))
    return counted


def scorer_weights(spec: str, dtype: str) -> int:
    """The bytes of every saved model the scorer ``spec`` loads in ``dtype`` (0 for none),
    from their files' headers."""
    found = scorer_models(spec)
    return 0 if isinstance(found, str) else sum(
        math.prod(shape) for model in found if model.path
        for shape in _saved_shapes(_source(model)).values()) * BYTES[dtype]


def _source(model: ScorerModel) -> str:
    """The local directory of a saved scorer model."""
    from ..reward.model import reward_model_dir

    return str(reward_model_dir(model.path)) if model.kind == "rm" else \
        resolve_model_dir(model.path)


def _batch_bytes(model: ScorerModel, text, tokens: int, dtype_bytes: int, gated: bool,
                 tail: int) -> float:
    """The working tensors of one batch of ``model`` over rows of ``tokens`` tokens (and
    follow-ups of ``tail`` tokens): a follow-up scorer's larger phase, the conversations'
    forward or the follow-ups' over the repeated cache."""
    forward = forward_bytes(text, model.batch, tokens, dtype_bytes, gated)
    if model.kind == "rm":
        return forward
    if model.kind != "follow-up":
        return forward + model.batch * text.vocab_size * (dtype_bytes + 4)
    cached = kv_bytes_per_token(text, dtype_bytes)
    rows = model.batch * model.follow_ups
    return max(forward + model.batch * tokens * cached,
               rows * tokens * cached + forward_bytes(text, rows, tail, dtype_bytes, gated)
               + rows * tail * text.vocab_size * (dtype_bytes + 8))


def forward_bytes(text, rows: int, tokens: int, dtype_bytes: int, gated: bool) -> float:
    """The working tensors of a forward without gradients over ``rows`` rows of ``tokens``
    tokens (the model's ``text`` config): the MLP's peak (three MLP-width tensors for a gated
    MLP, two for a plain one) with four hidden-width ones, the rotary tables (about four
    head-width fp32 tensors a token) and a padded batch's boolean mask."""
    per_token = ((3 if gated else 2) * mlp_width(text) + 4 * text.hidden_size) * dtype_bytes \
        + 4 * head_width(text) * 4
    return rows * tokens * (per_token + tokens)


def _follow_up_tokens(model: ScorerModel, tokenizer) -> int:
    """The tokens a follow-up runs over the conversation's cache: the response's last token
    and the longest follow-up's text (the turn's opening is shared, so in the cache)."""
    return len(tokenizer.encode(model.longest_follow_up, add_special_tokens=False)) + 1


def _what(model: ScorerModel, tokens: int) -> str:
    if model.kind == "follow-up":
        return (f"{model.batch} responses of up to {tokens} tokens, cached for "
                f"{model.follow_ups} follow-ups each")
    rows = "questions" if model.kind.startswith("judge") else "rows"
    return f"a batch of {model.batch} {rows} x {tokens} tokens"


def _overhead(model: ScorerModel, tokenizer) -> int:
    """The tokens a scorer adds around the prompt and response: the judge's template in its
    chat template, the conversation's turns around them, or a reward model's EOS."""
    from .judge import PAIRWISE, POINTWISE

    if model.kind == "rm":  # the prompt as the data gives it, the response and an EOS
        return 1
    if model.kind.startswith("judge"):
        template = PAIRWISE if model.kind == "judge-pair" else POINTWISE
        text = template.format(prompt="", response="", first="", second="", scale=5)
        messages = [{"role": "user", "content": text}]
    else:
        messages = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
        return len(tokenizer.encode(text, add_special_tokens=False))
    return len(tokenizer.encode(" ".join(m["content"] for m in messages))) + 4


def _text_config(source: str):
    from transformers import AutoConfig

    if is_adapter_dir(source):
        source = resolve_model_dir(adapter_base(source))
    return AutoConfig.from_pretrained(source).get_text_config()


def _saved_shapes(source: str) -> dict[str, tuple]:
    """Each tensor's shape in a model directory's safetensors files, from their JSON headers
    (no tensor read); an adapter directory's base's with the adapter's."""
    shapes = {}
    if is_adapter_dir(source):
        shapes = _saved_shapes(resolve_model_dir(adapter_base(source)))
    for file in sorted(Path(source).glob("*.safetensors")):
        shapes |= {name: tuple(entry["shape"]) for name, entry in
                   safetensors_header(file).items() if name != "__metadata__"}
    return shapes
