"""Images in preference records (vision-language data): references, reading and checking.

A record's ``images`` are the images its prompt shows, in placeholder order; ``negative_images``
(optional, same count) are images under which the chosen answer should be *less* likely (mDPO's
corrupted image, Re-Align's retrieved look-alike). Each is an ``ImageRef``: a file path (relative
paths are resolved against the data file's folder), encoded bytes (an HF ``Image`` column,
``{"bytes": ..., "path": ...}``, or a ``data:image/...;base64,`` string), or an in-memory PIL
image. Nothing is decoded while reading a
file except to check it; pixels are produced when a batch is built.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import Any

from .records import DataError

IMAGE_FIELDS = ("images", "negative_images")  # canonical record fields that hold images
SINGLE_IMAGE_FIELDS = {"image": "images"}  # a one-image column read as the list field
PLACEHOLDER = "<image>"  # where an image goes in a plain-string prompt


@dataclass(frozen=True)
class ImageRef:
    """One image of a record: a path, encoded bytes or a PIL image, plus where it came from
    (``origin`` and ``where``, e.g. ``field 'images', item 0``) for error messages."""

    path: str | None = None
    data: bytes | None = None
    pil: Any = field(default=None, compare=False, hash=False)
    origin: str = ""
    where: str = ""

    def load(self):
        """The image as an RGB ``PIL.Image``; a clear error for a missing or unreadable one."""
        from PIL import Image, UnidentifiedImageError

        if self.pil is not None:
            return self.pil.convert("RGB")
        try:
            source = io.BytesIO(self.data) if self.data is not None else self.path
            with Image.open(source) as image:
                return image.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"{self.origin}: {self.where}: image file {self.path!r} does not "
                            "exist; fix the path (relative paths start at the data file's "
                            "folder).") from None
        except Image.DecompressionBombError as error:  # (PIL's guard against huge images)
            what = f"file {self.path!r}" if self.data is None else "the bytes given"
            raise DataError(f"{self.origin}: {self.where}: {what} is larger than PIL opens "
                            f"({error}); downscale the image, or raise PIL.Image.MAX_IMAGE_PIXELS "
                            "in your own code if it is meant.") from None
        except (UnidentifiedImageError, OSError, ValueError) as error:
            what = f"file {self.path!r}" if self.data is None else "the bytes given"
            raise DataError(f"{self.origin}: {self.where}: {what} is not a readable image "
                            f"({error}); replace it with a PNG, JPEG or WebP image.") from None

    @functools.cached_property
    def key(self) -> str:
        """A content hash: the same pixels give the same key wherever they came from."""
        digest = hashlib.sha256()
        if self.data is not None:
            digest.update(self.data)
        elif self.pil is not None:
            image = self.pil.convert("RGB")
            digest.update(repr(image.size).encode())
            digest.update(image.tobytes())
        else:
            try:
                with open(self.path, "rb") as handle:
                    digest.update(handle.read())
            except OSError:
                self.load()  # raises the readable error
        return digest.hexdigest()[:32]

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        if self.data is not None:
            return f"<{len(self.data)} bytes>"
        return f"<PIL {self.pil.size[0]}x{self.pil.size[1]}>"


def image_ref(value: Any, origin: str, where: str, base_dir: str = "") -> ImageRef:
    """One image value from a data row -> an ``ImageRef``; a missing file is an error here."""
    if isinstance(value, dict):  # an HF datasets Image column without decoding
        data = value.get("bytes")
        if isinstance(data, (bytes, bytearray)):
            return ImageRef(data=bytes(data), origin=origin, where=where)
        if data is not None:  # JSON holds no bytes: base64 or other text lands here
            raise DataError(f"{origin}: {where}: 'bytes' holds a {type(data).__name__}, not "
                            "encoded image bytes (JSON cannot hold bytes); give the image as "
                            "a file path, or keep the bytes in a Parquet file or a saved "
                            "dataset.")
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value), origin=origin, where=where)
    if isinstance(value, str) and value.startswith("data:image/"):  # a data URI, base64
        header, _, encoded = value.partition(",")
        try:
            if not header.endswith(";base64"):
                raise ValueError("not base64")
            return ImageRef(data=base64.b64decode(encoded, validate=True), origin=origin,
                            where=where)
        except (ValueError, binascii.Error):
            raise DataError(f"{origin}: {where}: a data URI that is not base64 image data "
                            f"({value[:40]!r}...); give 'data:image/png;base64,...' or a file "
                            "path.") from None
    if isinstance(value, str) and value.startswith(("http://", "https://", "ftp://", "s3://",
                                                     "gs://")):
        raise DataError(f"{origin}: {where}: {value[:60]!r} is a URL; images are read from "
                        "files, bytes or data: URIs, never downloaded. Download the image and "
                        "give its path.")
    if isinstance(value, str) and value:
        path = value if os.path.isabs(value) else os.path.join(base_dir, value)
        if os.path.isdir(path):
            raise DataError(f"{origin}: {where}: {value!r} is a folder ({path}), not an image "
                            "file; name one image file in it.")
        if not os.path.isfile(path):
            raise DataError(f"{origin}: {where}: image file {value!r} does not exist (looked "
                            f"for {path}); fix the path (relative paths start at the data "
                            "file's folder).")
        return ImageRef(path=path, origin=origin, where=where)
    if hasattr(value, "convert") and hasattr(value, "size"):  # a decoded PIL image
        return ImageRef(pil=value, origin=origin, where=where)
    raise DataError(f"{origin}: {where}: expected an image (a file path, encoded bytes or "
                    f"{{'bytes': ..., 'path': ...}}), got {type(value).__name__} "
                    f"{repr(value)[:40]}.")


def row_images(row: dict, columns: dict, canonical: str, origin: str,
               base_dir: str) -> tuple[ImageRef, ...]:
    """The images of field ``canonical`` (``images`` or ``negative_images``; a single ``image``
    column also fills ``images``), in order; () when the row has none."""
    column = columns.get(canonical, canonical)
    value = row.get(column)
    single = next((name for name, target in SINGLE_IMAGE_FIELDS.items()
                   if target == canonical and row.get(name) is not None), None)
    if value is not None and single is not None:
        raise DataError(f"{origin}: fields {column!r} and {single!r} both give the record's "
                        f"images; give them all in {column!r} (a list), or only one field.")
    if value is None:
        if single is None:
            return ()
        column, value = single, [row[single]]
    if not isinstance(value, (list, tuple)):
        value = [value]
    return tuple(image_ref(item, origin, f"field {column!r}, item {k}", base_dir)
                 for k, item in enumerate(value))


def prompt_part_images(prompt: Any, origin: str, column: str,
                       base_dir: str) -> tuple[list | Any, tuple[ImageRef, ...]]:
    """Images given inline in a message-list prompt (``{"type": "image", "image": PATH}``
    parts): returns the prompt with bare ``{"type": "image"}`` parts and the images, in order."""
    if not isinstance(prompt, list):
        return prompt, ()
    found, messages = [], []
    for m, message in enumerate(prompt):
        content = message.get("content")
        if not isinstance(content, list):
            messages.append(message)
            continue
        parts = []
        for p, part in enumerate(content):
            inline = next((part[k] for k in ("image", "path", "url") if part.get(k)), None) \
                if isinstance(part, dict) and part.get("type") == "image" else None
            if inline is not None:
                where = f"field {column!r}, message {m}, part {p}"
                found.append(image_ref(inline, origin, where, base_dir))
                part = {"type": "image"}
            parts.append(part)
        messages.append({**message, "content": parts})
    return messages, tuple(found)


def count_placeholders(prompt: Any) -> int:
    """How many images a prompt asks for: ``<image>`` in strings, ``{"type": "image"}`` parts."""
    if isinstance(prompt, str):
        return prompt.count(PLACEHOLDER)
    count = 0
    for message in prompt:
        content = message.get("content")
        if isinstance(content, list):
            count += sum(isinstance(p, dict) and p.get("type") == "image" for p in content)
        elif isinstance(content, str):
            count += content.count(PLACEHOLDER)
    return count


def _placeholders_as_parts(prompt: Any) -> Any:
    """A message-list prompt whose text holds ``<image>`` with each placeholder made an image
    part, where the chat template puts the model's image tokens (it would write the text)."""
    if not isinstance(prompt, list):
        return prompt
    messages = []
    for message in prompt:
        content = message.get("content")
        if isinstance(content, str) and PLACEHOLDER in content:
            pieces = content.split(PLACEHOLDER)
            parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
            for piece in pieces[1:]:
                parts += [{"type": "image"}] + ([{"type": "text", "text": piece}] if piece else [])
            message = {**message, "content": parts}
        messages.append(message)
    return messages


