"""A reward model: a Hugging Face sequence-classification model plus the ``Head`` that says what
its outputs mean.

Decoders (Llama, Qwen, Mistral, GPT-2 ... anything whose ``*ForSequenceClassification`` scores
the last token with a ``score`` layer) run through preftune's own decoder pass, so the
prefix-shared and packed layouts apply: the prompt of a pair or list is encoded once, and only
the hidden state of each response's last token is projected. Encoders (BERT-style) run through
their own ``forward`` on padded text pairs. Either way the saved directory is a plain
``AutoModelForSequenceClassification`` model that gives the same outputs, plus
``preftune_reward.json`` (the head). Vision-language backbones, which transformers gives no such
class, are ``VisionRewardModel``s (``vision.py``): the same last-token head on their language
model, with images in every layout.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ..config_tree import ConfigError
from ..data.layout import choose_layout, collate
from ..data.turn_end import stop_ids
from ..model.forward import attention_kernels, causal_lm_of, run_decoder
from ..model.verify import layout_setting
from ..model.varlen import transformers_name
from ..model.load import (DTYPES, builds, check_weights_format, is_vision_language,
                          load_tokenizer, resolve_model_dir, saved_dtype)
from ..model.lora import add_lora
from ..model.adapter_dirs import (adapter_base, config_source, is_adapter_dir, merge_adapter,
                                  merged_copy, save_model)
from ..model.quantize import loading_arguments, settle
from .encoder import collate_encoder
from .heads import HEAD_FILE, Head
from .vision import load_vision_backbone

# padding tokens models ship unused (Qwen's <|fim_pad|> and <|vision_pad|>, Llama 3's
# <|finetune_right_pad_id|>) come before the BOS fallback
PAD_CANDIDATES = ("unk_token", "<|endoftext|>", "<pad>", "[PAD]", "<|fim_pad|>", "<|vision_pad|>",
                  "<|finetune_right_pad_id|>", "bos_token")
REWARD_HEADS = ("score", "classifier")  # transformers' sequence-classification heads


def is_last_token_classifier(model: nn.Module) -> bool:
    """Whether a sequence-classification model scores the last token with ``score`` (decoders)."""
    classifier = causal_lm_of(model)
    return isinstance(getattr(classifier, "score", None), nn.Module)


def reward_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token that is not EOS or the end of an assistant turn.

    Responses end with one of those and the reward is read there; transformers'
    sequence-classification models read the last token that is *not* the pad token, so with
    pad == EOS they would read the token before it. A special token the tokenizer already has
    takes the pad role instead.
    """
    ends = set(stop_ids(tokenizer))
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in ends:
        return
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        token = getattr(tokenizer, candidate, None) if candidate.endswith("_token") else candidate
        if token is not None and token in vocab and vocab[token] not in ends:
            tokenizer.pad_token = token
            return
    raise ValueError("the tokenizer has no token that can pad without being its EOS or "
                     "end-of-turn token; add a pad token (tokenizer.add_special_tokens("
                     "{'pad_token': '<pad>'})) and resize the model's embeddings first.")


