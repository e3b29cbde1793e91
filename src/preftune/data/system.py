"""A record's system prompt: a ``system`` column (Intel/orca_dpo_pairs and many instruction
sets carry one; ``data.fields.system`` names another column) becomes the first message of the
prompt, written by the model's chat template like any conversation. A string prompt becomes
``[system, user]`` messages; a message-list prompt gets the system message in front. An
empty system value adds no message but still makes the prompt a conversation, so every
record of a file is written the same way; a file's records either all have the column or none
does. One reward model conditioned on system prompts (InternLM2's COOL RLHF, which judges
helpfulness and harmlessness under different system prompts) trains from such records.
"""

from __future__ import annotations

from dataclasses import replace

from .records import DataError, JointPair, describe


def with_system(prompt, row: dict, column: str, origin: str):
    """``prompt`` with the row's system prompt in front (unchanged when the row has no
    ``column``)."""
    if column not in row:
        return prompt
    value = "" if row[column] is None else row[column]
    if not isinstance(value, str):
        raise DataError(f"{origin}: field {column!r} (system) is {describe(value)}; a system "
                        "prompt is a string (empty for none).")
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        raise DataError(f"{origin}: field {column!r} (system) and the prompt's own system "
                        "message both set the system prompt; keep one of them.")
    return ([{"role": "system", "content": value}] if value.strip() else []) + list(messages)


def attach_system(record, row: dict, columns: dict, origin: str, implicit: bool):
    """``record`` with its prompt(s) carrying the row's system prompt."""
    column = columns["system"]
    if column not in row:
        return record
    if implicit and not record.is_conversational:
        raise DataError(f"{origin}: field {column!r} (system) with '\\n\\nHuman: ...' "
                        "dialogues: their prompt is raw text, not a conversation a system "
                        "message can open. Give message lists, or leave the system prompt "
                        "out.")
    if getattr(record, "images", ()) and not record.is_conversational:
        raise DataError(f"{origin}: field {column!r} (system) with images and a string prompt: "
                        "write the prompt as chat messages with image parts ([{\"role\": "
                        "\"user\", \"content\": [{\"type\": \"image\"}, ...]}]) to add a "
                        "system prompt.")
    if isinstance(record, JointPair):
        return replace(record, chosen_prompt=with_system(record.chosen_prompt, row, column,
                                                         origin),
                       rejected_prompt=with_system(record.rejected_prompt, row, column, origin))
    return replace(record, prompt=with_system(record.prompt, row, column, origin))


def check_same_system(row: dict, first_row: dict, columns: dict, origin: str) -> None:
    """Every record of a file has the system column, or none has (so every prompt is written
    the same way: as a conversation, or as it is)."""
    column = columns["system"]
    if (column in row) != (column in first_row):
        state = ("is missing, but the first record has one" if column not in row
                 else "is set, but the first record has none")
        raise DataError(f"{origin}: field {column!r} (system) {state}. Every record of a file "
                        "has a system prompt or none does (an empty string for none).")
