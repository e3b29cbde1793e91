"""DCPO's two captions per pair (Saeidi et al. 2025, arXiv:2502.06023): ``preftune diffusion
caption`` writes ``chosen_caption`` and ``rejected_caption`` into an image-pair file, for the
``dcpo`` objective.

A preference pair's shared prompt often fits the rejected image about as well as the chosen
one, which weakens the signal. DCPO conditions each image on its own caption instead, made one
of three ways:

- DCPO-c (``--captioner``): a vision-language model captions each image, told the prompt it
  was generated for;
- DCPO-p (``--perturber``): the chosen image keeps the prompt, and a language model rewrites
  the prompt into a semantically different one for the rejected image;
- DCPO-h (both): the rejected image's caption is made, then perturbed.

Answers are greedy (the same file gives the same captions), and the instructions are settable.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ConfigError
from ..data.records import DataError
from ..data.rows import write_rows
from .data import IMAGE_FIELDS, load_pairs, rows_and_folders

CAPTION_INSTRUCTION = ("<image>This image was generated for the prompt: {prompt}\n"
                       "Describe what the image shows in one sentence.")
PERTURB_INSTRUCTION = ("Rewrite this image description so that it describes a different "
                       "image: change one or two of its objects, colours, counts or "
                       "relations, and keep its length and style. Answer with the new "
                       "description only.\nDescription: {text}")


def generate(model_path: str, instructions: list[str], images: list[tuple] | None,
             max_new_tokens: int, batch_size: int, role: str) -> list[str]:
    """The greedy answer of the model at ``model_path`` to each instruction (with its images)."""
    from accelerate import PartialState

    from ..data.tokenize import TokenizeSettings
    from ..generation import greedy_texts, prompt_ids
    from ..model.load import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_path, device=PartialState().device)
    if images is not None and getattr(tokenizer, "image_inputs", None) is None:
        raise ConfigError(f"--captioner {model_path}: a text-only model; captions need a "
                          "vision-language model (LLaVA-, Idefics3-, Qwen2/2.5/3-VL- or Gemma "
                          "3-style directory with its processor files).")
    model.eval()
    settings = TokenizeSettings(max_length=4096, max_prompt_length=4096 - max_new_tokens)
    ids = prompt_ids(instructions, tokenizer, settings, images)
    answers = greedy_texts(model, tokenizer, ids, max_new_tokens, batch_size,
                           description=f"{role} ({Path(model_path).name})", images=images)
    return [answer.strip().splitlines()[0].strip() if answer.strip() else "" for answer in answers]


def caption_pairs(data: str, output: str, captioner: str | None = None,
                  perturber: str | None = None, fields: dict | None = None,
                  max_new_tokens: int = 48, batch_size: int = 8,
                  caption_instruction: str | None = None,
                  perturb_instruction: str | None = None,
                  overwrite: bool = False) -> dict:
    """Write ``output`` (JSONL): every row of ``data`` with ``chosen_caption`` and
    ``rejected_caption``; image paths are rewritten to start at ``output``'s folder. Returns
    the counts and the method (dcpo-c, dcpo-p or dcpo-h)."""
    from ..data.images import image_ref

    caption_instruction = caption_instruction or CAPTION_INSTRUCTION
    perturb_instruction = perturb_instruction or PERTURB_INSTRUCTION
    if captioner is None and perturber is None:
        raise ConfigError("preftune diffusion caption needs --captioner (DCPO-c), --perturber "
                          "(DCPO-p) or both (DCPO-h).")
    for name, template, key in (("--caption-instruction", caption_instruction, "{prompt}"),
                                ("--perturb-instruction", perturb_instruction, "{text}")):
        if key not in template:
            raise ConfigError(f"{name} must contain {key}, where the text goes.")
    if caption_instruction.count("<image>") != 1:
        raise ConfigError("--caption-instruction must contain <image> once, where the image "
                          "goes.")
    fields = fields or {}
    target = Path(output)
    if target.exists() and target.resolve() == Path(data).resolve():
        raise DataError(f"--output {output} is the input file; write the captions to a new file.")
    if target.exists() and not overwrite:
        raise DataError(f"--output {output} already exists; choose another file, or pass "
                        "--overwrite to replace it.")
    pairs = load_pairs(data, fields)
    rows = list(rows_and_folders(data, fields))
    names = {side: fields.get(f"{side}_caption", f"{side}_caption")
             for side in ("chosen", "rejected")}
    for origin, row, _ in rows:
        taken = [name for name in names.values() if row.get(name) not in (None, "")]
        if taken and not overwrite:
            raise DataError(f"{origin}: field {taken[0]!r} already holds a caption; pass "
                            "--overwrite to replace the captions.")

    prompts = [pair.prompt for pair in pairs]
    captions = {"chosen": list(prompts), "rejected": list(prompts)}
    if captioner is not None:
        instructions, shown = [], []
        for pair in pairs:
            for side in ("chosen", "rejected"):
                instructions.append(caption_instruction.replace("{prompt}", pair.prompt))
                shown.append((image_ref(getattr(pair, side), pair.origin,
                                        f"field {side!r}", pair.base_dir),))
        answers = generate(captioner, instructions, shown, max_new_tokens, batch_size,
                           "captions")
        captions = {"chosen": answers[0::2], "rejected": answers[1::2]}
    if perturber is not None:
        instructions = [perturb_instruction.replace("{text}", text)
                        for text in captions["rejected"]]
        captions["rejected"] = generate(perturber, instructions, None, max_new_tokens,
                                        batch_size, "perturbations")

    target.parent.mkdir(parents=True, exist_ok=True)

    def captioned(k: int, origin: str, row: dict, folder: str) -> dict:
        row = dict(row)
        for side in IMAGE_FIELDS:
            row[fields.get(side, side)] = _moved(row[fields.get(side, side)], folder,
                                                target.resolve().parent, origin)
        return {**row, names["chosen"]: captions["chosen"][k],
                names["rejected"]: captions["rejected"][k]}

    write_rows(target, (captioned(k, *row) for k, row in enumerate(rows)))
    method = {(True, False): "dcpo-c", (False, True): "dcpo-p", (True, True): "dcpo-h"}[
        (captioner is not None, perturber is not None)]
    return {"pairs": len(rows), "method": method, "output": str(target)}


def _moved(value, folder: str, out_folder: Path, origin: str):
    """An image path of a row read in ``folder``, as it reads from ``out_folder``."""
    if isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(folder, value)
        return os.path.relpath(path, out_folder)
    raise DataError(f"{origin}: an image given as data, not a file path; captioned pairs are "
                    "written as JSONL that names image files: save the images as files first "
                    "(e.g. with `preftune diffusion rank` or your own export).")
