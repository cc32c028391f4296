"""Model families: what differs between Stable Diffusion 1.x/2.x, SDXL, SD 3.x and FLUX.1 — the one place that knows.

Detected once from the base model's `model_index.json` (`BaseModel.family`). A family says which text encoders
and tokenizers the model has, how a prompt becomes the denoiser's conditioning, what the denoiser is (a UNet,
or a transformer) and how it is called, what it learns to predict (its `objective`), how its pipeline is
built, which VAE runs in fp16, what it can be trained and exported as. Everything else asks it and does not
branch on the model: a new family is a new `Family` (a subclass where it behaves differently) in this file
and an entry in `FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreambooth_nb.errors import ConfigError
from dreambooth_nb.model import kohya_flux
from dreambooth_nb.model.objectives import Diffusion, Flow


@dataclass(frozen=True)
class Family:
    """A model family's facts. This class is Stable Diffusion 1.x / 2.x: one CLIP text encoder, its last hidden
    state, no extra conditioning; a family that differs overrides what differs (`SDXLFamily`)."""

    name: str
    pipeline_class: str
    text_encoders: tuple[str, ...]
    """Component names of the text encoders, in the order their hidden states are joined."""
    tokenizers: tuple[str, ...]
    native_resolution: int
    """The size the family's base models were trained at (SD 1.5: 512, SDXL: 1024)."""
    preset: str | None = None
    """The preset every run of this family starts from (`config.PRESETS`): SDXL's, a LoRA at 1024 px."""
    half_precision_vae: str | None = None
    """A VAE to use instead of the base model's wherever the VAE runs in fp16 (None: its own is fine). SDXL's own
    VAE overflows to NaN in fp16; madebyollin/sdxl-vae-fp16-fix does not (what diffusers' SDXL examples and Hugging
    Face's free-Colab SDXL Dreambooth notebook pass as `--pretrained_vae_model_name_or_path`)."""
    encoders_with_unused_parts: tuple[str, ...] = ()
    """The text encoders holding parameters no loss reaches when they train (SDXL's first: only its penultimate
    hidden state is used, so its last layer gets no gradient; the second also gives its pooled output, which
    comes from its last layer). Data-parallel training must let DDP look for unused parameters in these each
    step (`find_unused_parameters`, diffusers #5012), or it stops with "Expected to have finished reduction in
    the prior iteration"."""
    full_fine_tuning: str | None = None
    """Why full fine-tuning of this family is refused (on a 16 GB GPU), or None: it is not."""
    single_file_export: bool = True
    """Whether `results.export` writes this family as one original-layout checkpoint (`model.layout`)."""
    kohya_base_version: str | None = "sd_v1"
    """`ss_base_model_version` of a LoRA file in kohya's layout (how AUTOMATIC1111 and ComfyUI tell the family);
    None: no kohya file is written, the diffusers-format file is the one to share (ComfyUI reads SD3's)."""
    modelspec_architecture: str = "stable-diffusion-v1"
    """`modelspec.architecture` of an exported file (Stability's model spec), "/lora" added for a LoRA."""
    modelspec_implementation: str = "https://github.com/Stability-AI/generative-models"
    """`modelspec.implementation`: the reference code the exported weights are named after."""
    denoiser: str = "unet"
    """The pipeline component that denoises (and trains): "unet", or "transformer" for SD3 and Flux; also its
    subfolder in the model, its file name in states, its group in the optimizer and its LoRA prefix."""
    denoiser_class: str = "UNet2DConditionModel"
    """Its diffusers class."""
    denoiser_label: str = "UNet"
    """What people call it (a memory plan's summary)."""
    objective: Diffusion | Flow = Diffusion()
    """What the denoiser learns to predict (`model.objectives`)."""
    token_limits: tuple[int | None, ...] = ()
    """Tokens per prompt for each tokenizer where training reads fewer than the tokenizer's `model_max_length`
    (None or absent: all of them): SD3's T5 reads 77, as diffusers' SD3 Dreambooth script trains it."""
    text_encoder_training: str | None = None
    """Why `train_text_encoder` is refused for this family, or None: its text encoders can train."""
    guidance_scale: float = 7.5
    """The guidance renders use unless told (`EvalSpec.for_config`): the study's 7.5; SD 3.5's pipeline default,
    7; FLUX.1-dev's distilled guidance, 3.5 (it has no classifier-free guidance; 7.5 oversaturates)."""
    guided_passes: int = 2
    """Samples the denoiser runs per sampling step of a guided render: 2 with classifier-free guidance (the
    prompt and the empty prompt, one batch; the pipelines guide when guidance_scale > 1), 1 for FLUX.1-dev,
    whose guidance is an input of its one pass."""

    def check(self, config) -> None:
        """Refuse settings this family cannot train (its objective's, e.g. min-SNR weighting of a flow, or its
        text encoders'), before anything loads."""
        if config.train_text_encoder and self.text_encoder_training:
            raise ConfigError(self.text_encoder_training)
        self.objective.check(config)

    def _limit(self, number: int) -> int | None:
        return self.token_limits[number] if number < len(self.token_limits) else None

    def tokens_read(self, tokenizers: list) -> list[int]:
        """Tokens per prompt training gives each tokenizer (`token_limits`, else all it reads)."""
        return [min(self._limit(number) or tokenizer.model_max_length, tokenizer.model_max_length)
                for number, tokenizer in enumerate(tokenizers)]

    def token_lengths(self, components: dict) -> list[int]:
        """Tokens per prompt for each text encoder, from their configs (CLIP's 77) or `token_limits`: what the
        memory trace feeds them."""
        return [self._limit(number) or components[name].get("max_position_embeddings", 77)
                for number, name in enumerate(self.text_encoders)]

    def native_size(self, denoiser: dict, vae: dict) -> int:
        """The image size a model of this family was made for, from its denoiser's and VAE's configs: the
        denoiser's sample size × the VAE's downsampling (SD 1.5: 64 × 8)."""
        return int(denoiser["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)

    def native_size_of(self, components: dict[str, dict]) -> int:
        """`native_size` from a model's component configs, by component name."""
        return self.native_size(components[self.denoiser], components["vae"])

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
                added: dict | None) -> torch.Tensor:
        """The denoiser's prediction for a batch: `hidden` the prompts' hidden states, `added` what
        `added_conditioning` gave."""
        return denoiser(noisy, timesteps, hidden, added_cond_kwargs=added).sample

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments for `from_pretrained` that only this family's pipeline takes: SD's would otherwise load
        a safety checker and a CLIP image processor nobody uses here."""
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encode(self, encoders: list, token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states for cross-attention, pooled embedding or None) for a batch of token ids per tokenizer:
        the text encoder's last hidden state."""
        return encoders[0](token_ids[0])[0], None

    def added_conditioning(self, pooled: torch.Tensor | None, *, original_sizes: list, crops: list, resolution: int,
                           device) -> dict | None:
        """The UNet's `added_cond_kwargs` for a batch (each image's original (h, w) and crop's top-left corner), or
        None: SD takes none."""
        return None

    def architecture(self, denoiser_config: dict) -> str:
        """`modelspec.architecture` of a model of this family with this denoiser config (without "/lora")."""
        return self.modelspec_architecture

    def kohya(self, layers: dict[str, dict], *, denoiser_config: dict) -> dict:
        """The adapters of each trained part (PEFT's layout, by part name) in kohya's layout, as this family's
        files name them: diffusers' converter writes `lora_te1_` (SDXL has two text encoders); SD 1.x/2.x files
        say `lora_te_`."""
        return {k.replace("lora_te1_", "lora_te_", 1): v for k, v in _kohya(layers).items()}


@dataclass(frozen=True)
class SDXLFamily(Family):
    """SDXL: two text encoders (their penultimate hidden states side by side, the second's pooled projection) and
    `add_time_ids`: the image's original size, the crop's top-left corner and the target size — the crop the data
    stream actually chose — as diffusers' train_dreambooth_lora_sdxl.py gives them."""

    def pipeline_kwargs(self) -> dict:
        return {}

    def encode(self, encoders: list, token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, pooled = [], None
        for encoder, ids in zip(encoders, token_ids):
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0]  # (the last encoder's: CLIPTextModelWithProjection's text_embeds)
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def added_conditioning(self, pooled: torch.Tensor | None, *, original_sizes: list, crops: list, resolution: int,
                           device) -> dict | None:
        ids = torch.tensor([[*size, *crop, resolution, resolution] for size, crop in zip(original_sizes, crops)],
                           dtype=torch.float32, device=device)
        return {"text_embeds": pooled, "time_ids": ids}

    def kohya(self, layers: dict[str, dict], *, denoiser_config: dict) -> dict:
        return _kohya(layers)


@dataclass(frozen=True)
class SD3Family(Family):
    """Stable Diffusion 3.x (an MMDiT transformer): CLIP-L's and CLIP-G's penultimate hidden states side by side,
    zero-padded to T5's width, then T5's tokens after them in one sequence; their pooled outputs joined as the
    `pooled_projections`; a rectified flow (`objectives.Flow`). As diffusers' StableDiffusion3Pipeline encodes
    a prompt and train_dreambooth_lora_sd3.py trains."""

    def pipeline_kwargs(self) -> dict:
        return {}

    def encode(self, encoders: list, token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        clip, pooled = [], []
        for encoder, ids in zip(encoders[:2], token_ids[:2]):
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0])  # (CLIPTextModelWithProjection's text_embeds)
            clip.append(out.hidden_states[-2])
        t5 = encoders[2](token_ids[2])[0]
        clip = torch.nn.functional.pad(torch.cat(clip, dim=-1), (0, t5.shape[-1] - sum(c.shape[-1] for c in clip)))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def added_conditioning(self, pooled: torch.Tensor | None, *, original_sizes: list, crops: list, resolution: int,
                           device) -> dict | None:
        return {"pooled_projections": pooled}

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
                added: dict | None) -> torch.Tensor:
        return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=hidden,
                        pooled_projections=added["pooled_projections"]).sample


