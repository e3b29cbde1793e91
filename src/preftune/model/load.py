"""Load a policy model and tokenizer: the bundled default or encoder, a GGUF file (converted
once, ``packaged.py``), a Hugging Face directory or Hub id, or a LoRA adapter directory."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ..config_tree import ConfigError
from ..data.vision_qwen import MROPE_MODEL_TYPES, is_mrope_config, processor_parts
from .adapter_dirs import (adapter_base, config_source, final_model_dir, is_adapter_dir,
                           merge_adapter)
from .chat_template import use_chat_template
from .hub import hub_snapshot
from .packaged import (DEFAULT_MODEL, ENCODER_ALIASES, default_gguf_path, gguf_to_safetensors,
                       packaged_encoder_dir)
from .quantize import loading_arguments, settle
from .varlen import transformers_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def given_as(flag: str):
    """Errors about a model path that a command-line flag gave name that flag, not the config
    key ``model.path``."""
    try:
        yield
    except FileNotFoundError as error:
        raise FileNotFoundError(str(error).replace("model.path", flag, 1)) from None


def resolve_model_dir(path: str, allow_pickle: bool = False, weights: bool = True) -> str:
    """Map a config ``model.path`` to a local directory ``from_pretrained`` loads: the bundled
    default, the encoder alias, a GGUF file (converted once), a model directory, or a Hugging
    Face Hub id (its snapshot in the local HF cache, downloaded once; without its weights
    when ``weights`` is false, e.g. for the tokenizer alone)."""
    if path == DEFAULT_MODEL:
        return str(gguf_to_safetensors(default_gguf_path()))
    if path in ENCODER_ALIASES:
        return str(packaged_encoder_dir())
    local = Path(path).expanduser()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise FileNotFoundError(f"model.path: GGUF file {local} does not exist")
        return str(gguf_to_safetensors(local))
    if local.is_dir():
        if not (local / "config.json").exists() and not is_adapter_dir(local):
            trained = final_model_dir(local)
            hint = (f"; it is a preftune run directory: give the model it trained, {trained}"
                    if (local / "run.json").is_file() and trained.is_dir() else "")
            raise FileNotFoundError(
                f"model.path: {local} has no config.json; expected a Hugging Face model directory "
                f"(or a LoRA adapter directory, with adapter_config.json){hint}"
            )
        return str(local)
    if local.exists() or path.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"model.path: {path} is neither a model directory nor a .gguf file"
        )
    return hub_snapshot(path, allow_pickle, weights)


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str | None = None):
    """The tokenizer for a config ``model.path``; padding falls back to EOS; ``chat_template``
    (Jinja text, ``model.chat_template``) replaces its own. A vision-language model's comes
    from its processor (``load_processor_tokenizer``)."""
    from transformers import AutoTokenizer

    source = resolve_model_dir(path, weights=False)
    if is_vision_language(config_source(source), trust_remote_code):
        tokenizer = load_processor_tokenizer(source, trust_remote_code)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        pad_with_eos(tokenizer)
    if chat_template is not None:
        use_chat_template(tokenizer, chat_template)
    return tokenizer


def pad_with_eos(tokenizer) -> None:
    """A tokenizer without a pad token pads batches with EOS (marked, so that it is saved as
    loaded: ``saved_as_loaded``)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.pad_from_eos = True


@contextlib.contextmanager
def saved_as_loaded(tokenizer):
    """``tokenizer`` without the pad token ``pad_with_eos`` gave it, while it is saved: a tool
    that later pads with it would mask EOS as padding."""
    added = getattr(tokenizer, "pad_from_eos", False)
    if added:
        tokenizer.pad_token = None
    try:
        yield tokenizer
    finally:
        if added:
            tokenizer.pad_token = tokenizer.eos_token


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def check_weights_format(source: str, allow_pickle: bool = False) -> None:
    """Weights load from safetensors only: a local model directory whose weights exist only as
    pickle files is refused (unpickling can run code) unless the user opts in."""
    directory = Path(source)
    if allow_pickle or not directory.is_dir() or any(directory.glob("*.safetensors")):
        return
    pickled = [p.name for pattern in PICKLE_WEIGHTS for p in directory.glob(pattern)]
    if pickled:
        raise ConfigError(
            f"model.path: {directory} holds its weights only as pickle files ({pickled[0]}), and "
            "preftune loads safetensors only (unpickling can run code). Convert it once "
            "(AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR)) or, if you trust "
            "the files, opt in with model.allow_pickle: true.")


