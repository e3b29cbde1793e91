"""The ``model`` section of a run's config (``ModelConfig``, its ``LoraConfig``), and what every
section is built from: ``Section`` and the numeric ranges checked when a config is read."""

from __future__ import annotations

import importlib.util
import types
from typing import Annotated, Any, Callable, ClassVar, Literal, Union, get_args, get_origin

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from .model.chat_template import chat_template_text


class Section(BaseModel):
    # a string literal under a field is its help text (`preftune config explain`, the schema)
    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              use_attribute_docstrings=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data):
        """pydantic reads true as 1 for a number (``learning_rate: yes`` trained at 1.0)."""
        if isinstance(data, dict):
            refuse_bools(data, {name: field.annotation for name, field in
                                cls.model_fields.items()})
        return data


class Term(BaseModel):
    """A named term whose parameters sit beside its name in a config (an objective, a reward
    loss); ``registry`` finds its spec by name."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)
    registry: ClassVar[Callable]

    @classmethod
    def with_defaults(cls, term: dict) -> dict:
        """``term`` as a config file gives it, with the parameters it leaves out at their
        defaults: a default given explicitly is the same setting as one left out."""
        try:
            defaults = cls.registry(term.get("name", cls.model_fields["name"].default)).defaults()
        except (KeyError, TypeError):  # (an unknown name differs anyway)
            return term
        return {**{key: list(value) if isinstance(value, tuple) else value
                   for key, value in defaults.items()}, **term}


def refuse_bools(values: dict, annotations: dict, prefix: str = "") -> None:
    """A ``ValueError`` for the first of ``values`` that is true/false where its annotation
    takes numbers and not booleans."""
    for name, value in values.items():
        if isinstance(value, bool) and name in annotations and _numeric(annotations[name]):
            raise ValueError(f"{prefix}{name}: expected a number, got {str(value).lower()} "
                             "(YAML reads yes/no/on/off as true/false, which is no number)")


def _numeric(annotation) -> bool:
    """Whether a value of type ``annotation`` is a number and never a boolean."""
    leaves = set()

    def walk(kind):
        if get_origin(kind) is Annotated:
            walk(get_args(kind)[0])
        elif get_origin(kind) in (Union, types.UnionType):
            for part in get_args(kind):
                walk(part)
        else:
            leaves.add(kind)

    walk(annotation)
    return bool(leaves & {int, float}) and not leaves & {bool, Any, object}


def refuse_unused(section: BaseModel, names, where: str, why: str) -> None:
    """Refuse the first of ``names`` that the config gave a value other than its default: a
    setting that would silently do nothing; ``why`` says what it needs (or is for)."""
    for name in names:
        default = type(section).model_fields[name].get_default(call_default_factory=True)
        if name in section.model_fields_set and getattr(section, name) != default:
            raise ValueError(f"{where}.{name} does nothing {why}; remove it, or set what it "
                             "needs.")


def params_problem(error: ValidationError, section: str, name: str, scheduled=(),
                   end: str = "") -> str:
    """The first problem of the parameters of a registered ``name`` (an objective, a loss) as
    one line: ``section.key: what (got value)``, with ``.end`` after a key in ``scheduled``
    (a schedule's end being checked); a check of several values together, under the name."""
    first = error.errors()[0]
    if not first["loc"]:
        message = first["msg"].removeprefix("Value error, ")
        return f"{section} {message if message.startswith(name) else f'{name}: {message}'}"
    key = ".".join(map(str, first["loc"]))
    where = f"{key}.{end}" if key in scheduled else key
    return f"{section}.{where}: {first['msg']} (got {first.get('input')!r})"


# numeric ranges, checked when the config is read (before any work)
Count = Annotated[int, Field(ge=1)]  # a size or a number of things: at least 1
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]  # a share in [0, 1)
Share = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]  # a share in (0, 1]


