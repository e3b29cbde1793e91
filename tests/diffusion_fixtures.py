"""Tiny diffusion pipelines and image preference files built in the test (no downloads)."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from preftune.diffusion.tiny import build_tiny_pipeline, word_tokenizer
from preftune.diffusion.shapes import COLOURS, SHAPES, draw_shape, prompt_of

WORDS = ["a", *COLOURS, *SHAPES]


def tiny_pipeline(directory: Path, seed: int = 0) -> Path:
    return build_tiny_pipeline(directory, WORDS, resolution=16, seed=seed)


def write_pairs(directory: Path, count: int = 6, captions: bool = False, seed: int = 0) -> Path:
    """``pairs.jsonl`` under ``directory``: the prompt's colour preferred over another colour,
    images as paths relative to the file; with ``captions``, per-side captions (DCPO)."""
    rng = random.Random(seed)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    colours = list(COLOURS)
    for k in range(count):
        colour, shape = colours[k % len(colours)], SHAPES[k % len(SHAPES)]
        wrong = colours[(k + 1) % len(colours)]
        draw_shape(colour, shape, 16, rng).save(directory / f"images/{k}_w.png")
        draw_shape(wrong, shape, 16, rng).save(directory / f"images/{k}_l.png")
        row = {"prompt": prompt_of(colour, shape), "chosen": f"images/{k}_w.png",
               "rejected": f"images/{k}_l.png", "chosen_score": 1.0, "rejected_score": 0.0}
        if captions:
            row.update(chosen_caption=prompt_of(colour, shape),
                       rejected_caption=prompt_of(wrong, shape))
        rows.append(row)
    path = directory / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def config_tree(pipeline: Path, pairs: Path, output_dir: Path, **sections) -> dict:
    tree = {"output_dir": str(output_dir), "model": {"path": str(pipeline)},
            "data": {"train": str(pairs), "resolution": 16},
            "train": {"max_steps": 2, "batch_size": 3, "learning_rate": 1e-4}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return tree


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny denoisers gain nothing from intra-op threads, and on a busy machine the threads'
    spinning makes them many times slower: one thread while these tests run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_prompts(directory: Path, prompts: list[str]) -> Path:
    """``prompts.jsonl``: prompt-only records, as an online objective (SPO) reads them."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


SCORED = []  # every call of brightness_scorer: (prompts, images, timesteps, scores)


def brightness_scorer(prompts, images, timesteps):
    """A deterministic step-aware scorer for tests (``diffusion_fixtures:brightness_scorer``):
    the mean pixel value of each image; records its calls in ``SCORED``."""
    scores = images.flatten(1).mean(dim=1).tolist()
    SCORED.append((list(prompts), images.clone(), list(timesteps), scores))
    return scores


def constant_scorer(prompts, images, timesteps):
    """Every candidate scores the same: every pool is a tie."""
    return [0.5] * len(prompts)


def tiny_latent_pipeline(directory: Path) -> Path:
    """A tiny pipeline with a random VAE (4 latent channels) and a UNet over 8x8 latents."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    pipe = tiny_pipeline(directory)
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 2, norm_num_groups=4,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(pipe / "vae")
    config = UNet2DConditionModel.load_config(pipe / "unet")
    UNet2DConditionModel.from_config({**config, "in_channels": 4, "out_channels": 4,
                                      "sample_size": 8}).save_pretrained(pipe / "unet")
    return pipe


def hand_error(denoiser, model, image_paths, texts, noise, timesteps):
    """|| eps - eps_theta(sqrt(abar) x0 + sqrt(1 - abar) eps, c, t) ||^2 averaged over dims,
    from the parts: PIL pixels, the tokenizer, the text encoder and alphas_cumprod."""
    pixels = torch.stack([torch.tensor(np.asarray(Image.open(p).convert("RGB")),
                                       dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1
                          for p in image_paths])
    ids = model.tokenizer(texts, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    condition = model.text_encoder(ids).last_hidden_state
    abar = model.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * pixels + (1 - abar).sqrt() * noise
    prediction = denoiser(x_t, timesteps, encoder_hidden_states=condition).sample
    return ((prediction - noise) ** 2).flatten(1).mean(dim=1)


def tiny_sdxl_pipeline(directory: Path, seed: int = 0, width: int = 32) -> Path:
    """A tiny random SDXL-layout pipeline in pixel space: two CLIP text encoders (the second
    with a projection: the pooled embedding), two tokenizers, and a UNet whose time embedding
    takes the pooled text and the time ids (``addition_embed_type: text_time``); its
    model_index.json asks for zeros as the empty prompt, as SDXL base does."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(WORDS)
    config = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                  num_hidden_layers=2, num_attention_heads=4, pad_token_id=0, bos_token_id=2,
                  eos_token_id=3, max_position_embeddings=tokenizer.model_max_length)
    CLIPTextModel(CLIPTextConfig(**config)).save_pretrained(directory / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(**config, projection_dim=16)).save_pretrained(
        directory / "text_encoder_2")
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer.save_pretrained(directory / name)
    diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(width, 2 * width), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2 * width,
        attention_head_dim=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8).save_pretrained(directory / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True}))
    return directory