def load_model_and_tokenizer(path: str, dtype: str = "float32", trust_remote_code: bool = False,
                             attn_implementation: str | None = None, allow_pickle: bool = False,
                             chat_template: str | None = None, quantize: str | None = None,
                             device: torch.device | str | None = None):
    """Return (causal LM, tokenizer) for a config ``model.path`` (``load_tokenizer``, then
    ``load_model``)."""
    tokenizer = load_tokenizer(path, trust_remote_code, chat_template)
    model = load_model(path, tokenizer, dtype, trust_remote_code, attn_implementation,
                       allow_pickle, quantize, device)
    return model, tokenizer


def load_model(path: str, tokenizer, dtype: str = "float32", trust_remote_code: bool = False,
               attn_implementation: str | None = None, allow_pickle: bool = False,
               quantize: str | None = None, device: torch.device | str | None = None):
    """The causal LM of a config ``model.path``, checked against its ``tokenizer``
    (``load_tokenizer``'s; loading that first lets the data be read and checked before the
    weights load). A vision-language model (a config with a ``vision_config``) loads as an
    image-text-to-text model; its processor's image side rides on the tokenizer as
    ``tokenizer.image_inputs`` (``data/vision.py``). A LoRA adapter directory loads as its
    base with the adapter merged in (``adapter_dirs.py``). ``quantize`` ('nf4', 'fp4'): the
    linear layers load in 4 bits (``quantize.py``). ``dtype`` 'auto': the dtype its weights
    are saved in (``saved_dtype``). The model is returned on ``device`` when one is given (a
    quantized one is built there), else on the host."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_dir(path, allow_pickle)
    dtype = saved_dtype(source) if dtype == "auto" else dtype
    if is_adapter_dir(source):
        base = load_model(adapter_base(source), tokenizer, dtype, trust_remote_code,
                          attn_implementation, allow_pickle, quantize, device)
        return merge_adapter(base, source)
    check_weights_format(source, allow_pickle)
    attn_implementation = transformers_name(attn_implementation)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if quantize is not None:
        extra |= loading_arguments(quantize, DTYPES[dtype], device)
    auto = AutoModelForCausalLM
    if is_vision_language(source, trust_remote_code):
        from transformers import AutoModelForImageTextToText as auto
    _check_kind(source, auto, trust_remote_code)
    model = auto.from_pretrained(
        source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True, **extra
    )
    embedded = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embedded:
        raise ConfigError(f"model.path: {source}: its tokenizer has {len(tokenizer)} tokens but "
                          f"the model embeds only {embedded}; the tokenizer does not belong to "
                          "this model (put the model's own tokenizer files in the directory).")
    if quantize is not None:
        settle(model)
        return model
    return model if device is None else model.to(device)


def saved_dtype(source: str) -> str:
    """What dtype ``auto`` loads the model at ``source`` (a local directory) in: the one its
    config.json says its weights are saved in (``dtype``, or ``torch_dtype`` as older files
    write it; a VLM's text model's when the top level names none), float32 when it names none
    of ``DTYPES``. An adapter directory loads in its base model's."""
    if is_adapter_dir(source):
        return saved_dtype(resolve_model_dir(adapter_base(source), weights=False))
    config = _config_json(source) or {}
    for tree in (config, config.get("text_config") or {}):
        named = tree.get("dtype") or tree.get("torch_dtype")
        if named in DTYPES:
            return named
    return "float32"


def released(work):
    """``work()``, then a garbage collection: a model that ``work`` loaded may sit in a
    reference cycle, which would hold its memory, on the GPU too, until the collector next
    runs, so the next piece of work's models would load on top of it. transformers' first load
    in a process makes one: its lazy import of the model's modules leaves a cycle that holds
    the frames of the loading call, ``load_model`` with the model among its locals."""
    try:
        return work()
    finally:
        gc.collect()


SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def safetensors_header(file: Path) -> dict:
    """A safetensors file's JSON header: each tensor's ``dtype``, ``shape`` and offsets (and
    ``__metadata__``), read without a tensor."""
    with open(file, "rb") as handle:
        return json.loads(handle.read(int.from_bytes(handle.read(8), "little")))


def builds(auto, config, trust_remote_code: bool = False) -> bool:
    """Whether transformers' ``auto`` class has a model for ``config``: one of its
    architectures, or (with remote code) one the config's ``auto_map`` names."""
    return type(config) in auto._model_mapping or (
        trust_remote_code and auto.__name__ in (getattr(config, "auto_map", None) or {}))


def _check_kind(source: str, auto, trust_remote_code: bool) -> None:
    """Refuse, by name, a model that ``auto`` (causal LM, or image-text-to-text) cannot load:
    an encoder-decoder (T5, BART) or another kind of model, not transformers' long list."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    if not builds(auto, config, trust_remote_code):
        raise ConfigError(f"model.path: {source} is a {config.model_type} model, which is not a "
                          "causal (decoder-only) language model; preference training here needs "
                          "one (Llama, Qwen, Mistral, Gemma, SmolLM ...). Encoder-decoder "
                          "models such as T5 and BART are not supported.")


def is_vision_language(source: str, trust_remote_code: bool = False) -> bool:
    """True for a model directory whose config has a vision tower. M-RoPE models train when
    they are Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense or MoE), GLM-4.1V or GLM-4.5V
    (``data/vision_qwen.py``); others are refused by name, since their position rules were not
    checked against preftune's layouts."""
    config = _config_json(source)
    if config is None or "vision_config" not in config:
        return False
    if is_mrope_config(config) and config.get("model_type") not in MROPE_MODEL_TYPES:
        raise ConfigError(f"model.path: {source} is a {config.get('model_type')} model with "
                          "multimodal rotary positions (M-RoPE), which preftune supports for "
                          "Qwen2-VL, Qwen2.5-VL, Qwen3-VL (-MoE), GLM-4.1V and GLM-4.5V only; "
                          "LLaVA-, Idefics3/SmolVLM- and Gemma 3-style models train too.")
    return True


def _config_json(source: str) -> dict | None:
    if not Path(source, "config.json").is_file():
        return None
    return json.loads(Path(source, "config.json").read_text())


def load_processor_tokenizer(source: str, trust_remote_code: bool = False):
    """A VLM's tokenizer with its processor's image side and chat template."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    from ..data.vision import ImageInputs

    config = _config_json(config_source(source)) or {}
    mrope = is_mrope_config(config)
    if mrope and not is_torchvision_available():
        # Qwen2VLProcessor and Glm4vProcessor need torchvision (their video processors): the
        # tokenizer and PIL image processor do the same for images
        parts = processor_parts(config.get("model_type"))
        processor = parts.from_pretrained(source, trust_remote_code)
    else:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    tokenizer = processor.tokenizer
    pad_with_eos(tokenizer)
    if getattr(processor, "chat_template", None):
        tokenizer.chat_template = processor.chat_template
    tokenizer.image_inputs = ImageInputs(processor, mrope=mrope)
    return tokenizer


def without_dropout(model: nn.Module) -> None:
    """Every dropout rate of ``model`` set to 0: its ``nn.Dropout`` layers and the rates
    attention layers keep as plain numbers (``attention_dropout``, ...). Preference training
    compares the policy with a reference computed without dropout; with it, the implied
    rewards are noisy from the first step (TRL turns it off by default too)."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


@contextlib.contextmanager
def quiet_peft():
    """PEFT reads an attribute transformers 5 deprecates: its warning says nothing to a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                FutureWarning)
        yield


def files_fingerprint(path: str) -> str:
    """SHA-256 over a model directory's weight files (``*.safetensors``, ``*.bin``), by name
    and content: which saved model an online round sampled from."""
    digest = hashlib.sha256()
    directory = Path(resolve_model_dir(path))
    for file in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def weights_fingerprint(model) -> str:
    """SHA-256 over parameter names and values: identifies the weights a reference came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