class RewardModel(nn.Module):
    """``forward(batch) -> [examples, responses, K]`` fp32 head outputs (see ``heads.py``)."""

    def __init__(self, model: nn.Module, head: Head):
        super().__init__()
        self.model = model
        self.head = head
        self.last_token = is_last_token_classifier(model)

    def forward(self, batch) -> torch.Tensor:
        classifier = causal_lm_of(self.model)
        shape = (batch.num_examples, batch.responses_per_example, -1)
        if not self.last_token:  # encoders: their own pooling, one padded row per response
            kwargs = {} if batch.token_type_ids is None else {
                "token_type_ids": batch.token_type_ids}
            with attention_kernels():  # as in run_decoder, and in checkpointed recomputation
                logits = self.model(input_ids=batch.input_ids,
                                    attention_mask=batch.attention_mask, **kwargs).logits
            return logits.float().view(shape)
        decoder = classifier.base_model
        hidden = run_decoder(decoder, batch, decoder.config,
                             vlm=getattr(classifier, "vlm", None)).last_hidden_state
        last = hidden.reshape(-1, hidden.shape[-1])[batch.last_token_positions]
        return classifier.score(last).float().view(shape)

    def make_batch(self, pad_token_id: int, layout: str = "auto", max_row_tokens=None,
                   images=None):
        """A collate function for this model: decoders take any layout their layers keep to
        (``model/verify.py``), encoders padded rows; ``images`` (``tokenizer.image_inputs``)
        for a vision-language backbone's image data."""
        if not self.last_token:
            return lambda examples: collate_encoder(examples, pad_token_id)
        decoder = causal_lm_of(self.model).base_model
        layout = layout_setting(decoder, decoder.config, layout)

        def make(examples):
            return collate(examples, pad_token_id, choose_layout(examples, layout),
                           max_row_tokens, images=images)

        return make

    # -- storage ----------------------------------------------------------------------------

    def save_pretrained(self, directory: Path, tokenizer, extra: dict | None = None,
                        save_merged: bool = True, unquantized_base=None) -> dict[str, Path]:
        """``model/`` (a plain sequence-classification model) and, with LoRA, ``adapter/``;
        ``preftune_reward.json`` in each. LoRA on a quantized backbone merges into
        ``unquantized_base()`` (the backbone loaded again)."""
        directory = Path(directory)
        written = {}
        model = self.model
        pad_token_id = tokenizer.pad_token_id
        # a VLM's processor holds its tokenizer and image processor
        images = getattr(tokenizer, "image_inputs", None)
        tokenizer = images.processor if images is not None else tokenizer
        if hasattr(model, "merge_and_unload"):  # LoRA (PEFT)
            save_model(model, directory / "adapter")
            tokenizer.save_pretrained(directory / "adapter")
            self.head.save(directory / "adapter", extra)
            written["adapter"] = directory / "adapter"
            if not save_merged:
                return written
            model = merged_copy(model, written["adapter"], unquantized_base)
        model.config.pad_token_id = pad_token_id
        model.save_pretrained(directory / "model", safe_serialization=True)
        tokenizer.save_pretrained(directory / "model")
        self.head.save(directory / "model", extra)
        written["model"] = directory / "model"
        return written

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", trust_remote_code: bool = False):
        """(reward model, tokenizer) from a saved reward model: its directory or a run
        directory that holds ``model/``."""
        directory = reward_model_dir(path)
        head, _ = Head.load(directory)
        model, tokenizer = load_backbone(str(directory), head, dtype, trust_remote_code)
        return cls(model.eval(), head), tokenizer


def reward_model_dir(path: str) -> Path:
    """The directory of a saved reward model given it or the run directory above it (whose
    ``adapter/`` is the model when LoRA wrote no merged one, ``model.lora.save_merged:
    false``)."""
    directory = Path(path)
    for inner in (directory / "model", directory / "adapter", directory):
        if (inner / HEAD_FILE).exists():
            return inner
    raise FileNotFoundError(
        f"{path} is not a preftune reward model: no {HEAD_FILE} in it or in {path}/model. Pass "
        "the output_dir of `preftune rm train` (or its model/ directory).")


def backbone_tokenizer(path: str, trust_remote_code: bool = False,
                       chat_template: str | None = None):
    """(local source, tokenizer with a pad token that is not EOS) of a reward ``model.path``
    (a Hub model's snapshot without its weights)."""
    source = resolve_model_dir(path, weights=False)
    tokenizer = load_tokenizer(source, trust_remote_code, chat_template)
    reward_pad_token(tokenizer)
    return source, tokenizer


