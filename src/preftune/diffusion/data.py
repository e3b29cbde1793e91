"""Image preference records: (prompt, preferred image, dispreferred image), with optional
per-side captions (DCPO) and scores; for an online objective (SPO), records need only a prompt.

A record is a row of any file ``data.sources`` reads (JSONL, JSON, Parquet, CSV, a saved HF
dataset). An image field holds a path (relative to the data file's folder, or absolute), raw
bytes (a Parquet binary column), an HF ``Image`` value ``{"bytes": ..., "path": ...}``, a
``data:image/...;base64,`` string, or a PIL image. Every image is opened and checked when the
data is read, so a missing or unreadable file stops the run before training, with the data
file, the record and the field named; pixels are decoded again per batch.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.dialogues import map_field
from ..data.records import DataError
from ..data.hub import locate
from ..data.rows import csv_text_columns, read_rows, source_rows

IMAGE_FIELDS = ("chosen", "rejected")
CAPTION_FIELDS = ("chosen_caption", "rejected_caption")
SCORE_FIELDS = ("chosen_score", "rejected_score")  # equal scores: a tie (the step model)


@dataclass
class ImagePair:
    """One preference record. ``chosen``/``rejected`` are image sources as read (see module
    docstring; None in a prompt-only record); ``origin`` is ``file:record N``."""

    index: int
    origin: str
    prompt: str
    chosen: Any
    rejected: Any
    base_dir: str = "."
    chosen_caption: str | None = None
    rejected_caption: str | None = None
    scores: dict = field(default_factory=dict)

    def caption(self, side: str) -> str:
        """The conditioning text of a side: its own caption (DCPO) or else the prompt."""
        return getattr(self, f"{side}_caption") or self.prompt


class DenoiserBatch:
    """What the trainer needs of a denoiser batch, from a subclass's ``_map`` (the batch with
    ``function`` applied to each tensor), ``indices`` and ``real_tokens`` (images: for a
    denoiser a "token" is an image, none of them padding)."""

    def to(self, device, non_blocking: bool = False):
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self):
        return self._map(lambda t: t.pin_memory())

    @property
    def num_examples(self) -> int:
        return len(self.indices)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.ones(self.real_tokens)


def open_image(source: Any, base_dir: str = "."):
    """A PIL image (RGB) from any image source a record may hold; raises ``ValueError`` or
    ``OSError`` that say what is wrong with it."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, dict):  # the HF datasets Image feature as stored in Parquet
        source = source.get("bytes") or source.get("path")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str) and source.startswith("data:image"):
        source = base64.b64decode(source.partition(",")[2])
    if isinstance(source, (bytes, bytearray)):
        handle = io.BytesIO(source)
    elif isinstance(source, str) and source:
        path = source if os.path.isabs(source) else os.path.join(base_dir, source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file {path} " + (
                "is a directory, not an image file" if os.path.isdir(path) else "does not exist"))
        handle = path
    else:
        raise ValueError(f"expected an image path, bytes or a data: URI, got {source!r:.60}")
    image = Image.open(handle)
    image.load()  # decode now: a truncated or corrupt file fails here, not mid-run
    return image.convert("RGB")


def describe_source(source: Any, base_dir: str = ".") -> str:
    """A short description of an image source for ``data inspect``."""
    if isinstance(source, str) and not source.startswith("data:"):
        return source
    if isinstance(source, dict) and source.get("path") and not source.get("bytes"):
        return str(source["path"])
    return f"<{type(source).__name__} image>"


PROMPTS_ONLY = (" (an online objective such as spo samples its own images: a record needs "
                "only its prompt)")

RANKED_HINT = (" (the record is a ranked list of images: train it with objective rank_dpo, "
               "turn the lists into pairs with data.convert: pairs:best_vs_worst, or use the "
               "best-vs-worst pairs.jsonl that `preftune diffusion rank` writes)")


