"""Tiny Stable Diffusion components built from configs, with no download.

Used by the tests (a random pipeline proves the code *runs*), by `bench/` (an SD 1.5-shaped random UNet
for GPU memory numbers) and by the toy-model trainer (`tools/train_toy_model.py`), which trains one of
these from scratch so that the project has a model that really *learns*.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dreambooth_nb.model import KNOWN_MODELS

# Every single character a prompt may contain gets a token, alone and as a word end (`a</w>`).
_ALPHABET = string.ascii_lowercase + string.digits + ".,'!?-:;()/&"
_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def build_tokenizer(words, *, model_max_length: int = 16) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer whose vocabulary holds `words` as single tokens.

    With an empty merges list every word falls apart into characters, so prompts still tokenize, but
    words we name are whole tokens: for each word we add the chain of merges that builds it
    (`p h`, `ph o`, `pho t`, `phot o</w>`) and every intermediate piece to the vocabulary.
    """
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for ch in _ALPHABET:
        add(ch)
        add(ch + "</w>")
    merges: list[str] = []
    seen = set()
    for word in sorted({w.lower() for w in words}):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pieces[0] + pieces[1]
            if pair not in seen:
                seen.add(pair)
                merges.append(f"{pair[0]} {pair[1]}")
            add(merged)
            pieces = [merged] + pieces[2:]
    for token in _SPECIAL:
        add(token)
    # Files + from_pretrained is the one constructor that transformers 4.x (Colab) and 5.x share.
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


