"""A language model as judge (LLM-as-a-judge), read from its next-token probabilities.

Pointwise: the judge is asked for a rating from 1 to ``scale`` and the score is the expected
rating under its next-token distribution over the digit tokens (renormalised over them), so
one forward pass per response, no sampling, and ties are rare. Pairwise: the judge sees both
responses as "A" and "B" and P(A) is read the same way over the tokens "A" and "B"; every
pair is asked in both orders and the two answers averaged, P(a > b) = (P_A(a, b) + 1 -
P_A(b, a)) / 2, which removes the judge's preference for a position (so prefer(a, b) +
prefer(b, a) = 1). Any local causal LM works, including the policy itself (self-rewarding:
``judge:policy`` in an online run).
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from ..data.records import plain_text
from ..generation import last_logits_only, left_padded
from .base import checked, refuse_images

POINTWISE = (
    "Rate how well the response answers the request, from 1 (wrong or unhelpful) to {scale} "
    "(correct and exactly what was asked). Reply with the number only.\n\n"
    "Request:\n{prompt}\n\nResponse:\n{response}")
PAIRWISE = (
    "Which response answers the request better? Reply with A or B only.\n\n"
    "Request:\n{prompt}\n\nResponse A:\n{first}\n\nResponse B:\n{second}")


class LLMJudge:
    """``pairwise=False``: ``score`` is the expected 1..scale rating; ``prefer`` compares two
    such scores as P = sigmoid(difference). ``pairwise=True``: ``prefer`` asks the judge about
    both responses at once (order-swap debiased); there is no score of one response."""

    def __init__(self, model, tokenizer, name: str, pairwise: bool = False, scale: int = 5,
                 template: str | None = None, batch_size: int = 8):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.pairwise, self.scale, self.batch_size = pairwise, scale, batch_size
        self.template = template or (PAIRWISE if pairwise else POINTWISE)
        labels = ["A", "B"] if pairwise else [str(k) for k in range(1, scale + 1)]
        self.label_ids = [self._single_token(label) for label in labels]

    @classmethod
    def from_pretrained(cls, path: str, pairwise: bool = False, dtype: str = "float32",
                        **options) -> "LLMJudge":
        from accelerate import PartialState

        from ..model.load import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(path, dtype)
        model.to(PartialState().device)
        kind = "judge-pair" if pairwise else "judge"
        return cls(model, tokenizer, f"{kind}:{path}", pairwise=pairwise, **options)

    def _single_token(self, label: str) -> int:
        ids = self.tokenizer.encode(label, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(f"judge {self.name}: the answer {label!r} is {len(ids)} tokens for "
                              "this tokenizer; the judge reads one-token answers (use a scale "
                              "of at most 9).")
        return ids[0]

    @torch.no_grad()
    def label_probs(self, questions: list[str]) -> torch.Tensor:
        """[N, labels]: the judge's next-token probabilities of each answer label, renormalised
        over the labels, after the chat-formatted question."""
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                    add_generation_prompt=True, tokenize=False)
                 if self.tokenizer.chat_template else q for q in questions]
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), self.batch_size):
            encoded = [self.tokenizer.encode(t, add_special_tokens=False)
                       for t in texts[start : start + self.batch_size]]
            ids, mask = left_padded(encoded, self.tokenizer.pad_token_id, device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                use_cache=False,  # one forward: a cache would be kept for nothing
                                **last_logits_only(self.model)).logits[:, -1].float()
            out.append(logits[:, self.label_ids].softmax(-1).cpu())
        return torch.cat(out)

    def score(self, prompts, responses) -> list[float]:
        refuse_images(prompts, self.name)
        if self.pairwise:
            raise ConfigError(f"{self.name} compares two responses and gives no score of one; "
                              "use it where a pairwise scorer is accepted (win rates, online "
                              "rounds) or use the pointwise judge:PATH.")
        questions = [self.template.format(prompt=plain_text(p), response=r, scale=self.scale)
                     for p, r in zip(prompts, responses, strict=True)]
        ratings = torch.arange(1, self.scale + 1, dtype=torch.float32)
        return checked((self.label_probs(questions) @ ratings).tolist(), self.name,
                       len(questions))

    def prefer(self, prompts, first, second) -> list[float]:
        if not self.pairwise:
            a, b = self.score(prompts, first), self.score(prompts, second)
            return [torch.sigmoid(torch.tensor(x - y)).item() for x, y in zip(a, b)]
        refuse_images(prompts, self.name)
        texts = [plain_text(p) for p in prompts]
        asked = [self.template.format(prompt=t, first=a, second=b)
                 for t, a, b in zip(texts, first, second, strict=True)]
        swapped = [self.template.format(prompt=t, first=b, second=a)
                   for t, a, b in zip(texts, first, second)]
        probs = self.label_probs(asked + swapped)[:, 0]
        n = len(asked)
        return ((probs[:n] + 1.0 - probs[n:]) / 2).tolist()
