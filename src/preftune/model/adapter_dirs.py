"""A PEFT adapter directory (``adapter/`` of a LoRA run, written with
``model.lora.save_merged: false``) used as a model: its base loads, the adapter merges into it.

The adapter's ``adapter_config.json`` names its base (``base_model_name_or_path``). A base may
itself be an adapter directory: an online round that trains LoRA on the previous round's
adapter records that directory as its base, so the chain loads back in order.
``final_model_dir`` finds a run's trained model, whichever of the two it wrote;
``merged_copy`` makes the merged one when a run saves; ``save_model`` writes a model or
adapter, a PiSSA or OLoRA adapter as one of the original base (``as_plain_lora``).
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(source: str | Path) -> bool:
    """A directory with a PEFT adapter and no model config of its own."""
    local = Path(source)
    return (local / ADAPTER_CONFIG).is_file() and not (local / "config.json").exists()


def final_model_dir(output_dir: Path) -> Path:
    """Where a run's trained model is: ``model/``, or ``adapter/`` when LoRA wrote no merged
    model (``model.lora.save_merged: false``; it loads as its base plus the adapter)."""
    if not (output_dir / "model").is_dir() and (output_dir / "adapter").is_dir():
        return output_dir / "adapter"
    return output_dir / "model"


def adapter_base(source: str | Path) -> str:
    """The model path the adapter at ``source`` was trained on."""
    from ..config import ConfigError

    config = json.loads((Path(source) / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"model.path: {source} is a PEFT adapter whose {ADAPTER_CONFIG} names "
                          "no base model (base_model_name_or_path); load its base yourself, or "
                          "train with model.lora.save_merged: true")
    return base


def config_source(source: str) -> str:
    """The directory whose ``config.json`` describes the model at ``source``: ``source`` itself,
    or for an adapter directory the (first) base below it that has one."""
    from .load import resolve_model_dir

    while is_adapter_dir(source):
        source = resolve_model_dir(adapter_base(source), weights=False)
    return source


def merge_adapter(base_model, source: str):
    """``base_model`` with the adapter at ``source`` merged in: a plain transformers model,
    named after the run's merged ``model/`` beside ``source`` when there is one (so that an
    adapter trained on it records a plain model as its base, which PEFT alone loads), else
    after ``source`` (a chain of adapters, which preftune loads in order)."""
    merged = with_adapter(base_model, source).merge_and_unload()
    beside = Path(source).parent / "model"
    name = str(beside) if Path(source).name == "adapter" and \
        (beside / "config.json").is_file() and not is_adapter_dir(beside) else source
    merged.name_or_path = merged.config._name_or_path = name
    return merged.requires_grad_(True)  # as any loaded model (PEFT froze the base's weights)


def with_adapter(base_model, source: str):
    """``base_model`` wrapped with the adapter at ``source``, not merged (a PEFT model whose
    ``disable_adapter()`` gives the base back)."""
    try:
        from peft import PeftModel
    except ImportError:
        from ..config import ConfigError

        raise ConfigError(f"model.path: {source} is a LoRA adapter; loading it needs the peft "
                          "package: pip install 'preftune[lora]'") from None
    import torch

    from .load import quiet_peft

    # the adapter's layers are built with a random init before its weights load: that must not
    # draw from the run's random stream (a training run seeded before loading would differ)
    with torch.random.fork_rng(), quiet_peft():
        return PeftModel.from_pretrained(base_model, source)


def merged_copy(model, adapter_dir: Path, unquantized_base=None):
    """A trained PEFT ``model`` as one plain model, its own weights left as they are: a copy
    merged, or, when its base is held in 4 bits (QLoRA), the adapter saved in ``adapter_dir``
    merged into ``unquantized_base()`` (the base loaded again, in full precision)."""
    if unquantized_base is not None:
        return merge_adapter(unquantized_base(), str(adapter_dir))
    import copy

    return copy.deepcopy(model).merge_and_unload()


def save_model(model, directory: Path) -> None:
    """``model.save_pretrained(directory)``; a PiSSA/OLoRA adapter is then rewritten as a LoRA
    adapter of the original base (``add_lora`` kept its initial tensors)."""
    from .lora import INITIAL_ADAPTER

    model.save_pretrained(directory)
    absolute_base(Path(directory))
    initial = getattr(model, INITIAL_ADAPTER, None)
    if initial is not None:
        as_plain_lora(Path(directory), initial)


def absolute_base(directory: Path) -> None:
    """Name the adapter's base by its absolute path when it is a folder given relative to
    the working directory of the run: from anywhere else the relative name finds nothing (or
    is taken for a Hub id)."""
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    base = config.get("base_model_name_or_path")
    if base and not Path(base).is_absolute() and Path(base).exists():
        config["base_model_name_or_path"] = str(Path(base).resolve())
        path.write_text(json.dumps(config, indent=2, sort_keys=True))


def as_plain_lora(directory: Path, initial: dict) -> None:
    """Rewrite the PiSSA/OLoRA adapter saved in ``directory`` as a LoRA adapter of the original
    base. Such a run trains on a residual base, W_res = W - s B0 A0 (``initial`` holds A0 and
    B0), so its update of W is s (B A - B0 A0) = s [B, -B0] [A; A0]: a plain adapter of twice
    the rank, its alpha doubled (times sqrt 2 under rsLoRA) to keep the scale s."""
    import math

    import torch
    from safetensors.torch import load_file, save_file

    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    for name, value in tensors.items():
        if ".lora_A." in name:
            tensors[name] = torch.cat([value, initial[name].to(value.dtype)], dim=0)
        elif ".lora_B." in name:
            tensors[name] = torch.cat([value, -initial[name].to(value.dtype)], dim=1)
    save_file(tensors, weights, metadata={"format": "pt"})
    path = directory / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config["lora_alpha"] *= math.sqrt(2) if config.get("use_rslora") else 2
    config.update(r=2 * config["r"], init_lora_weights=True)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