def record_from_row(index: int, origin: str, row: Any, fields: dict, base_dir: str,
                    captions: bool = False, prompts_only: bool = False,
                    rejected: bool = True) -> ImagePair:
    """An ``ImagePair`` from one row, or a ``DataError`` naming the record and the field;
    ``prompts_only``: only the prompt is needed (its images are None); not ``rejected``: the
    rejected image is neither needed nor read (plain denoising of the chosen one)."""
    if not isinstance(row, dict):
        expected = "prompt" if prompts_only else "prompt, chosen, rejected"
        raise DataError(f"{origin}: expected a record (an object with {expected}), got "
                        f"{type(row).__name__}")
    name = {key: fields.get(key, key) for key in ("prompt", *IMAGE_FIELDS, *CAPTION_FIELDS)}
    needed = ("prompt",) if prompts_only else (
        "prompt", *IMAGE_FIELDS[: 2 if rejected else 1], *(CAPTION_FIELDS if captions else ()))
    for key in needed:
        # an empty prompt is allowed: unconditional training, as for classifier-free guidance
        if row.get(name[key]) is None or (key != "prompt" and row[name[key]] == ""):
            why = " (objective dcpo conditions each image on its own caption)" \
                if key in CAPTION_FIELDS else PROMPTS_ONLY if prompts_only else \
                RANKED_HINT if "images" in row else ""
            raise DataError(f"{origin}: field {name[key]!r} ({key}) is missing or empty{why}; "
                            f"present fields: {', '.join(sorted(row))}. Fix the record or map "
                            f"the column with {map_field(key)}.")
    for key in ("prompt", *(CAPTION_FIELDS if captions else ())):
        if not isinstance(row[name[key]], str):
            raise DataError(f"{origin}: field {name[key]!r} ({key}) must be text, got "
                            f"{type(row[name[key]]).__name__}")
    for key in SCORE_FIELDS:  # read as numbers (a tie's label): not dropped when mistyped
        value = row.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(
                value, bool) and math.isfinite(value)):
            raise DataError(f"{origin}: field {key!r} must be a finite number, got {value!r}; "
                            "write it as a number (or remove it).")
    used = set(name.values())
    scores = {key: float(value) for key, value in row.items() if key not in used
              and isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value)}
    if prompts_only:
        return ImagePair(index, origin, row[name["prompt"]], None, None, base_dir, scores=scores)
    return ImagePair(index, origin, row[name["prompt"]], row[name["chosen"]],
                     row[name["rejected"]] if rejected else None, base_dir,
                     row.get(name["chosen_caption"]), row.get(name["rejected_caption"]), scores)


def check_images(pair: ImagePair, fields: dict) -> None:
    """Open both images of ``pair`` now; a ``DataError`` names the record, field and file."""
    for side in IMAGE_FIELDS:
        if getattr(pair, side) is None:  # not read (plain denoising needs no rejected image)
            continue
        try:
            open_image(getattr(pair, side), pair.base_dir)
        except Exception as error:  # PIL raises several types for bad bytes
            raise DataError(f"{pair.origin}: field {fields.get(side, side)!r} ({side}): cannot "
                            f"read the image ({type(error).__name__}: {error}). Check the file "
                            "or bytes; paths are relative to the data file's folder.") from None


def rows_and_folders(paths: str | list[str], fields: dict):
    """(origin, row, folder) of every record of ``paths``: relative image paths of a row start
    at its data file's folder."""
    for path in [paths] if isinstance(paths, str) else paths:
        for folder, origin, row in source_rows(locate(path), csv_text_columns(fields)):
            yield origin, row, str(Path(folder).resolve())


def load_pairs(paths: str | list[str], fields: dict | None = None, captions: bool = False,
               check: bool = True, prompts_only: bool = False,
               rejected: bool = True) -> list[ImagePair]:
    """Every record of ``paths`` as an ``ImagePair`` (images checked unless ``check`` is
    False; ``prompts_only``: records need only a prompt, for an online objective; not
    ``rejected``: a prompt and a chosen image, for plain denoising); an empty source is an
    error."""
    fields = fields or {}
    pairs: list[ImagePair] = []
    for origin, row, base_dir in rows_and_folders(paths, fields):
        pair = record_from_row(len(pairs), origin, row, fields, base_dir, captions,
                               prompts_only, rejected)
        if check and not prompts_only:
            check_images(pair, fields)
        pairs.append(pair)
    if not pairs:
        expected = "a prompt" if prompts_only else "prompt, chosen and rejected images"
        raise DataError(f"{paths}: no records; expected rows with {expected}.")
    return pairs


def image_tensor(source: Any, base_dir: str, resolution: int) -> torch.Tensor:
    """[3, R, R] in [-1, 1]: the image resized (bicubic) to a square of side ``resolution``."""
    from PIL import Image

    image = open_image(source, base_dir)
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = data.reshape(resolution, resolution, 3).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