def build_text_encoder(tokenizer: CLIPTokenizer, *, hidden_size: int = 32, layers: int = 2, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(*, cross_attention_dim: int = 32, sample_size: int = 16, channels=(16, 32), seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_vae(*, channels=(16, 32), seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
    )


TINY_WORDS = ["a", "photo", "of", "sks", "dog", "cat", "in", "the", "snow", "as", "an", "oil", "painting", "on", "beach"]


def build_tiny_pipeline(path, *, words=TINY_WORDS, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save a random tiny `StableDiffusionPipeline` to `path` (32 px images, 16 px latents) and return it.

    `StableDiffusionPipeline.from_pretrained(path)` loads it with no network; a training step takes
    milliseconds on CPU.
    """
    tokenizer = build_tokenizer(words)
    return _save_sd_pipeline(path, vae=build_vae(seed=seed), text_encoder=build_text_encoder(tokenizer, seed=seed),
                             tokenizer=tokenizer, unet=build_unet(seed=seed), scheduler=_sd_scheduler(prediction_type))


def _sd_scheduler(prediction_type: str = "epsilon"):
    """Stable Diffusion 1.x's scheduler: PNDM over the scaled-linear betas 0.00085..0.012."""
    from diffusers import DDPMScheduler, PNDMScheduler

    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type)
    return PNDMScheduler.from_config(ddpm.config, skip_prk_steps=True, steps_offset=1)


def _save_sd_pipeline(path, **parts) -> Path:
    """Save a `StableDiffusionPipeline` of `parts` (vae, text_encoder, tokenizer, unet, scheduler), without a
    safety checker, to `path` and return it."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_sd15_shaped_pipeline(path, *, seed: int = 0) -> Path:
    """A randomly initialised pipeline with Stable Diffusion 1.5's exact shapes (UNet 859.5 M parameters).

    For memory and speed measurements on a GPU where the real weights cannot be downloaded: memory and
    FLOPs depend on the shapes only, not on the values.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tokenizer = build_tokenizer(TINY_WORDS, model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return _save_sd_pipeline(path, vae=vae, text_encoder=CLIPTextModel(config), tokenizer=tokenizer, unet=unet,
                             scheduler=_sd_scheduler())


def build_sd_topology_pipeline(path, *, version: int = 1, width: int = 16, words=TINY_WORDS, seed: int = 0) -> Path:
    """A random tiny pipeline with Stable Diffusion's *topology* at a small `width`; 64 px images, 8 px latents.

    Single-file checkpoints (`dreambooth_nb.results.export`, diffusers' `from_single_file`) name weights by block
    position, and diffusers' converters assume SD's layout: a UNet of 4 blocks × 2 layers (3 with
    cross-attention, channels ×1, ×2, ×4, ×4 as SD 1.5's 320, 640, 1280, 1280) and a VAE of 4 blocks ×
    2 layers. `build_tiny_pipeline`'s 2-block UNet does not have that shape.

    `version=1`: SD 1.x (CLIP text encoder with quick-GELU, convolutional attention projections, PNDM,
    epsilon). `version=2`: SD 2.x (OpenCLIP's text encoder as diffusers stores it — CLIPTextModel with GELU —,
    linear attention projections, 64-channel heads scaled down, upcast attention, DDIM, v-prediction), as in
    stabilityai/stable-diffusion-2-1's configs.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    tokenizer = build_tokenizer(words)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=2 * width, intermediate_size=8 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu" if version == 1 else "gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    channels = (width, 2 * width, 4 * width, 4 * width)
    heads = 2 if version == 1 else tuple(c // 8 for c in channels)  # SD 2.x: a fixed head width (64 there)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=channels, layers_per_block=2, cross_attention_dim=2 * width,
        attention_head_dim=heads, norm_num_groups=8, use_linear_projection=version == 2,
        upcast_attention=version == 2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 32, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    if version == 1:
        scheduler = _sd_scheduler()
    else:
        ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             prediction_type="v_prediction")
        scheduler = DDIMScheduler.from_config(ddpm.config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return _save_sd_pipeline(path, vae=vae, text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer, unet=unet,
                             scheduler=scheduler)


def build_tiny_sdxl_pipeline(path, *, words=TINY_WORDS, seed: int = 0) -> Path:
    """Save a random tiny `StableDiffusionXLPipeline` to `path` (32 px images, 16 px latents) and return it.

    SDXL's shape at toy size: two CLIP text encoders (the second with a projection, whose pooled output and
    the six `add_time_ids` go into the UNet's `text_time` embedding), cross-attention over both encoders'
    hidden states side by side, linear attention projections, an Euler scheduler.
    """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    tokenizer = build_tokenizer(words)
    hidden, time_dim = 32, 8  # each encoder's width; the size of each of the 6 time ids' embedding
    encoders = []
    for with_projection in (False, True):
        torch.manual_seed(seed)
        config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=2, num_attention_heads=2, projection_dim=hidden,
                                max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu",
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
        encoders.append((CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
        cross_attention_dim=2 * hidden, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + hidden)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=build_vae(seed=seed), text_encoder=encoders[0], text_encoder_2=encoders[1],
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_sdxl_shaped_pipeline(path, *, seed: int = 0) -> Path:
    """A randomly initialised pipeline with SDXL base 1.0's exact shapes (UNet 2.57 B parameters), in fp16.

    For memory and speed measurements on a GPU where the real weights cannot be downloaded; built from the
    configs in `known_models/` and saved in fp16 (5 GB for the UNet) to keep the build short.
    """
    import torch
    import transformers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    known = KNOWN_MODELS / "stabilityai" / "stable-diffusion-xl-base-1.0"
    tokenizer = build_tokenizer(TINY_WORDS, model_max_length=77)
    torch.manual_seed(seed)
    parts = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(known / "unet")),
             "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(known / "vae"))}
    for name, model_class in (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection")):
        config = transformers.CLIPTextConfig.from_pretrained(known / name)
        parts[name] = getattr(transformers, model_class)(config)
    scheduler = EulerDiscreteScheduler.from_pretrained(known, subfolder="scheduler")
    pipe = StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler, **parts)
    pipe.to(torch.float16).save_pretrained(Path(path), safe_serialization=True)
    return Path(path)