def with_placeholders(prompt: Any, images: int) -> Any:
    """A prompt without placeholders gets one per image before its first user text (the common
    layout of VQA data); a prompt with placeholders is returned as it is."""
    if images == 0 or count_placeholders(prompt) > 0:
        return prompt
    if isinstance(prompt, str):
        return PLACEHOLDER * images + prompt
    messages = [dict(m) for m in prompt]
    first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), 0)
    text = messages[first]["content"]
    parts = text if isinstance(text, list) else [{"type": "text", "text": text}]
    messages[first]["content"] = [{"type": "image"}] * images + parts
    return messages


def attach_images(record, row: dict, columns: dict, origin: str, base_dir: str):
    """``record`` with the images of its source ``row``: the ``images`` column (or ``image``),
    images inline in a message-list prompt, and for pairs ``negative_images``. The prompt's
    placeholders must match the image count (a prompt with none gets them put first)."""
    from dataclasses import replace

    prompt_column = columns.get("prompt", "prompt")
    if not hasattr(record, "images"):  # joint pairs: one prompt per side, no images
        if any(row.get(columns.get(name, name)) is not None for name in IMAGE_FIELDS):
            raise DataError(f"{origin}: joint pairs (chosen_prompt/rejected_prompt) cannot carry "
                            "images; give one prompt with the images instead.")
        return record
    prompt, inline = prompt_part_images(record.prompt, origin, prompt_column, base_dir)
    listed = row_images(row, columns, "images", origin, base_dir)
    if inline and listed:
        raise DataError(f"{origin}: images are given both inside field {prompt_column!r} and in "
                        f"field {columns.get('images', 'images')!r}; give them in one place.")
    images = inline or listed
    wanted = count_placeholders(prompt)
    negative = row_images(row, columns, "negative_images", origin, base_dir)
    if negative and not images:
        raise DataError(f"{origin}: field {columns.get('negative_images', 'negative_images')!r} "
                        "gives negative images, but the prompt shows no image (field "
                        f"{columns.get('images', 'images')!r} or image parts): a negative "
                        "stands in for one of the prompt's images. Give the images too.")
    if not images and not (wanted and isinstance(prompt, list)):
        return record
    if images and wanted == 0:
        prompt = with_placeholders(prompt, len(images))
    elif wanted != len(images):
        raise DataError(f"{origin}: field {prompt_column!r} has {wanted} image placeholder(s) "
                        f"({PLACEHOLDER} or {{\"type\": \"image\"}}) but the record has "
                        f"{len(images)} image(s) in field {columns.get('images', 'images')!r}; "
                        "give one placeholder per image, in order.")
    changes = {"prompt": _placeholders_as_parts(prompt), "images": images}
    if negative:
        if record.shape != "pairs":
            raise DataError(f"{origin}: field 'negative_images' applies to pairs only.")
        if len(negative) != len(images):
            raise DataError(f"{origin}: field 'negative_images' has {len(negative)} image(s) but "
                            f"the prompt shows {len(images)}; give one negative per image.")
        changes["negative_images"] = negative
    return replace(record, **changes)


