"""Encoder (BERT-style) reward models: a prompt and a response as one text pair.

A cross-encoder reads ``[CLS] prompt [SEP] response [SEP]`` with token types 0 and 1 and scores
the pooled [CLS] state, exactly what ``AutoModelForSequenceClassification`` does with
``tokenizer(prompt, response)``. The prompt cannot be shared between responses here: every token
attends to every other, so the prompt's states depend on the response. Encoders therefore use
the padded layout, one row per (prompt, response).
"""

from __future__ import annotations

import torch

from ..data.layout import collate
from ..data.records import DataError, plain_text
from ..data.tokenize import TokenizedExample, TokenizeReport, TokenizeSettings


def encoder_examples(records, tokenizer, settings: TokenizeSettings, keep_empty: bool = False,
                     skipped: list | None = None):
    """Records -> examples whose prompt is ``[CLS] prompt [SEP]`` and whose responses are
    ``response [SEP]``. Truncation keeps the end of the prompt and the start of the response.
    Empty responses are dropped unless ``keep_empty`` (then they are ``[SEP]`` alone); with a
    ``skipped`` list a joint pair is left out and said there, else refused."""
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise DataError("this encoder's tokenizer has no [CLS]/[SEP] tokens, which a "
                        "cross-encoder reward model needs; use a BERT-style encoder or a decoder.")
    report = TokenizeReport(records=len(records))
    examples = []
    for index, record in enumerate(records):
        if any(prompt != record.prompts[0] for prompt in record.prompts):
            problem = (f"{record.origin}: a joint pair (one prompt per side) cannot be scored "
                       "by an encoder reward model, whose inputs are one prompt and one "
                       "response; use a decoder backbone or ordinary pairs.")
            if skipped is None:
                raise DataError(problem)
            skipped.append(problem)
            continue
        responses = [plain_text(r) for r in record.responses]
        if any(not text.strip() for text in responses):
            report.count("empty_responses", record.origin)
            if not keep_empty:
                continue
        prompt = tokenizer(plain_text(record.prompts[0]), add_special_tokens=False)["input_ids"]
        # room for the prompt's own tokens: [CLS], [SEP] and one response token plus [SEP] stay
        room = max(0, min(settings.max_prompt_length or settings.max_length,
                          settings.max_length - 4))
        truncated_prompt = len(prompt) > room
        prompt = [cls_id] + (prompt[-room:] if room else []) + [sep_id]
        replies, truncated_response = [], False
        for text in responses:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            keep = settings.max_length - len(prompt) - 1
            if keep < 1:
                break
            truncated_response |= len(ids) > keep
            replies.append(ids[:keep] + [sep_id])
        if len(replies) < len(responses):
            report.count("dropped_too_long", record.origin)
            continue
        report.prompt_truncated += truncated_prompt
        report.response_truncated += truncated_response
        examples.append(TokenizedExample(prompt, replies, index, record.origin,
                                         record.side_data(), truncated_prompt,
                                         truncated_response))
    report.kept = len(examples)
    return examples, report


def collate_encoder(examples: list[TokenizedExample], pad_token_id: int):
    """Padded rows, one per (example, response), with BERT token types (1 on the response)."""
    batch = collate(examples, pad_token_id, "padded")
    per_example = batch.responses_per_example
    token_types = torch.zeros_like(batch.input_ids)
    for row in range(token_types.shape[0]):
        example = examples[row // per_example]
        end = len(example.prompt_ids) + len(example.response_ids[row % per_example])
        token_types[row, len(example.prompt_ids):end] = 1
    batch.token_type_ids = token_types
    return batch
