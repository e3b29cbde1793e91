"""Tiny random vision-language models (LLaVA-, Idefics3/SmolVLM-, Qwen2-VL-, GLM-4.1V- and Gemma
3-style) with their HF processors, built from configs in-process and saved as model directories
(no downloads)."""

from pathlib import Path

import torch
from transformers import (CLIPVisionConfig, Idefics3Config, Idefics3ForConditionalGeneration,
                          Idefics3Processor, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

from tiny_models import char_tokenizer

# chat-ml with multimodal content parts: an image part renders as the processor's "<image>"
VLM_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
IMAGE_SIZE = 16
# Qwen2-VL's template wraps each image part in its vision tokens
QWEN_TEMPLATE = VLM_TEMPLATE.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
# and GLM-4.1V's in its own
GLM_TEMPLATE = VLM_TEMPLATE.replace("<image>", "<|begin_of_image|><|image|><|end_of_image|>")


def _tokenizer(extra: list[str]):
    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *extra]})
    tokenizer.chat_template = VLM_TEMPLATE
    return tokenizer


def _text_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, tie_word_embeddings=True)


def _image_processor(kind: str):
    """The PIL-backed image processors (no torchvision needed)."""
    if kind == "llava":
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                     crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    from transformers import Idefics3ImageProcessorPil

    return Idefics3ImageProcessorPil(do_image_splitting=False,
                                     size={"longest_edge": IMAGE_SIZE},
                                     max_image_size={"longest_edge": IMAGE_SIZE})


def tiny_llava(seed: int = 0):
    """(model, processor): CLIP-style vision tower (16x16 images, 4x4 patches: 16 image
    tokens), two-layer projector, tiny Llama."""
    tokenizer = _tokenizer([])
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, image_size=IMAGE_SIZE, patch_size=4,
                              num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=_text_config(len(tokenizer)),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config).float().eval()
    processor = LlavaProcessor(image_processor=_image_processor("llava"), tokenizer=tokenizer,
                               patch_size=4, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token="<image>",
                               chat_template=VLM_TEMPLATE)
    return model, processor