class LoraConfig(Section):
    r: Count = 16
    """LoRA rank: the inner size of each low-rank update."""
    alpha: Count = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: Fraction = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or 'all-linear'."""
    target_parameters: list[str] | None = None
    """Weights to adapt that are not linear layers, by their name or its last parts (PEFT's
    target_parameters): the experts of mixture-of-experts models, 3-D tensors in transformers
    5 (e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj]), which all-linear leaves out.
    Each expert gets its own rank-r update."""
    rslora: bool = False
    """rsLoRA (Kalajdzievski 2023): scale the update by alpha / sqrt(r) instead of alpha / r,
    so that higher ranks keep learning at the same rate."""
    dora: bool = False
    """DoRA (Liu et al. 2024): each adapted weight is a learned magnitude per output times the
    direction of W + scale * B A (its rows normalized); LoRA trains the direction."""
    init: Literal["default", "pissa", "pissa_fast", "olora"] = "default"
    """How adapters start: 'default' (B = 0, A random: the model starts as the base); 'pissa'
    (Meng et al. 2024: A, B from the top r singular vectors of each weight, which keeps the
    rest; 'pissa_fast' finds them by 16 randomized subspace iterations instead of a full SVD)
    or 'olora' (Büyükakyüz 2024: from a QR decomposition): the adapter trains the weight's
    principal part, which the papers find converges faster. adapter/ is written as a plain
    LoRA adapter of the original base either way."""
    modules_to_save: list[str] | None = None
    """Modules trained in full beside the adapters (PEFT's modules_to_save), e.g.
    ['embed_tokens', 'lm_head'] for tokens the model has not learnt: a trainable copy of each;
    tied embeddings stay tied; the adapters-off reference keeps the originals."""
    lr_ratio: Positive | None = None
    """LoRA+ (Hayou et al. 2024): each B matrix trains at this multiple of
    train.learning_rate (A matrices and the rest at train.learning_rate); the paper
    suggests 16. null: one rate for all."""
    save_merged: bool = True
    """Also write the merged full model next to the adapter."""

    @model_validator(mode="after")
    def _pissa_without_dora(self):
        if self.init != "default" and self.dora:
            raise ValueError(f"model.lora.init: {self.init} and model.lora.dora do not combine "
                             "(a DoRA magnitude cannot be converted to a LoRA of the original "
                             "base); choose one.")
        return self

    @model_validator(mode="after")
    def _what_adapted_weights_take(self):
        if not self.target_parameters:
            return self
        unsupported = [f"{key}: {value}" for key, value, off in (
            ("dropout", self.dropout, 0.0), ("dora", self.dora, False), ("init", self.init,
                                                                          "default"))
            if value != off]
        if unsupported:
            raise ValueError(f"model.lora.target_parameters adapts weights outside any layer, "
                             f"whose input PEFT never sees, so model.lora.{unsupported[0]} "
                             "cannot apply to them (PEFT takes dropout 0, no DoRA and the "
                             "default start there); remove one or the other.")
        return self

    @model_validator(mode="after")
    def _peft_installed(self):
        if importlib.util.find_spec("peft") is None:
            raise ValueError("model.lora needs the peft package: pip install 'preftune[lora]'")
        return self


class ModelConfig(Section):
    path: str = "default"
    """'default' (SmolLM2-135M-Instruct), a Hugging Face model dir, a .gguf file, or a Hub id."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype of the weights; log-probs accumulate in float32 whatever it is."""
    trust_remote_code: bool = False
    """Run the model directory's own Python code (off unless you trust it)."""
    allow_pickle: bool = False
    """Load pickle weight files (*.bin) when no safetensors exist."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of every weight (null: full fine-tuning)."""
    quantize: Literal["nf4", "fp4"] | None = None
    """QLoRA: hold the base's linear layers in 4 bits (bitsandbytes), 'nf4' (NormalFloat4 with
    double quantization, QLoRA's recipe) or 'fp4', and train model.lora's adapters on them.
    The trained model/ is the adapter merged into the unquantized base, in model.dtype."""
    train_layers: int | None = Field(None, json_schema_extra={"not": {"const": 0}})
    """Full fine-tuning of part of the model: only the last N decoder layers train (negative:
    the first N); embeddings, the final norm, the output layer and a vision tower stay frozen
    unless train_params names them. null: every weight trains."""
    train_params: list[str] | None = Field(None, json_schema_extra={"minItems": 1})
    """Only the weights whose names match one of these globs train (e.g. '*.mlp.*',
    'model.norm.weight'), besides train_layers' layers; everything else is frozen."""
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "varlen"] | None = None
    """Attention kernel; null = transformers' default (sdpa). 'flex_attention' (CUDA) runs the
    prefix-shared and packed layouts as block-sparse FlexAttention instead of a dense mask;
    'varlen' runs padded and packed rows with no mask (torch's variable-length attention on
    CUDA; layout auto then packs)."""
    chat_template: str | None = None
    """Chat template for message-list (conversational) data: a .jinja file or the Jinja text.
    Needed for a model whose tokenizer has none (most base models); replaces the tokenizer's
    own otherwise. The run's config.yaml keeps the text, and the trained model's tokenizer
    saves it."""

    @field_validator("chat_template")
    @classmethod
    def _template_text(cls, value: str | None) -> str | None:
        return chat_template_text(value)

    @property
    def trains_part(self) -> bool:
        """Only some weights train in full (train_layers / train_params)."""
        return self.train_layers is not None or bool(self.train_params)

    @model_validator(mode="after")
    def _one_way_to_choose_what_trains(self):
        if self.train_layers == 0 or self.train_params == []:
            raise ValueError("model.train_layers: 0 / model.train_params: [] would train "
                             "nothing; remove it (null: every weight trains).")
        if self.lora is not None and self.trains_part:
            raise ValueError("model.train_layers / model.train_params choose weights to train "
                             "in full, model.lora trains adapters on a frozen base; use one.")
        return self

    @model_validator(mode="after")
    def _quantized_base_trains_adapters(self):
        if self.quantize is None:
            return self
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("model.quantize needs the bitsandbytes package: "
                             "pip install 'preftune[qlora]'")
        if self.lora is not None and self.lora.init != "default":
            raise ValueError(f"model.lora.init: {self.lora.init} decomposes the base's weights, "
                             f"which model.quantize: {self.quantize} holds in 4 bits; use "
                             "model.lora.init: default with QLoRA.")
        if self.lora is None:
            raise ValueError(f"model.quantize: {self.quantize} weights do not train; add "
                             "model.lora (QLoRA trains LoRA adapters on the quantized base) or "
                             "remove model.quantize.")
        return self
