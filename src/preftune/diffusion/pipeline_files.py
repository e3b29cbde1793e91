"""The files of a diffusers pipeline directory: which folder holds the denoiser, the class a
component's config names, a run directory's pipeline, and a saved ``model_index.json`` that
diffusers' pipelines load."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError

DENOISER_FOLDERS = ("unet", "transformer")


def component_class(folder: Path, library: str):
    """The class named in ``folder/config.json`` (diffusers ``_class_name`` or transformers
    ``architectures``), from ``library``."""
    import importlib

    config = json.loads((folder / "config.json").read_text())
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    module = importlib.import_module(library)
    if name is None or not hasattr(module, name):
        raise ConfigError(f"{folder}/config.json names no {library} class ({name!r}); expected a "
                          f"diffusers pipeline directory.")
    return getattr(module, name)


def saved_denoiser_dtype(path: Path, key: str = "model.path") -> str:
    """The dtype the denoiser of the pipeline at ``path`` is saved in (its safetensors files'
    first floating tensor; diffusers' configs do not name one): what ``dtype: auto`` loads
    the pipeline in. float32 when the files name none preftune loads in."""
    from ..model.load import SAFETENSORS_DTYPES, safetensors_header

    for file in sorted((path / denoiser_folder(path, key)).glob("*.safetensors")):
        for name, entry in safetensors_header(file).items():
            if name != "__metadata__" and entry["dtype"] in SAFETENSORS_DTYPES:
                return SAFETENSORS_DTYPES[entry["dtype"]]
    return "float32"


def pipeline_dir(path: str | Path) -> Path:
    """A pipeline directory: ``path`` itself, or the ``model/`` a run directory holds."""
    run = Path(path)
    return run / "model" if (run / "model").is_dir() else run


def denoiser_folder(path: Path, key: str = "model.path") -> str:
    """``unet`` or ``transformer``: the folder holding ``path``'s denoiser; errors name ``key``
    (the config key or flag that gave ``path``)."""
    for folder in DENOISER_FOLDERS:
        if (path / folder / "config.json").is_file():
            return folder
    raise ConfigError(f"{key} {path}: no unet/ or transformer/ folder with a config.json; "
                      "expected a diffusers pipeline directory (unet/, text_encoder/, "
                      "tokenizer/, scheduler/), e.g. one written by `preftune diffusion demo`.")


def drop_absent_components(directory: Path) -> None:
    """Mark the components that ``model_index.json`` lists but ``directory`` lacks (a Hub
    pipeline's safety_checker/ and feature_extractor/, which preftune does not fetch) as
    absent, ``[null, null]``, so that diffusers' pipelines load the directory."""
    index_path = directory / "model_index.json"
    if not index_path.is_file():
        return
    index = json.loads(index_path.read_text())
    absent = [name for name, value in index.items() if not name.startswith("_") and
              isinstance(value, list) and value[:1] != [None] and not (directory / name).is_dir()]
    if absent:
        index.update({name: [None, None] for name in absent})
        index_path.write_text(json.dumps(index, indent=2) + "\n")


def local_pipeline(path: str | Path, key: str, weights: bool = True) -> Path:
    """``path`` itself, or for a Hugging Face Hub pipeline id its snapshot in the HF cache
    (fetched once; without ``weights``, only the configs and tokenizers); errors name ``key``."""
    from ..data.hub import HUB_NAME
    from ..model.hub import hub_pipeline_snapshot
    from ..model.load import given_as

    if not Path(path).exists() and HUB_NAME.match(str(path)):
        with given_as(key):
            return Path(hub_pipeline_snapshot(str(path), weights))
    return Path(path)


def checked_pipeline(path: str | Path, key: str, weights: bool = True) -> tuple[Path, str]:
    """The local directory of the pipeline ``path`` (a Hub id's snapshot, without
    ``weights`` only its small files) and its denoiser's folder, or an error naming ``key``
    when it is no text-to-image pipeline; nothing is loaded."""
    path = local_pipeline(path, key, weights)
    if not path.is_dir():
        raise ConfigError(f"{key} {path} is not a directory; give a diffusers pipeline "
                          "directory or a Hugging Face Hub pipeline id.")
    folder = denoiser_folder(path, key)
    for needed in ("text_encoder", "tokenizer", "scheduler"):
        if not (path / needed).is_dir():
            raise ConfigError(f"{key} {path}: no {needed}/ folder; a text-to-image "
                              "pipeline directory needs text_encoder/, tokenizer/, scheduler/.")
    return path, folder