@dataclass(frozen=True)
class FluxFamily(Family):
    """FLUX.1 (a transformer of double- and single-stream blocks): CLIP-L's pooled output is the
    `pooled_projections`, T5's hidden states are the text tokens; the latents are packed 2×2 into tokens of
    4 × 16 channels, each with its (0, row, column) position id, the text tokens' ids zero; FLUX.1-dev takes
    a guidance value through an embedding (it was distilled from guided sampling); a rectified flow. As
    diffusers' FluxPipeline encodes a prompt and train_dreambooth_lora_flux.py trains."""

    training_guidance: float = 1.0
    """The guidance embedding's value in training (FLUX.1-dev; schnell has none): diffusers' Flux Dreambooth
    examples train with `--guidance_scale=1` (examples/dreambooth/README_flux.md)."""

    def pipeline_kwargs(self) -> dict:
        return {}

    def encode(self, encoders: list, token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        pooled = encoders[0](token_ids[0], output_hidden_states=False).pooler_output
        return encoders[1](token_ids[1], output_hidden_states=False)[0], pooled

    def added_conditioning(self, pooled: torch.Tensor | None, *, original_sizes: list, crops: list, resolution: int,
                           device) -> dict | None:
        return {"pooled_projections": pooled}

    def native_size(self, denoiser: dict, vae: dict) -> int:
        return int(vae["sample_size"])  # (Flux's transformer config names no size: it reads any token grid)

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
                added: dict | None) -> torch.Tensor:
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        # Pack, ask, unpack: the loss stays on the latent grid as for every family. (The pipeline's own helpers,
        # at a VAE factor of 1: they are given the latent size, not the image's.)
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guided = getattr(denoiser, "module", denoiser).config.guidance_embeds  # (DDP wraps it on two GPUs)
        guidance = torch.full((b,), self.training_guidance, device=noisy.device) if guided else None
        # The transformer takes t / 1000 (σ) and multiplies by 1000 inside, as FluxPipeline calls it.
        out = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=added["pooled_projections"], encoder_hidden_states=hidden,
                       txt_ids=text_ids, img_ids=image_ids).sample
        return FluxPipeline._unpack_latents(out, h, w, 1)

    def architecture(self, denoiser_config: dict) -> str:
        # FLUX.1-schnell is FLUX.1-dev's transformer without the guidance embedding.
        return self.modelspec_architecture if denoiser_config.get("guidance_embeds") else "flux-1-schnell"

    def kohya(self, layers: dict[str, dict], *, denoiser_config: dict) -> dict:
        # BFL's module names, q/k/v fused (`kohya_flux`): what ComfyUI and Forge look a Flux LoRA up by.
        return kohya_flux.to_kohya(layers[self.denoiser], transformer_config=denoiser_config)