def tensor_image(pixels: torch.Tensor):
    """[3, H, W] in [-1, 1] -> a PIL RGB image."""
    from PIL import Image

    data = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(data.permute(1, 2, 0).cpu().numpy(), "RGB")


def image_data_kind(path: str, fields: dict | None = None) -> str | None:
    """"pairs" or "ranked" when the first record of ``path`` holds images to denoise (image
    fields that are not text responses, or a ranked list with ``image_scores``), else None:
    how ``preftune data inspect`` tells image preference data from text (anything it cannot
    read is left to the text path, which names the problem)."""
    column = {key: (fields or {}).get(key, key) for key in ("prompt", "chosen", "images",
                                                           "image_scores")}
    try:
        _, row = next(iter(read_rows(path, csv_text_columns(fields))))
    except Exception:  # unreadable or empty here: the text path reports it
        return None
    if not isinstance(row, dict):
        return None
    if isinstance(row.get(column["images"]), list) and column["image_scores"] in row:
        return "ranked"
    from PIL import Image

    value = row.get(column["chosen"])
    if isinstance(value, (bytes, dict, Image.Image)) or (isinstance(value, str) and (
            value.startswith("data:image") or os.path.splitext(value)[1].lower()
            in Image.registered_extensions())):  # (a saved dataset's Image column: PIL)
        return "pairs"
    return None


def inspect_image_data(path: str, example: int | None = None,
                       fields: dict | None = None) -> str | None:
    """What ``preftune data inspect`` prints for images to denoise (pairs, or RankDPO's ranked
    lists), or None when ``path`` holds text data; ``fields`` renames columns (data.fields)."""
    kind = image_data_kind(path, fields)
    if kind == "ranked":
        from .ranked import inspect_ranked

        return inspect_ranked(path, example, fields)
    return inspect_pairs(path, example, fields) if kind == "pairs" else None


def inspect_pairs(path: str, example: int | None = None, fields: dict | None = None) -> str:
    """What ``preftune data inspect`` prints for image preference data: counts, then each
    shown record's prompt, both images (source and size), captions and scores."""
    fields = fields or {}
    _, first = next(iter(read_rows(path, csv_text_columns(fields))))
    paired = fields.get("rejected", "rejected") in first  # else captioned images, to denoise
    pairs = load_pairs(path, fields, rejected=paired)
    shown = [p for p in pairs if p.index == example] if example is not None else pairs[:3]
    if example is not None and not shown:
        raise DataError(f"record {example} of {path} does not exist ({len(pairs)} records)")
    kind = ("image preference pairs (prompt, chosen image, rejected image)" if paired else
            "captioned images (prompt, chosen image; no rejected image: for denoising)")
    lines = [f"{path}: {len(pairs)} {kind}; every image opened and readable",
             f"captions per side: {sum(bool(p.chosen_caption) for p in pairs)} records; "
             f"numeric fields: {', '.join(sorted({k for p in pairs for k in p.scores})) or 'none'}"]
    for pair in shown:
        lines += ["", f"record {pair.index} ({pair.origin})", f"  prompt:   {pair.prompt}"]
        for side in IMAGE_FIELDS[: 2 if paired else 1]:
            source = getattr(pair, side)
            width, height = open_image(source, pair.base_dir).size
            caption = getattr(pair, f"{side}_caption")
            lines.append(f"  {side + ':':<9} {describe_source(source)} ({width}x{height})"
                         + (f"  caption: {caption}" if caption else ""))
        if pair.scores:
            lines.append("  scores:   " + ", ".join(f"{k}={v:g}" for k, v in pair.scores.items()))
    return "\n".join(lines)


def records_fingerprint(records) -> str:
    """SHA-256 over image records in order (prompts, images by path, bytes' hash or size,
    scores, captions): what a resumed run checks it trains on (``check_same_data``)."""
    digest = hashlib.sha256()
    for record in records:
        for name, value in sorted(vars(record).items()):
            if isinstance(value, (bytes, bytearray)):
                value = hashlib.sha256(value).hexdigest()
            elif hasattr(value, "size") and hasattr(value, "convert"):  # a PIL image
                value = ("PIL", value.size, value.mode)
            digest.update(f"{name}={value!r};".encode())
    return digest.hexdigest()