def stored_images(images: tuple, folder) -> list[str]:
    """Absolute paths of ``images`` for a file written elsewhere (round files, scored data): a
    file as it is, bytes or an in-memory image written once to ``folder`` under its content
    key."""
    paths = []
    for image in images:
        if image.path is not None:
            paths.append(os.path.abspath(image.path))
            continue
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, f"{image.key}.png")
        if not os.path.exists(target):
            image.load().save(target)
        paths.append(os.path.abspath(target))
    return paths


def portable_row(row: dict, record, columns: dict, folder) -> dict:
    """A data row, as read, for a file written elsewhere (``rm score``'s output): its images
    (paths relative to the data file, bytes, inline prompt parts) listed in its images column
    as absolute paths, bytes saved once under ``folder``; a row without images as it is."""
    images, negative = (getattr(record, name, ()) for name in IMAGE_FIELDS)
    if not images and not negative:
        return row
    dropped = {columns.get(name, name) for name in IMAGE_FIELDS} | set(SINGLE_IMAGE_FIELDS)
    out = {key: value for key, value in row.items() if key not in dropped}
    prompt_column = columns.get("prompt", "prompt")
    if isinstance(out.get(prompt_column), list):  # inline parts: their images are listed now
        out[prompt_column] = [_bare_image_parts(message) for message in out[prompt_column]]
    out[columns.get("images", "images")] = stored_images(images, folder)
    if negative:
        out[columns.get("negative_images", "negative_images")] = stored_images(negative, folder)
    return out


def _bare_image_parts(message: dict) -> dict:
    """A message whose image parts are bare ``{"type": "image"}`` placeholders."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    return {**message, "content": [{"type": "image"} if isinstance(part, dict) and
                                   part.get("type") == "image" else part for part in content]}