def _kohya(layers: dict[str, dict]) -> dict:
    """diffusers' own PEFT → kohya converter over every part (`unet.…` → `lora_unet_…`, `text_encoder.…` →
    `lora_te1_…`)."""
    from diffusers.utils import convert_state_dict_to_kohya

    return convert_state_dict_to_kohya({f"{name}.{k}": v for name, layer in layers.items() for k, v in layer.items()})


SD = Family(name="sd", pipeline_class="StableDiffusionPipeline", text_encoders=("text_encoder",),
            tokenizers=("tokenizer",), native_resolution=512)
SDXL = SDXLFamily(
    name="sdxl", pipeline_class="StableDiffusionXLPipeline", text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"), native_resolution=1024, preset="sdxl",
    half_precision_vae="madebyollin/sdxl-vae-fp16-fix", encoders_with_unused_parts=("text_encoder",),
    full_fine_tuning="method: full fine-tuning of SDXL does not fit a 16 GB GPU (its UNet alone is 2.6 B parameters: "
                     "10.3 GB as fp32 masters, as much again for gradients); use method='lora' (the 'sdxl' preset).",
    single_file_export=False, kohya_base_version="sdxl_base_v1-0", modelspec_architecture="stable-diffusion-xl-v1-base")
SD3 = SD3Family(
    name="sd3", pipeline_class="StableDiffusion3Pipeline", text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    tokenizers=("tokenizer", "tokenizer_2", "tokenizer_3"), native_resolution=1024, preset="sd3",
    denoiser="transformer", denoiser_class="SD3Transformer2DModel", denoiser_label="transformer", objective=Flow(),
    token_limits=(None, None, 77), guidance_scale=7.0,
    full_fine_tuning="method: full fine-tuning of SD 3.x does not fit a 16 GB GPU (SD 3.5 Medium's transformer alone "
                     "is 2.5 B parameters: 10 GB as fp32 masters, as much again for gradients); use method='lora' "
                     "(the 'sd3' preset).",
    text_encoder_training="train_text_encoder: SD 3.x's text encoders (two CLIPs and T5-XXL, 4.7 B parameters) do "
                          "not train here; the transformer's LoRA learns the subject. Set train_text_encoder=False.",
    single_file_export=False, kohya_base_version=None, modelspec_architecture="stable-diffusion-v3-medium")
