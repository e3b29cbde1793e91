"""Relevance pairs, the second axiom of Axiomatic Preference Modeling (Rosset et al.,
"Axiomatic Preference Modeling for Longform Question Answering", arXiv:2312.02206): an answer
to the question asked is better than a good answer to a related but different question.

A reward model trained only on answers to the same question can learn to like fluent,
thorough text whatever was asked. These pairs teach it to read the question: for each prompt
of a file, its best answer (a pair's chosen, a list's top-scored response, a desirable
completion, a rated response) is chosen, and the best answer of the most similar *other*
prompt is rejected, similarity being the cosine of the prompts' sentence embeddings
(all-MiniLM-L6-v2 by default). A neighbour above ``max_similarity`` is passed over as a
near-duplicate question (its answer may be right here too); below ``min_similarity`` there is
no related question, and the prompt makes no pair. The paper's other axioms need an LLM to
write answers (groundedness, truthfulness, thoroughness) or votes (usefulness: a list of
answers with their votes is already pairs by ``data.convert``); they are not built here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .records import DataError, Pair, Ranked, Rated, Unpaired, plain_text, response_text


@dataclass(frozen=True)
class RelevanceSettings:
    min_similarity: float = 0.3  # below: no related question
    max_similarity: float = 0.95  # above: the same question asked again
    encoder: str = "minilm"


def best_answers(records) -> list[tuple[str, object, object]]:
    """(origin, prompt, its best answer) of each distinct prompt, in file order: of a prompt's
    records, the best-rated answer (rated responses: the mean of their ratings; ranked lists:
    the top score), else the first; prompts without a good answer (only undesirable
    completions) are left out."""
    found: dict = {}
    for record in records:
        if getattr(record, "images", ()):
            raise DataError(f"{record.origin}: the record shows images, and relevance pairs "
                            "compare questions by their text alone (an answer about another "
                            "image is no answer to the question asked here); build them from "
                            "text records.")
        answer, score = _best(record)
        key = json.dumps(record.prompt, sort_keys=True)
        if answer is not None and (key not in found or (
                score is not None and found[key][1] is not None and score > found[key][1])):
            found[key] = ((record.origin, record.prompt, answer), score)
    return [entry for entry, _ in found.values()]


def _best(record) -> tuple:
    """A record's good answer and its score (None where the record's shape has none)."""
    if isinstance(record, Pair):
        return record.chosen, None
    if isinstance(record, Ranked):
        top = max(record.response_scores)
        return record.responses[record.response_scores.index(top)], top
    if isinstance(record, Unpaired):
        return (record.completion if record.label else None), None
    if isinstance(record, Rated):
        return record.response, sum(record.scores.values()) / max(len(record.scores), 1)
    return None, None  # a joint pair has no one prompt


def question_text(prompt) -> str:
    """What is asked: a text prompt, or a conversation's user turns (a system prompt shared by
    every record would make all questions look alike to the encoder)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(response_text([m]) for m in prompt if m.get("role") == "user")


def pair_with_neighbours(answers: list, vectors: torch.Tensor,
                    settings: RelevanceSettings) -> tuple[list[dict], dict]:
    """The pairs of ``answers`` given unit embeddings of their prompts ([prompts, D]), and the
    counts of prompts passed over."""
    similarity = vectors @ vectors.T
    similarity.fill_diagonal_(-2.0)
    counts = {"prompts": len(answers), "unmatched": 0, "pairs": 0}
    rows = []
    texts = [response_text(answer) for _, _, answer in answers]
    for i, (origin, prompt, answer) in enumerate(answers):
        # a neighbour whose answer is this one's (the same words) would make no preference
        same = torch.tensor([text == texts[i] for text in texts])
        allowed = similarity[i].masked_fill((similarity[i] > settings.max_similarity) | same,
                                            -2.0)
        j = int(allowed.argmax())
        if float(allowed[j]) < settings.min_similarity:
            counts["unmatched"] += 1
            continue
        other_origin, _, other = answers[j]
        rows.append({"prompt": prompt, "chosen": answer, "rejected": _as_reply(prompt, other),
                     "similarity": round(float(allowed[j]), 6), "axiom": "relevance",
                     "source": f"{origin} vs {other_origin}"})
    counts["pairs"] = len(rows)
    return rows, counts


def _as_reply(prompt, answer):
    """``answer`` in the format of answers to ``prompt``: an assistant turn after a chat
    prompt, text after a text prompt."""
    text = answer[-1].get("content") if isinstance(answer, list) and answer else answer
    text = text if isinstance(text, str) else plain_text(answer)
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def run_relevance(data: str, output: str, settings: RelevanceSettings = RelevanceSettings(),
                  *, fields: dict | None = None, overwrite: bool = False) -> Path:
    """Write the relevance pairs of ``data``'s prompts to ``output``. Returns the file."""
    from accelerate import PartialState

    from ..objectives.udm import SentenceEncoder
    from ..reward.scoring import new_output_file
    from .rows import write_rows
    from .sources import load_records

    if not -1 <= settings.min_similarity < settings.max_similarity <= 1:
        raise DataError(f"--min-similarity {settings.min_similarity} and --max-similarity "
                        f"{settings.max_similarity}: give -1 <= min < max <= 1.")
    target = new_output_file(output, data, overwrite)
    answers = best_answers(load_records(data, fields=fields))
    if len(answers) < 2:
        raise DataError(f"{data}: {len(answers)} prompt(s) with a good answer; relevance pairs "
                        "take the answer of another prompt, so give at least 2.")
    encoder = SentenceEncoder(settings.encoder, PartialState().device, "--encoder")
    vectors = encoder([question_text(prompt) for _, prompt, _ in answers])
    rows, counts = pair_with_neighbours(answers, vectors, settings)
    if not rows:  # (an empty file was written, exit 0)
        raise DataError(f"{data}: none of its {counts['prompts']} prompts has another of "
                        f"similarity in [{settings.min_similarity}, {settings.max_similarity}]; "
                        f"nothing was written to {target}. Widen --min-similarity / "
                        "--max-similarity, or give more related prompts.")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_rows(target, rows)
    print(f"{counts['pairs']} relevance pairs from {counts['prompts']} prompts of {data} "
          f"({counts['unmatched']} without another prompt of similarity in "
          f"[{settings.min_similarity}, {settings.max_similarity}]): {target}")
    return target
