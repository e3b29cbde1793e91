"""Human-readable views of loaded and tokenized data (backs ``preftune data inspect``)."""

from __future__ import annotations

from typing import Sequence

from .tokenize import TokenizedExample, TokenizeReport

BOUNDARY = "──── prompt | response ────"
OWN_PROMPT = "──── shared prompt | own prompt (scored) ────"  # joint pairs only
CONTEXT_TOKENS = 3  # prompt tokens shown again before the boundary of the second response on


def inspect_report(records: Sequence, examples: Sequence[TokenizedExample],
                   report: TokenizeReport, detected: dict | None = None) -> str:
    """A summary of what was read, kept, dropped and truncated, with length statistics;
    ``detected`` (from ``load_records``) says where the rows came from and the layout found."""
    lines = []
    if detected:
        lines += [_row("source", detected["source"]), _row("layout", detected["layout"]),
                  _row("  why", detected["why"])]
    lines.append(_row("records read", report.records))
    if records:
        kind = "conversational" if records[0].is_conversational else "plain text"
        lines.append(_row("prompt kind", kind))
        lines.append(_row("first record", getattr(records[0], "origin", "") or "-"))
    share = f"  ({100 * report.kept / report.records:.1f}%)" if report.records else ""
    lines.append(_row("kept", f"{report.kept}{share}"))
    lines.append(_row("dropped", report.records - report.kept))
    for label, key, why in (
        ("empty response", "empty_responses", "a response is empty or whitespace"),
        ("empty prompt", "empty_prompts", "the prompt has no tokens"),
        ("too long", "dropped_too_long", "no response token fits max_length"),
    ):
        if getattr(report, key):
            lines.append(_row("  " + label, f"{getattr(report, key)}  ({why}){report.e_g(key)}"))
    lines.append(_row("prompt truncated", f"{report.prompt_truncated}  (start cut, end kept)"))
    lines.append(_row("response truncated", f"{report.response_truncated}  (end cut, no eos)"))
    lines.append(_row("identical pairs", f"{report.identical_responses}  (chosen == rejected, "
                                         f"kept){report.e_g('identical_responses')}"))
    if report.images or report.dropped_image_cut:
        lines.append(_row("images", f"{report.images} in kept prompts"))
        if report.dropped_image_cut:
            lines.append(_row("  cut", f"{report.dropped_image_cut}  (dropped: the prompt limit "
                                       "would cut an image's tokens; raise max_prompt_length)"))
    if report.joint_pairs:
        lines.append(_row("joint pairs", f"{report.joint_pairs}  (two different prompts; each "
                                         f"side's own prompt is scored)"))
    # encoding prompt+response as one text is what a naive pipeline does; these ids never merge
    lines.append(_row("boundary merges", f"{report.boundary_merges}  (records whose prompt "
                                         f"and response as one text merge a token across "
                                         f"them; encoded apart)"))
    if examples:
        prompt_lengths = [len(ex.prompt_ids) for ex in examples]
        response_lengths = [len(ids) for ex in examples for ids in ex.response_ids]
        lines.append(_row("tokens", "min / mean / max"))
        lines.append(_row("  prompt", _stats(prompt_lengths)))
        lines.append(_row("  response", _stats(response_lengths)))
        score_names = sorted({name for ex in examples for name in ex.scores})
        if score_names:
            lines.append(_row("scores", ", ".join(score_names)))
            lines += _missing_scores(examples, score_names)
    return "\n".join(lines)


def _missing_scores(examples: Sequence[TokenizedExample], names: list[str]) -> list[str]:
    """A line per numeric field that some kept records lack (absent, or text that is no
    number): training that reads the field refuses those records."""
    lines = []
    for name in names:
        lacking = [ex for ex in examples if name not in ex.scores]
        if lacking:
            first = lacking[0].origin or f"example {lacking[0].index}"
            lines.append(_row(f"  no {name}", f"{len(lacking)}  (absent or not a number, "
                                              f"first {first}; a loss or head that reads "
                                              f"{name} refuses them)"))
    return lines