FLUX = FluxFamily(
    name="flux", pipeline_class="FluxPipeline", text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"), native_resolution=1024, preset="flux", denoiser="transformer",
    denoiser_class="FluxTransformer2DModel", denoiser_label="transformer", objective=Flow(),
    token_limits=(None, 512), guidance_scale=3.5, guided_passes=1,
    full_fine_tuning="method: full fine-tuning of FLUX.1 does not fit a 16 GB GPU (its transformer alone is 12 B "
                     "parameters: 48 GB as fp32 masters); use method='lora' (the 'flux' preset).",
    text_encoder_training="train_text_encoder: FLUX.1's text encoders (CLIP-L and T5-XXL, 4.9 B parameters) do not "
                          "train here; the transformer's LoRA learns the subject. Set train_text_encoder=False.",
    single_file_export=False, kohya_base_version="flux1", modelspec_architecture="flux-1-dev",
    modelspec_implementation="https://github.com/black-forest-labs/flux")
FAMILIES = {"StableDiffusionPipeline": SD, "StableDiffusionXLPipeline": SDXL, "StableDiffusion3Pipeline": SD3,
            "FluxPipeline": FLUX}
"""Each family by the pipeline class its `model_index.json` names."""


def family_named(name: str) -> Family:
    """The family called `name` (`Family.name`: \"sd\", \"sdxl\")."""
    return next(family for family in FAMILIES.values() if family.name == name)


def family_of(model_index: dict, *, source: str = "the model") -> Family:
    """The family of a pipeline from its `model_index.json` (`_class_name`)."""
    name = model_index.get("_class_name", "")
    if name not in FAMILIES:
        raise ConfigError(f"pretrained_model_name_or_path: {source} is a {name or 'pipeline of unknown type'}; "
                          f"this suite trains {', '.join(FAMILIES)} models (SD 1.x, 2.x, SDXL, SD 3.x and FLUX.1).")
    return FAMILIES[name]