def tiny_idefics3(seed: int = 0):
    """(model, processor): SigLIP-style tower, pixel-shuffle connector (4 image tokens per
    16x16 image, wrapped in <fake_token_around_image><global-img>), tiny Llama."""
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    tokenizer = _tokenizer(["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"])
    torch.manual_seed(seed)
    vision = Idefics3VisionConfig(hidden_size=32, image_size=IMAGE_SIZE, patch_size=4,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    config = Idefics3Config(vision_config=vision, text_config=_text_config(len(tokenizer)),
                            scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    model = Idefics3ForConditionalGeneration(config).float().eval()
    processor = Idefics3Processor(image_processor=_image_processor("idefics3"),
                                  tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=VLM_TEMPLATE)
    return model, processor


def tiny_qwen2_vl(seed: int = 0, version: str = "2"):
    """(model, processor parts): Qwen2-VL-style (``version`` "2.5": Qwen2.5-VL) with a depth-1
    vision tower on 4x4 patches merged 2x2 (a 16x16 image: 4 image tokens, a 32x16 one: 8 on
    a 4x2 grid), M-RoPE over a tiny Qwen2 text model. The processor is the tokenizer and the
    PIL image processor (``QwenImageProcessorParts``): transformers' Qwen2VLProcessor needs
    torchvision."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                              Qwen3VLMoeForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)

    from preftune.data.vision_qwen import QwenImageProcessorParts

    tokenizer = _tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                            "<|video_pad|>"])
    tokenizer.chat_template = QWEN_TEMPLATE
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{token}|>") for name, token in (
        ("image_token_id", "image_pad"), ("video_token_id", "video_pad"),
        ("vision_start_token_id", "vision_start"), ("vision_end_token_id", "vision_end"))}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                tie_word_embeddings=True, initializer_range=0.2,  # positions matter visibly
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    if version == "2":
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision.update(embed_dim=16, mlp_ratio=2)
    elif version in ("3", "3-moe"):  # interleaved M-RoPE, DeepStack features into layer 0
        config_class, model_class = Qwen3VLConfig, Qwen3VLForConditionalGeneration
        vision.update(depth=2, intermediate_size=32, out_hidden_size=32,
                      num_position_embeddings=16, deepstack_visual_indexes=[0])
        text.update(head_dim=8, rope_parameters={**text["rope_parameters"],
                                                 "mrope_interleaved": True})
        if version == "3-moe":  # Qwen3-VL-MoE: 4 experts, 2 per token, in every layer
            config_class, model_class = Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    else:
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision.update(intermediate_size=32, out_hidden_size=32, window_size=16,
                      fullatt_block_indexes=[0])
    torch.manual_seed(seed)
    config = config_class(text_config=text, vision_config=vision, tie_word_embeddings=True,
                          initializer_range=0.2, **ids)
    model = model_class(config).float().eval()
    images = Qwen2VLImageProcessorPil(min_pixels=8 * 8, max_pixels=32 * 32, patch_size=4,
                                      temporal_patch_size=2, merge_size=2)
    return model, QwenImageProcessorParts(tokenizer, images, QWEN_TEMPLATE)


def tiny_glm4v(seed: int = 0, moe: bool = False):
    """(model, processor parts): GLM-4.1V-style (``moe``: GLM-4.5V-style, its text model's second
    layer routing to 4 experts, 2 per token, plus a shared one) with a depth-1 vision tower on
    4x4 patches merged 2x2 (a 16x16 image: 4 image tokens, a 32x16 one: 8 on a 4x2 grid), M-RoPE
    on half of each head's dimensions. The processor is the tokenizer and the PIL image
    processor (``GlmImageProcessorParts``): transformers' Glm4vProcessor needs torchvision."""
    from transformers import (Glm4vConfig, Glm4vForConditionalGeneration, Glm4vMoeConfig,
                              Glm4vMoeForConditionalGeneration)
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    from preftune.data.vision_qwen import GlmImageProcessorParts

    names = {"image": "image", "video": "video", "image_start": "begin_of_image",
             "image_end": "end_of_image", "video_start": "begin_of_video",
             "video_end": "end_of_video"}
    tokenizer = _tokenizer([f"<|{token}|>" for token in names.values()])
    tokenizer.chat_template = GLM_TEMPLATE
    ids = {f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{token}|>")
           for name, token in names.items()}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                initializer_range=0.2,  # positions matter visibly
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, hidden_size=32, num_heads=2, patch_size=4, image_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  out_hidden_size=32, intermediate_size=32)
    config_class, model_class = Glm4vConfig, Glm4vForConditionalGeneration
    if moe:
        config_class, model_class = Glm4vMoeConfig, Glm4vMoeForConditionalGeneration
        text.update(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                    moe_intermediate_size=16, first_k_dense_replace=1, head_dim=16)
    torch.manual_seed(seed)
    # output layer untied from the embeddings (the config's default)
    config = config_class(text_config=text, vision_config=vision, **ids)
    model = model_class(config).float().eval()
    # GLM's resize rule counts an image's pixels twice (its two temporal frames): up to 32x32
    images = Glm4vImageProcessorPil(size={"shortest_edge": 8 * 8, "longest_edge": 2 * 32 * 32},
                                    patch_size=4, temporal_patch_size=2, merge_size=2)
    return model, GlmImageProcessorParts(tokenizer, images, GLM_TEMPLATE)


def tiny_gemma3(seed: int = 0):
    """(model, processor): Gemma 3-style, a SigLIP tower (4x4 patches of a 16x16 image) pooled
    to 4 image tokens, over a two-layer Gemma 3 text model whose first layer looks back 8
    tokens only. An image part renders as ``<start_of_image>``, which the processor turns into
    that token between blank lines with 4 ``<image_soft_token>`` and ``<end_of_image>``; the
    model's image tokens attend to each other both ways."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor,
                              Gemma3TextConfig, PreTrainedTokenizerFast, SiglipVisionConfig)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
             "image_token": "<image_soft_token>"}
    backend = char_tokenizer().backend_tokenizer
    backend.add_special_tokens(list(named.values()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        bos_token="<s>", eos_token="<|im_end|>",
                                        extra_special_tokens=named)
    template = VLM_TEMPLATE.replace("<image>", named["boi_token"])
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in named.items()}
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, image_size=IMAGE_SIZE, patch_size=4,
                                num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    text = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"],
                            max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
                          image_token_index=ids["image_token"])
    model = Gemma3ForConditionalGeneration(config).float().eval()
    images = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Gemma3Processor(image_processor=images, tokenizer=tokenizer,
                                chat_template=template, image_seq_length=4)
    return model, processor


BUILDERS = {"llava": tiny_llava, "idefics3": tiny_idefics3, "qwen2_vl": tiny_qwen2_vl,
            "qwen2_5_vl": lambda seed=0: tiny_qwen2_vl(seed, "2.5"),
            "qwen3_vl": lambda seed=0: tiny_qwen2_vl(seed, "3"),
            "qwen3_vl_moe": lambda seed=0: tiny_qwen2_vl(seed, "3-moe"), "glm4v": tiny_glm4v,
            "glm4v_moe": lambda seed=0: tiny_glm4v(seed, moe=True), "gemma3": tiny_gemma3}


def save_tiny_vlm_dir(directory: Path, kind: str = "llava", seed: int = 0) -> Path:
    """A loadable VLM directory (weights, config, processor files), as a user would pass it."""
    model, processor = BUILDERS[kind](seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def solid_image(path: Path, colour: tuple, size: int = 20) -> Path:
    """A one-colour PNG with a darker square in one corner (so crops and masks change it)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), colour)
    ImageDraw.Draw(image).rectangle([0, 0, size // 3, size // 3],
                                    fill=tuple(c // 2 for c in colour))
    image.save(path)
    return path