def render_example(example: TokenizedExample, tokenizer, record) -> str:
    """One example token by token (position, id, text), with the prompt/response boundary;
    each response named as its ``record`` (the source record) holds it.

    For a joint pair each side shows the shared prompt, then its own prompt (scored with the
    response), then its response.
    """
    names = _slot_names(record, len(example.response_ids))
    flags = [name for name, on in (("prompt truncated", example.prompt_truncated),
                                   ("response truncated", example.response_truncated)) if on]
    header = f"example {example.index}" + (f" ({example.origin})" if example.origin else "")
    lines = [header + (f"  [{', '.join(flags)}]" if flags else "")]
    if example.scores:
        lines.append("scores: " + ", ".join(f"{k}={v}" for k, v in sorted(example.scores.items())))
    for k, (image, count) in enumerate(zip(example.images, example.image_token_counts)):
        lines.append(f"image {k}: {image.describe()}  ({count} image tokens)")
    for k, image in enumerate(example.negative_images):
        lines.append(f"negative image {k}: {image.describe()}  (chosen should be less likely)")
    prompt = example.prompt_ids
    own_lengths = example.own_prompt_lengths or [0] * len(example.response_ids)
    for number, (name, response) in enumerate(zip(names, example.response_ids)):
        own = own_lengths[number]
        lines.append("")
        if example.own_prompt_lengths:
            lines.append(f"{name}: {len(prompt)} shared prompt + {own} own prompt + "
                         f"{len(response) - own} response tokens")
        else:
            lines.append(f"{name}: {len(prompt)} prompt + {len(response)} response tokens")
        if example.response_masks and not all(example.response_masks[number]):
            left_out = sum(not keep for keep in example.response_masks[number])
            lines.append(f"  ({left_out} of them tool output, marked '(not scored)': context, "
                         "left out of the loss; data.mask_roles)")
        shown_from = 0
        if number > 0 and len(prompt) > CONTEXT_TOKENS:
            # the prompt is the same for every response; show only the tokens before the cut
            # (an image's run of tokens whole, as its one line)
            shown_from = _run_start(prompt, len(prompt) - CONTEXT_TOKENS, tokenizer)
            if shown_from:
                lines.append(f"  ... {shown_from} prompt tokens as above")
        lines += _prompt_lines(prompt, shown_from, tokenizer)
        tokens = [_token_line(len(prompt) + p, t, tokenizer) for p, t in enumerate(response)]
        if example.response_masks:
            tokens = [line if keep else f"{line}  (not scored)"
                      for line, keep in zip(tokens, example.response_masks[number])]
        if example.own_prompt_lengths:
            lines += [OWN_PROMPT, *tokens[:own]]
        lines += [BOUNDARY, *tokens[own:]]
    return "\n".join(lines)


def _slot_names(record, slots: int) -> list[str]:
    """What each response of a record is: a pair's chosen, rejected and gold, an unpaired
    completion's label, a ranked list's or a rated response's scores."""
    shape = getattr(record, "shape", None)
    if shape == "pairs":
        return ["chosen", "rejected", "gold"][:slots]
    if shape == "unpaired":
        return [f"completion ({'desirable' if record.label else 'undesirable'})"]
    if shape == "ranked":
        return [f"response {i} (score {score:g})" for i, score in enumerate(
            record.response_scores)]
    if shape == "rated":
        return ["response"]
    return [f"response {i}" for i in range(slots)]


def _prompt_lines(prompt: list, shown_from: int, tokenizer) -> list[str]:
    """Prompt tokens one per line, a run of image tokens as one line that says which image."""
    images = getattr(tokenizer, "image_inputs", None)
    image_token = images.image_token_id if images is not None else None
    lines, run, image = [], [], 0
    for position, token in enumerate(prompt):
        if token == image_token:
            run.append(position)
            if position + 1 < len(prompt) and prompt[position + 1] == image_token:
                continue
            if run[-1] >= shown_from:
                text = f"{images.image_token!r} x{len(run)}"
                span = f"{run[0]}-{run[-1]}"
                lines.append(f"{span:>6} {token:>8}  {text}  <- image {image}")
            run, image = [], image + 1
        elif position >= shown_from:
            lines.append(_token_line(position, token, tokenizer))
    return lines