def scores_last_token(source: str, trust_remote_code: bool = False) -> bool:
    """Whether the backbone at ``source`` is a decoder that scores its last token (else an
    encoder with its own pooling), decided from its config alone: a skeleton of its
    sequence-classification model on the meta device, no weights read."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    source = config_source(source)  # (a LoRA reward model saved unmerged: its base's config)
    if is_vision_language(source, trust_remote_code):  # VisionRewardModel: the last token
        return True
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    if not builds(AutoModelForSequenceClassification, config, trust_remote_code):
        raise ConfigError(f"model.path: {source} is a {config.model_type} model, for which "
                          "transformers has no sequence-classification class, so it cannot "
                          "carry a reward head. Pick a backbone whose architecture has one "
                          "(Llama, Qwen, Mistral, Gemma, Phi-3, SmolLM, BERT-style encoders "
                          "...).")
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(
            config, trust_remote_code=trust_remote_code)
    return is_last_token_classifier(skeleton)


def load_backbone(path: str, head: Head, dtype: str = "float32", trust_remote_code: bool = False,
                  attn_implementation: str | None = None, tokenizer=None,
                  quantize: str | None = None, device=None, announce: bool = True):
    """(sequence-classification model with ``head.num_outputs`` outputs, tokenizer); pass the
    ``tokenizer`` of ``backbone_tokenizer`` if it is already loaded. ``quantize`` ('nf4',
    'fp4'): the backbone's linear layers in 4 bits, built on ``device``, the head in ``dtype``
    ('auto': the dtype the weights are saved in). ``announce``: say which weights start random.

    ``path`` is anything ``model.path`` accepts: ``default``, ``minilm``, a ``.gguf`` file, a
    causal-LM or encoder directory (the head starts random) or a saved reward model (its head
    is kept when it has the same size, else replaced by a fresh one, with a note).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    source = resolve_model_dir(path)
    dtype = saved_dtype(source) if dtype == "auto" else dtype
    if is_adapter_dir(source):  # a LoRA reward model saved unmerged: its base, the adapter in
        base, tokenizer = load_backbone(adapter_base(source), head, dtype, trust_remote_code,
                                        attn_implementation, tokenizer, quantize, device,
                                        announce=False)
        return merge_adapter(base, source), tokenizer
    check_weights_format(source)
    if tokenizer is None:
        _, tokenizer = backbone_tokenizer(source, trust_remote_code)
    attn_implementation = transformers_name(attn_implementation)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if is_vision_language(source, trust_remote_code):  # the head is a layer of its own
        if quantize is not None:
            extra |= loading_arguments(quantize, DTYPES[dtype], device)
        model = load_vision_backbone(source, head.num_outputs, DTYPES[dtype],
                                     trust_remote_code, extra, path, announce)
        if quantize is not None:
            settle(model.vlm)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    resized = getattr(config, "num_labels", None) not in (None, head.num_outputs) and \
        (Path(source) / HEAD_FILE).exists()
    if resized:
        print(f"{path}: its reward head has {config.num_labels} outputs; this run's head needs "
              f"{head.num_outputs}, so a fresh head is trained on its backbone")
    if quantize is not None:
        extra |= loading_arguments(quantize, DTYPES[dtype], device, keep=REWARD_HEADS)
    with _quiet_loading():  # transformers' table of missing keys: said in one line below
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=head.num_outputs, id2label=dict(enumerate(head.labels)),
            label2id={label: i for i, label in enumerate(head.labels)},
            dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
            ignore_mismatched_sizes=resized, use_safetensors=True, output_loading_info=True,
            **extra)
    if announce:
        _say_what_starts_random(model, info["missing_keys"], path)
    if quantize is not None:
        settle(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.problem_type = "regression"  # raw outputs, no softmax: what the head reads
    return model, tokenizer


@contextlib.contextmanager
def _quiet_loading():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _say_what_starts_random(model, missing: list[str], path: str) -> None:
    """One line for a new reward head (the usual case: a language model or encoder as the
    backbone), and a warning naming any backbone weight the checkpoint lacked."""
    body = model.base_model_prefix + "."
    head = sorted(key for key in missing if not key.startswith(body))
    backbone = sorted(key for key in missing if key.startswith(body))
    if head:
        print(f"{path}: the reward head ({', '.join(head)}) is new and starts from random "
              "weights")
    if backbone:
        shown = ", ".join(backbone[:5]) + (f" and {len(backbone) - 5} more" if
                                           len(backbone) > 5 else "")
        print(f"warning: {path} lacks {len(backbone)} backbone weights, which start from "
              f"random values: {shown}. Check that model.path is the model you meant.")


def attach_reward_lora(model, lora):
    """LoRA on the backbone; the head (``score`` / ``classifier``) trains in full."""
    return add_lora(model, lora, task_type="SEQ_CLS")


@torch.no_grad()
def head_outputs(reward_model: RewardModel, examples: list, make_batch, batch_size: int = 16,
                 progress=None) -> torch.Tensor:
    """Head outputs of every response of ``examples``, [E, R, K] fp32 on the CPU, in input
    order. Examples are batched by length (less padding)."""
    was_training = reward_model.training
    reward_model.eval()
    device = next(reward_model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: _size(examples[i]))
    outputs = []
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        outputs.append(reward_model(make_batch(chunk).to(device)).cpu())
        if progress is not None:
            progress(len(chunk))
    reward_model.train(was_training)
    if not outputs:
        return torch.zeros(0, 0, reward_model.head.num_outputs)
    back = torch.tensor(order).argsort()
    return torch.cat(outputs)[back]


def _size(example) -> int:
    return len(example.prompt_ids) + sum(len(ids) for ids in example.response_ids)
