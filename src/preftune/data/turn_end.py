"""The token that ends an assistant's turn, which a chat model learns to write and sampling
stops at.

For many chat models it is the tokenizer's EOS (SmolLM2 and Qwen's ``<|im_end|>``). For others
the chat template closes a turn with its own token and EOS means "end of document": Gemma's
``<end_of_turn>``, Phi-3's ``<|end|>``, a Llama-3 base tokenizer's ``<|eot_id|>``. Training
those on ``answer<eos>`` teaches an ending the model never writes in a chat, and sampling that
waits for EOS runs on past the turn into a made-up next one.
"""

from __future__ import annotations

from dataclasses import dataclass

from .records import DataError

MARK = "\u2063preftune-turn-end\u2063"


def turn_end_id(tokenizer, after: str | None = None) -> int:
    """The id the chat template writes right after an assistant message's text (``after``,
    when the caller has it), when that is one special or added token; the tokenizer's EOS
    otherwise (no template, or a template that ends a turn with plain text)."""
    eos = tokenizer.eos_token_id
    after = after_answer(tokenizer) if after is None else after
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        return eos
    marked = set(getattr(tokenizer, "all_special_ids", ())) | set(
        getattr(tokenizer, "added_tokens_decoder", {}))
    # the token's own text, not an unknown-token stand-in for what the template wrote
    written = after.startswith(tokenizer.convert_ids_to_tokens(ids[0]))
    return ids[0] if ids[0] in marked and written else eos


def after_answer(tokenizer) -> str:
    """What the chat template writes after an assistant message's text ("" without a template,
    or with one that wants other roles or content parts)."""
    if not getattr(tokenizer, "chat_template", None):
        return ""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": MARK}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # (templates raise jinja's or their own error types)
        return ""
    if not isinstance(text, str) or MARK not in text:
        return ""
    return text[text.rindex(MARK) + len(MARK):]


def stop_ids(tokenizer) -> list[int]:
    """The ids sampling stops at: EOS and, where it differs, the end of an assistant turn."""
    eos, end = tokenizer.eos_token_id, turn_end_id(tokenizer)
    return [eos] if end == eos else [end, eos]


@dataclass(frozen=True)
class ResponseEnds:
    """How a tokenized response ends: a chat answer (a record whose prompt is messages) with
    the end of an assistant turn, a plain completion with EOS."""

    eos: int
    turn: int
    turn_text: str  # the end of turn as the template writes it
    # what the template writes after an answer when no token ends a turn ("\n\n"): not part
    # of a multi-turn response, which ends with EOS instead
    separator: str = ""

    @classmethod
    def of(cls, tokenizer) -> "ResponseEnds":
        if tokenizer.eos_token_id is None:
            raise DataError(
                "the tokenizer has no eos token, so responses cannot be closed. Set one, e.g. "
                "tokenizer.eos_token = '<|im_end|>' (the token that ends an assistant turn).")
        after = after_answer(tokenizer)  # the template rendered once
        turn = turn_end_id(tokenizer, after)
        text = tokenizer.convert_ids_to_tokens(turn)
        plain = turn == tokenizer.eos_token_id and text not in after  # ("\n\n", not "</s>")
        return cls(tokenizer.eos_token_id, turn, text, after if plain else "")

    def of_record(self, record) -> int:
        return self.turn if record.is_conversational else self.eos