def _run_start(prompt: list, position: int, tokenizer) -> int:
    """``position``, or the first position of the run of image tokens it falls inside."""
    images = getattr(tokenizer, "image_inputs", None)
    if images is not None:
        while position > 0 and prompt[position - 1] == prompt[position] == images.image_token_id:
            position -= 1
    return position


def _token_line(position: int, token_id: int, tokenizer) -> str:
    text = tokenizer.decode([token_id])
    marks = []
    if token_id == tokenizer.eos_token_id:
        marks.append("eos")
    if token_id == getattr(tokenizer, "bos_token_id", None):
        marks.append("bos")
    suffix = f"  <- {', '.join(marks)}" if marks else ""
    return f"{position:>6} {token_id:>8}  {text!r}{suffix}"


def _stats(values: list[int]) -> str:
    return f"{min(values)} / {sum(values) / len(values):.1f} / {max(values)}"


def _row(label: str, value) -> str:
    return f"{label:<20}{value}"


def prompts_only(path: str, fields: dict | None = None) -> bool:
    """True when the first row of ``path`` has a prompt and no response field: the prompts
    files that ``preftune online`` and the diffusion ``spo`` objective sample from."""
    from .rows import csv_text_columns, read_rows
    from .shapes import TEXT_FIELDS

    column = {key: (fields or {}).get(key, key) for key in
              (*TEXT_FIELDS, "completions", "scores", "ranks", "label")}
    try:
        _, row = next(iter(read_rows(path, csv_text_columns(fields))))
    except Exception:  # unreadable or empty here: the records path reports it
        return False
    responses = set(column.values()) - {column["prompt"]}
    return isinstance(row, dict) and column["prompt"] in row and not responses & set(row)


def inspect_prompts(path: str, tokenizer, settings, example: int | None = None,
                    fields: dict | None = None) -> str:
    """What ``preftune data inspect`` prints for a prompts file: counts, distinct prompts,
    rendered token lengths and a few prompts, each read as ``preftune online`` reads it
    (its system message, tools and images) and rendered as training and generation render
    it."""
    from ..generation import prompt_examples
    from ..online.common import read_prompts
    from .records import DataError
    from .rows import csv_text_columns, read_rows

    fields = fields or {}
    read = list(read_rows(path, csv_text_columns(fields)))
    prompts = read_prompts(path, fields, "a prompts file holds one prompt per record",
                           "--column prompt=COLUMN")
    lengths = [len(ex.prompt_ids) for ex in prompt_examples(
        [p.prompt for p in prompts], tokenizer, settings, images=[p.images for p in prompts],
        tools=[p.tools for p in prompts], origins=[p.origin for p in prompts])]
    lines = [_row("source", path),
             _row("layout", "prompts (a prompt per record, no responses: what `preftune "
                  "online` and the diffusion objective spo sample from)"),
             _row("records", len(read)),
             _row("distinct prompts", f"{len(prompts)} (each is sampled once per round)"),
             _row("prompt tokens", f"{_stats(lengths)} (min / mean / max, rendered)")]
    known = {fields.get(key, key) for key in ("prompt", "system", "tools", "images", "image")}
    unread = [key for key in read[0][1] if key not in known] if read else []
    if unread:  # responses under names preftune does not know would be missed silently
        lines.append(_row("not read", f"{', '.join(unread)} (if a column holds responses, "
                                      "name it with --column, e.g. responses=COLUMN)"))
    if example is not None and not 0 <= example < len(prompts):
        raise DataError(f"prompt {example} of {path} does not exist ({len(prompts)} distinct "
                        "prompts)")
    shown = [example] if example is not None else range(min(3, len(prompts)))
    for k in shown:
        images = f", {len(prompts[k].images)} image(s)" if prompts[k].images else ""
        lines += ["", f"prompt {k} ({prompts[k].origin}), {lengths[k]} tokens{images}",
                  f"  {prompts[k].prompt!r}"]
    return "\n".join(lines)
