"""A small LLaVA-style vision-language model built from a config, for the CPU vision demo.

Nothing is downloaded: a character-level tokenizer (every printable ASCII character is a token,
plus chat-ml markers and ``<image>``), a CLIP-style vision tower on 32x32 images with 8x8
patches (16 image tokens per image), a two-layer projector and a small Llama decoder, saved
with its ``LlavaProcessor`` as an ordinary Hugging Face model directory.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<image>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
IMAGE_SIZE, PATCH_SIZE = 32, 8


def char_tokenizer():
    """One token per printable ASCII character; eos ``<|im_end|>``, chat-ml template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        bos_token="<s>", eos_token="<|im_end|>",
                                        extra_special_tokens={"image_token": "<image>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_scratch_vlm(directory: Path, hidden_size: int = 64, layers: int = 2,
                      seed: int = 0) -> Path:
    """Write a randomly initialised LLaVA-style model and its processor to ``directory``."""
    import torch
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = char_tokenizer()
    vision = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                              num_hidden_layers=layers, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                              projection_dim=hidden_size)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                       intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    pixels = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=pixels, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token="<image>",
                               chat_template=CHAT_TEMPLATE)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
