"""Follow-up likelihood as reward (FLR; Zhang et al. 2024, arXiv:2409.13948).

People react to an answer: "thanks, that's what I needed" after a good one, "that's not what I
asked" after a bad one. A language model that has read many conversations knows which reaction
is likely after a given answer, so how likely it finds the positive reactions, against the
negative ones, rates the answer without any preference labels or reward-model training:

    FLR(x, y) = mean_{f in F+} log p(f | x, y) - mean_{f in F-} log p(f | x, y)

where log p(f | x, y) sums the log-probabilities of the follow-up's tokens when it is the
user's next turn after prompt x and response y (the scoring model's chat template; without
one, ``role: content`` lines). The spec of the paper's exact aggregation is unverified; this is
the formula as stated there. Any causal LM scores; the paper's point is that an instruction-tuned
one (or one fine-tuned on natural-language feedback) ranks responses about as well as trained
reward models. One forward pass per (response, follow-up), no sampling.
"""

from __future__ import annotations

import inspect

import torch

from ..config import ConfigError
from ..generation import left_padded
from .base import checked, prefer_by_scores, refuse_images

POSITIVE = ("Thank you, that is exactly what I needed.",
            "Great, that answers my question.",
            "Perfect, that is correct.")
NEGATIVE = ("That is wrong.",
            "That does not answer my question.",
            "No, that is not what I asked for.")


class FollowUpScorer:
    """``score`` is FLR(x, y) under ``model``; ``prefer`` compares two scores (1, 0, or 1/2 for
    a tie), as for every scalar scorer."""

    pairwise = False

    def __init__(self, model, tokenizer, name: str, positive=POSITIVE, negative=NEGATIVE,
                 batch_size: int = 8):
        if not positive or not negative:
            raise ConfigError(f"scorer {name}: follow-up likelihood needs at least one positive "
                              "and one negative follow-up.")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.positive, self.negative = list(positive), list(negative)
        self.batch_size = batch_size
        # logits of the last positions only, where the model's forward takes it
        self.keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", **options) -> "FollowUpScorer":
        from accelerate import PartialState

        from ..model.load import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(path, dtype)
        model.to(PartialState().device)
        return cls(model, tokenizer, f"follow-up:{path}", **options)

    def follow_up_ids(self, prompt, response: str, follow_up: str) -> tuple[list[int], int]:
        """The token ids of the conversation up to the end of ``follow_up`` (the user's next
        turn), and how many of them, at the end, are the follow-up's."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) \
            else [dict(m) for m in prompt]
        messages += [{"role": "assistant", "content": response},
                     {"role": "user", "content": follow_up}]
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        else:
            text = "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in messages)
        at = text.rfind(follow_up)
        if at < 0:
            raise ConfigError(f"scorer {self.name}: the chat template does not show the "
                              f"follow-up {follow_up!r} as written; give follow-ups the "
                              "template keeps as they are.")
        end = at + len(follow_up)
        whole = self.tokenizer.encode(text[:end], add_special_tokens=False)
        before = self.tokenizer.encode(text[:end - len(follow_up)], add_special_tokens=False)
        shared = next((k for k, (a, b) in enumerate(zip(whole, before)) if a != b),
                      min(len(whole), len(before)))  # a token merged across the boundary
        return whole, len(whole) - shared           # counts as the follow-up's

    @torch.no_grad()
    def log_likelihoods(self, groups: list[list[tuple[list[int], int]]],
                        share: bool = True) -> torch.Tensor:
        """[responses, follow-ups]: the summed log-probability of each row's last ``count``
        tokens given the rest. A response's rows share the conversation before the follow-ups:
        with ``share`` it runs once per response and its key-value cache serves every follow-up
        (models whose cache holds more than keys and values run each row whole)."""
        out = []
        for start in range(0, len(groups), self.batch_size):
            batch = groups[start : start + self.batch_size]
            values = self._shared(batch) if share else None
            if values is None:
                values = self._whole([row for group in batch for row in group])
            out.append(values.view(len(batch), -1).cpu())
        return torch.cat(out)

    def _whole(self, rows: list[tuple[list[int], int]]) -> torch.Tensor:
        """Each row's follow-up log-likelihood from one left-padded forward of the rows."""
        device = next(self.model.parameters()).device
        ids, mask = left_padded([r[0] for r in rows], self.tokenizer.pad_token_id, device)
        width = max(count for _, count in rows) + 1  # the rows end together (left padding)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            use_cache=False,  # one forward: no cache to keep
                            **({"logits_to_keep": width} if self.keep_logits else {})).logits
        token = logits[:, -width:-1].float().log_softmax(-1).gather(
            -1, ids[:, -width + 1 :, None])[..., 0]
        counts = torch.tensor([count for _, count in rows], device=device)
        return (token * (torch.arange(width - 1, 0, -1, device=device) <= counts[:, None])).sum(-1)

    def _shared(self, groups) -> torch.Tensor | None:
        """The same numbers, each response's shared conversation run once: its cache (of all
        but its last token) repeated for its follow-ups, which then run from that last token."""
        from ..generation import cache_argument, shared_prefix_cache

        device = next(self.model.parameters()).device
        contexts, tails, counts = [], [], []
        for group in groups:  # shared: the common start of the rows, never into a follow-up
            shared = min(min(len(ids) - count for ids, count in group),
                         next((k for k, column in enumerate(zip(*(ids for ids, _ in group)))
                               if len(set(column)) > 1), len(group[0][0])))
            contexts.append(group[0][0][:shared])
            tails += [ids[shared - 1 :] for ids, _ in group]
            counts += [count for _, count in group]
        ids, mask = left_padded(contexts, self.tokenizer.pad_token_id, device)
        cache = shared_prefix_cache(self.model, ids, mask, len(groups[0]))
        if cache is None:
            return None
        follow = max(map(len, tails))
        tail_ids = torch.tensor([t + [self.tokenizer.pad_token_id] * (follow - len(t))
                                 for t in tails], device=device)
        tail_mask = torch.tensor([[1] * len(t) + [0] * (follow - len(t)) for t in tails],
                                 device=device)
        before = mask[:, :-1].sum(-1).repeat_interleave(len(groups[0]))
        logits = self.model(input_ids=tail_ids, position_ids=before[:, None] + torch.arange(
                                follow, device=device),
                            attention_mask=torch.cat([mask[:, :-1].repeat_interleave(
                                len(groups[0]), 0), tail_mask], -1),
                            use_cache=True, **{cache_argument(self.model): cache}).logits
        token = logits[:, :-1].float().log_softmax(-1).gather(-1, tail_ids[:, 1:, None])[..., 0]
        lengths = torch.tensor([len(t) for t in tails], device=device)
        counts = torch.tensor(counts, device=device)
        place = torch.arange(1, follow, device=device)  # the target's index in its tail
        counted = (place < lengths[:, None]) & (place >= (lengths - counts)[:, None])
        return (token * counted).sum(-1)

    def score(self, prompts, responses) -> list[float]:
        refuse_images(prompts, self.name)
        follow_ups = self.positive + self.negative
        groups = [[self.follow_up_ids(p, r, f) for f in follow_ups]
                  for p, r in zip(prompts, responses, strict=True)]
        likelihoods = self.log_likelihoods(groups)
        split = len(self.positive)
        flr = likelihoods[:, :split].mean(-1) - likelihoods[:, split:].mean(-1)
        return checked(flr.tolist(), self.name, len(responses))

    def prefer(self, prompts, first, second) -> list[float]:
        return prefer_by_scores(self, prompts, first, second)


