"""Small random diffusers pipeline directories (no downloads), for tests and the demo: a
word-level tokenizer over a fixed vocabulary and a tiny pixel-space UNet pipeline."""

from __future__ import annotations

from pathlib import Path

import torch


def word_tokenizer(words: list[str], max_length: int = 8):
    """A lower-cased word-level tokenizer over ``words`` (plus <pad>, <unk>, <s>, </s>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + sorted({w.lower() for w in words}))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=max_length)


def build_tiny_pipeline(directory: str | Path, words: list[str], resolution: int = 16,
                        seed: int = 0, width: int = 32) -> Path:
    """Write a small random pixel-space pipeline (UNet2DConditionModel with cross-attention
    and a text term in its time embedding, a 1-layer CLIP text encoder over ``words``, DDPM
    scheduler) to ``directory``."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(words)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=tokenizer
        .model_max_length, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    unet = diffusers.UNet2DConditionModel(
        sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(width, 2 * width), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width, attention_head_dim=8,
        # the text also enters the time embedding (every ResNet block), as in UnCLIP-style
        # UNets: a tiny model trained briefly learns to follow a colour word far sooner
        addition_embed_type="text", addition_embed_type_num_heads=4)
    unet.save_pretrained(directory / "unet")
    text_encoder.save_pretrained(directory / "text_encoder")
    tokenizer.save_pretrained(directory / "tokenizer")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(directory / "scheduler")
    return directory
