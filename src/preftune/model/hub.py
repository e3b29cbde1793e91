"""A Hugging Face Hub id as ``model.path``: the files ``from_pretrained`` would read, fetched
once into the HF cache (``HF_HUB_OFFLINE=1``: read from it only), so that every part of
preftune (the vision check, the weights-format check, fingerprints, the model card) sees a
local directory."""

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


def hub_snapshot(repo_id: str, allow_pickle: bool = False, weights: bool = True) -> str:
    """The local snapshot folder of the Hub model ``repo_id``: its small files first, then (if
    ``weights``) the safetensors weights they name; pickled weights only when allowed and there
    are no safetensors. An id that cannot be fetched is a ``FileNotFoundError`` that says
    why."""
    from huggingface_hub import snapshot_download

    def fetch(weights: list[str]) -> Path:
        return Path(snapshot_download(repo_id, allow_patterns=SMALL_FILES + weights,
                                      ignore_patterns=SUBFOLDERS))

    try:
        folder = fetch([])
        if weights:
            folder = fetch(weight_files(folder, SAFETENSORS))
        if weights and allow_pickle and not any(folder.glob("*.safetensors")):
            folder = fetch(weight_files(folder, PICKLED))
    except (OSError, ValueError) as error:  # offline and not cached, a typo, a gated repo
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"model.path: '{repo_id}' is not a local model directory or .gguf file, "
            f"and fetching it as a Hugging Face Hub model failed ({type(error).__name__}: "
            f"{reason}). Pass a model directory, a .gguf file or 'default'; for a Hub model, "
            "check the id and the network (HF_TOKEN for a gated model), or download it where "
            f"there is a network with `hf download {repo_id}` and copy the HF cache over."
        ) from None
    return str(folder)


def weight_files(folder: Path, kind: tuple[str, str]) -> list[str]:
    """The files of one weights format that from_pretrained loads: the shards its index names,
    else the single file. (A repository that also keeps a consolidated copy of the weights,
    as Mistral's do, is not downloaded twice.)"""
    index, single = kind
    if (folder / index).is_file():
        return sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
    return [single]
