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


def build_t5_tokenizer(words, *, model_max_length: int = 512):
    """A T5 tokenizer (`T5TokenizerFast`) whose Unigram vocabulary holds `words` as single tokens.

    T5's layout: `<pad>` 0, `</s>` 1, `<unk>` 2, and `</s>` closes every prompt. Each word is a piece with its
    leading-space mark (`▁photo`) and every character is a piece too, so any prompt tokenizes, a word we name
    as one token (it scores higher than its characters). No normalizer: transformers 5's T5 tokenizer drops
    one on save/load, so T5's own case sensitivity is kept, with capitals as pieces of their own.
    `model_max_length`: what SD3's and Flux's T5 tokenizers say; T5's relative positions have no hard limit
    and the pipelines pass their own `max_sequence_length`.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces = [("▁" + word, -1.0) for word in sorted(set(words))]
    pieces += [(ch, -3.0) for ch in "▁" + _ALPHABET + string.ascii_uppercase]
    tokenizer = Tokenizer(Unigram(specials + pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    # extra_ids=0: no 100 `<extra_id_n>` sentinels (span corruption pre-training only), a vocabulary of ~90.
    return T5TokenizerFast(tokenizer_object=tokenizer, extra_ids=0, pad_token="<pad>", eos_token="</s>",
                           unk_token="<unk>", model_max_length=model_max_length)


def build_t5_encoder(tokenizer, *, d_model: int, seed: int = 0):
    """A tiny `T5EncoderModel` shaped as T5 v1.1 (gated-GELU feed-forward), the T5-XXL of SD3 and Flux."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 2, d_ff=2 * d_model, num_layers=2,
                      num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config)


def _flow_vae(*, scaling_factor: float, shift_factor: float, seed: int = 0):
    """SD3's and Flux's VAE shape at toy size: 16 latent channels, latents shifted then scaled, no quant convs."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=16, layers_per_block=1,
        norm_num_groups=8, sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=False, use_post_quant_conv=False)


def build_tiny_sd3_pipeline(path, *, words=TINY_WORDS, seed: int = 0) -> Path:
    """Save a random tiny `StableDiffusion3Pipeline` to `path` (32 px images, 16 px latents) and return it.

    SD3 (medium, 3.0) at toy size: two CLIP encoders with projections (CLIP-L and OpenCLIP bigG, here 32 and
    48 wide: their pooled outputs side by side are the transformer's pooled projection, their penultimate states
    side by side are zero-padded to T5's width) and a T5 encoder, whose states follow the CLIP ones in the
    joint attention; an MMDiT over 2×2 patches; flow matching with SD3's shift of 3.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer, t5_tokenizer = build_tokenizer(words), build_t5_tokenizer(words)
    encoders = []
    for hidden, act in ((32, "quick_gelu"), (48, "gelu")):  # CLIP-L's activation, OpenCLIP bigG's
        torch.manual_seed(seed)
        config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=2, num_attention_heads=2, projection_dim=hidden,
                                max_position_embeddings=tokenizer.model_max_length, hidden_act=act,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
        encoders.append(CLIPTextModelWithProjection(config))
    t5_width = 96  # ≥ 32 + 48: the CLIP states are padded to it, not cut
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_width, pooled_projection_dim=32 + 48,
        caption_projection_dim=32,  # = heads × head width: text and image tokens share the blocks' width
        pos_embed_max_size=24)  # 3× the 8-patch grid, as SD3's 192 for 64: up to 96 px images
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(scaling_factor=1.5305, shift_factor=0.0609, seed=seed),
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=build_t5_encoder(t5_tokenizer, d_model=t5_width, seed=seed), tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(Path(path), safe_serialization=True)
    return Path(path)


def build_tiny_flux_pipeline(path, *, words=TINY_WORDS, seed: int = 0) -> Path:
    """Save a random tiny `FluxPipeline` to `path` (32 px images, 16 px latents) and return it.

    FLUX.1-dev at toy size: a CLIP encoder whose pooled output is the transformer's pooled projection, a T5
    encoder whose states are the text tokens, a transformer of double- and single-stream blocks over latents
    packed 2×2 (64 = 4 × 16 channels a token), guidance distilled into an embedding, flow matching whose shift
    grows with the image's token count.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, t5_tokenizer = build_tokenizer(words), build_t5_tokenizer(words)
    text_encoder = build_text_encoder(tokenizer, hidden_size=32, seed=seed)
    t5_width = 64
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_width, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6))  # rotary widths of (text/image index, row, column); they sum to the head width
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_flow_vae(scaling_factor=0.3611, shift_factor=0.1159,
                                                                    seed=seed),
        text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=build_t5_encoder(t5_tokenizer, d_model=t5_width, seed=seed), tokenizer_2=t5_tokenizer)
    pipe.save_pretrained(Path(path), safe_serialization=True)
    return Path(path)