def follow_up_from_tree(path: str, tree: dict, dtype: str = "float32") -> FollowUpScorer:
    """The scorer a YAML file's ``follow_up`` mapping describes (``follow_up_options``), its
    model loaded in ``dtype``."""
    model, options = follow_up_options(path, tree)
    try:
        return FollowUpScorer.from_pretrained(model, dtype, **options)
    except (FileNotFoundError, OSError) as error:
        raise ConfigError(f"scorer file {path}: follow_up.model: {error}") from None


def follow_up_options(path: str, tree: dict) -> tuple[str, dict]:
    """The model and the options of a YAML file's ``follow_up`` mapping, checked: ``model``
    (required), ``positive`` and ``negative`` (lists of follow-ups; the defaults above when
    left out) and ``batch_size``."""
    spec = tree["follow_up"]
    known = {"model", "positive", "negative", "batch_size"}
    if not isinstance(spec, dict) or "model" not in spec or set(spec) - known:
        raise ConfigError(f"scorer file {path}: follow_up takes a mapping with 'model' (a "
                          "causal LM directory, or default) and optionally 'positive', "
                          f"'negative' (lists of follow-up texts) and 'batch_size'; got {spec!r}.")
    options = {"batch_size": spec.get("batch_size", 8)}
    for key in ("positive", "negative"):
        texts = spec.get(key)
        if texts is None:
            continue
        if not isinstance(texts, list) or not texts or \
                not all(isinstance(t, str) and t.strip() for t in texts):
            raise ConfigError(f"scorer file {path}: follow_up.{key} must be a non-empty list of "
                              f"non-empty texts; got {texts!r}.")
        options[key] = texts
    if not isinstance(options["batch_size"], int) or options["batch_size"] < 1:
        raise ConfigError(f"scorer file {path}: follow_up.batch_size must be a whole number "
                          f"of at least 1; got {options['batch_size']!r}.")
    return str(spec["model"]), options
