"""A Hugging Face Hub id as ``model.path``: the files ``from_pretrained`` would read, fetched
once into the HF cache (``HF_HUB_OFFLINE=1``: read from it only), so that every part of
preftune (the vision check, the weights-format check, fingerprints, the model card) sees a
local directory. A diffusers pipeline id fetches the components preftune loads."""

from __future__ import annotations

import json
from pathlib import Path

# config, tokenizer, chat template, processor, weight indexes, remote code, the model card
SMALL_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py", "README.md"]
# the top folder only, as from_pretrained reads it (not original/, onnx/ or other copies)
SUBFOLDERS = ["*/*"]
# (index, single file) of each weights format
SAFETENSORS = ("model.safetensors.index.json", "model.safetensors")
PICKLED = ("pytorch_model.bin.index.json", "pytorch_model.bin")
DIFFUSERS = ("diffusion_pytorch_model.safetensors.index.json",
             "diffusion_pytorch_model.safetensors")
# the folders of a diffusers pipeline that preftune loads, with the weights format of each
# (not safety_checker/, feature_extractor/, fp16 variants or whole-pipeline checkpoints)
PIPELINE_PARTS = {"unet": DIFFUSERS, "transformer": DIFFUSERS, "vae": DIFFUSERS,
                  "text_encoder": SAFETENSORS, "tokenizer": None, "scheduler": None,
                  "text_encoder_2": SAFETENSORS, "tokenizer_2": None,  # SDXL, SD3, Flux (T5)
                  "text_encoder_3": SAFETENSORS, "tokenizer_3": None}  # SD3's T5


def hub_snapshot(repo_id: str, allow_pickle: bool = False, weights: bool = True) -> str:
    """The local snapshot folder of the Hub model ``repo_id``: its small files first, then (if
    ``weights``) the safetensors weights they name; pickled weights only when allowed and there
    are no safetensors."""
    folder = fetch(repo_id, "model", SMALL_FILES, SUBFOLDERS)
    if weights:
        folder = fetch(repo_id, "model", SMALL_FILES + weight_files(folder, SAFETENSORS),
                       SUBFOLDERS)
    if weights and allow_pickle and not any(folder.glob("*.safetensors")):
        folder = fetch(repo_id, "model", SMALL_FILES + weight_files(folder, PICKLED), SUBFOLDERS)
    return str(folder)


# model_index.json and the configs, tokenizers and indexes of the folders preftune loads
PIPELINE_SMALL_FILES = ["model_index.json"] + [f"{part}/{name}" for part in PIPELINE_PARTS
                                               for name in SMALL_FILES]


def hub_pipeline_snapshot(repo_id: str, weights: bool = True) -> str:
    """The local snapshot folder of the Hub diffusers pipeline ``repo_id``: ``model_index.json``
    and the small files of the folders in ``PIPELINE_PARTS``, then (if ``weights``) each one's
    safetensors."""
    folder = fetch(repo_id, "diffusers pipeline", PIPELINE_SMALL_FILES)
    if not weights:
        return str(folder)
    files = [f"{part}/{name}" for part, kind in PIPELINE_PARTS.items()
             if kind and (folder / part).is_dir() for name in weight_files(folder / part, kind)]
    return str(fetch(repo_id, "diffusers pipeline", PIPELINE_SMALL_FILES + files))


def fetch(repo_id: str, kind: str, patterns: list[str], skipped: list[str] | None = None) -> Path:
    """``snapshot_download`` of the files matching ``patterns`` (less ``skipped``); an id that
    cannot be fetched (offline and not cached, a typo, a gated repo) is a
    ``FileNotFoundError`` that says why and what to pass instead."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns,
                                      ignore_patterns=skipped))
    except (OSError, ValueError) as error:
        raise unreachable(repo_id, kind, error) from None


def unreachable(repo_id: str, kind: str, error: Exception) -> FileNotFoundError:
    """The error for a Hub id that could not be fetched: why, and what to pass instead."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if kind == "model":
        local, instead = "a local model directory or .gguf file", \
            "a model directory, a .gguf file or 'default'"
    else:
        local, instead = f"a local {kind} directory", f"a {kind} directory"
    return FileNotFoundError(
        f"model.path: '{repo_id}' is not {local}, and fetching it as a Hugging Face Hub {kind} "
        f"failed ({type(error).__name__}: {reason}). Pass {instead}; for a Hub {kind}, check "
        "the id and the network (HF_TOKEN for a gated one), or download it where there is a "
        f"network with `hf download {repo_id}` and copy the HF cache over.")


def weight_files(folder: Path, kind: tuple[str, str]) -> list[str]:
    """The files of one weights format that from_pretrained loads: the shards its index names,
    else the single file. (A repository that also keeps a consolidated copy of the weights,
    as Mistral's do, is not downloaded twice.)"""
    index, single = kind
    if (folder / index).is_file():
        return sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
    return [single]