def tiny_sd3_pipeline(directory: Path, seed: int = 0, t5: bool = True) -> Path:
    """A tiny random SD3-layout pipeline in pixel space: two CLIP text encoders with
    projections, a T5 encoder (``t5``; SD3 also runs without one), three tokenizers, an
    ``SD3Transformer2DModel`` and a ``FlowMatchEulerDiscreteScheduler`` (shift 3, as SD3)."""
    import diffusers
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(WORDS)
    clip = dict(vocab_size=len(tokenizer), intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                max_position_embeddings=tokenizer.model_max_length, projection_dim=16)
    CLIPTextModelWithProjection(CLIPTextConfig(**clip, hidden_size=16)).save_pretrained(
        directory / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(**clip, hidden_size=32)).save_pretrained(
        directory / "text_encoder_2")
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3")[: 3 if t5 else 2]:
        tokenizer.save_pretrained(directory / name)
    if t5:
        T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=64,
                                num_layers=1, num_heads=4, pad_token_id=0, eos_token_id=3)
                       ).save_pretrained(directory / "text_encoder_3")
    diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=3, out_channels=3, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16
    ).save_pretrained(directory / "transformer")
    diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0
                                              ).save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusion3Pipeline"}))
    return directory


def assert_same_gradient(losses, expected, weight):
    """d losses.sum() / d weight equals d expected.sum() / d weight: float32 rounding of two
    evaluations of a formula is magnified by beta/2 or T c, so compared to a small share of the
    gradient's size."""
    (got,) = torch.autograd.grad(losses.sum(), weight, retain_graph=True)
    (want,) = torch.autograd.grad(expected.sum(), weight, retain_graph=True)
    scale = want.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3 * scale)


def tiny_flux_pipeline(directory: Path, seed: int = 0, guidance: bool = True,
                       vae: bool = False) -> Path:
    """A tiny random Flux-layout pipeline: a CLIP text encoder (its pooled embedding), a T5
    encoder (its hidden states), a ``FluxTransformer2DModel`` over 2x2 patches (``guidance``:
    guidance-distilled, as Flux.1-dev), a ``FlowMatchEulerDiscreteScheduler`` with dynamic
    shifting (as Flux.1-dev's), and with ``vae`` a random VAE (4 latent channels, 2x smaller,
    shift and scaling factors as Flux's is centred and scaled) instead of pixel space."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(WORDS)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        max_position_embeddings=tokenizer.model_max_length)).save_pretrained(
        directory / "text_encoder")
    T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                            num_heads=4, pad_token_id=0, eos_token_id=3)).save_pretrained(
        directory / "text_encoder_2")
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer.save_pretrained(directory / name)
    channels = 3
    if vae:
        channels = 4
        diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
            down_block_types=("DownEncoderBlock2D",) * 2, norm_num_groups=4,
            up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.6, shift_factor=0.1
        ).save_pretrained(directory / "vae")
    diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4 * channels, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6)
    ).save_pretrained(directory / "transformer")
    diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    ).save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(json.dumps({  # as a Hub Flux's, whose vae/
        "_class_name": "FluxPipeline",  # this pixel-space one may lack (saving marks it absent)
        **{name: ["transformers", "PreTrainedTokenizerFast"]
           for name in ("tokenizer", "tokenizer_2")},
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None], "feature_extractor": [None, None]}))
    return directory


def tiny_clip_dir(directory: Path, seed: int = 0) -> Path:
    """A tiny random CLIP directory (model, word tokenizer that ends each prompt with </s>,
    where CLIP pools the text, and preprocessor_config.json for 16x16 inputs): what a
    step-aware preference model starts from."""
    from tokenizers.processors import TemplateProcessing
    from transformers import CLIPConfig, CLIPModel

    directory = Path(directory)
    tokenizer = word_tokenizer(WORDS)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.eos_token_id)])
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4,
                         max_position_embeddings=tokenizer.model_max_length, pad_token_id=0,
                         bos_token_id=2, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=16, patch_size=4),
        projection_dim=16)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28],
        "crop_size": {"height": 16, "width": 16}}))
    return directory


def losses_of_a_moved_policy(task):
    """The task's policy moved off its reference (seeded), then its losses on all its train
    pairs at fixed noise [3, 3, 16, 16] and training steps (10, 500, 990): (losses, noise,
    steps), for a hand computation to match."""
    with torch.no_grad():
        for parameter in task.module.denoiser.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape,
                                              generator=torch.Generator().manual_seed(1)))
    batch = task.make_batch(task.train_examples)
    noise = torch.randn((3, 3, 16, 16), generator=torch.Generator().manual_seed(7))
    steps = torch.tensor([10, 500, 990])
    return task.losses_with(task.module, batch, noise, steps)[0], noise, steps


def on_two_processes(command: str, tree: dict, config_path: Path):
    """``preftune diffusion COMMAND CONFIG`` on two CPU processes (gloo), ``tree`` written to
    ``config_path`` as its config."""
    import yaml
    from forked_python import run_on_two_processes

    config_path.write_text(yaml.safe_dump(tree))
    return run_on_two_processes(["-m", "preftune", "diffusion", command, str(config_path)])
