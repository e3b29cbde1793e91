"""A prompt's image tokens: each image's tokens put in the prompt by the model's processor
(``tokenizer.image_inputs``), and the checks that the prompt and its images agree."""

from __future__ import annotations

from .images import count_placeholders
from .records import DataError


def check_no_image_tokens(prompts: list, record, tokenizer) -> None:
    """A record without images whose prompt holds the model's image token, or the ``<image>``
    placeholder (which a vision-language model's own token may not be), would leave it
    without an image."""
    images = getattr(tokenizer, "image_inputs", None)
    if images is None:  # a text-only model: "<image>" is text like any
        return
    if (any(images.image_token_id in ids for ids in prompts)
            or count_placeholders(getattr(record, "prompt", ""))):
        raise DataError(f"{record.origin}: field 'prompt' holds an image placeholder but the "
                        "record has no images; give them in field 'images' (one per "
                        "placeholder, in order) or remove the placeholder.")


def check_no_response_images(responses: list, record, tokenizer) -> None:
    """A response holding the model's image token (``<image>`` in its text, or an image part
    that the chat template wrote) would train that token with no image behind it."""
    images = getattr(tokenizer, "image_inputs", None)
    if images is not None and any(images.image_token_id in ids for ids in responses):
        raise DataError(f"{record.origin}: a response holds the model's image token "
                        f"{images.image_token!r}; images go in the prompt only (a response "
                        "cannot show one). Move the image into the prompt or remove it.")


def image_inputs(tokenizer, record):
    """The model's image processing (``tokenizer.image_inputs``), which a record with images
    needs."""
    images = getattr(tokenizer, "image_inputs", None)
    if images is None:
        raise DataError(f"{record.origin}: the record has images but the model is text-only (its "
                        "tokenizer has no image processor). Use a vision-language model directory "
                        "with its processor files, or leave the images out.")
    return images


def with_image_tokens(prompt_ids: list, record, tokenizer) -> tuple[list, list]:
    """The prompt with its images' tokens; negative images must give the very same tokens
    (same size), since they are scored in the prompt's place."""
    images = image_inputs(tokenizer, record)
    expanded, counts = images.expand(prompt_ids, record.images, record.origin)
    negative = getattr(record, "negative_images", ())
    if negative and images.expand(prompt_ids, negative, record.origin)[0] != expanded:
        raise DataError(f"{record.origin}: field 'negative_images': the negative images give "
                        "different image tokens than field 'images' (a different size); make "
                        "each negative image the size of the image it stands in for.")
    return expanded, counts
