"""Loading the Stable Diffusion parts for training: dtypes, attention backend, checkpointing.

Trained parts stay fp32 *master* weights and run under autocast: loading them in fp16 and training
them is what produces "Attempting to unscale FP16 gradients". Frozen parts go to fp16/bf16 on a GPU
to save memory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    """DDPM scheduler with the base model's noise schedule: adds noise in training."""
    inference_scheduler: object
    """The base pipeline's own scheduler, saved unchanged into every snapshot."""


def is_local(model: str) -> bool:
    return Path(model).is_dir()


def weight_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """dtype of the frozen parts: half precision only on a GPU (CPU fp16 kernels are slow or missing)."""
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _read_model_index(model: str, *, revision: str | None) -> dict:
    if is_local(model):
        return json.loads((Path(model) / "model_index.json").read_text())
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(model, revision=revision)


def load_components(config, *, device: torch.device) -> Components:
    """Load tokenizer, text encoder, VAE, UNet and the DDPM noise scheduler of `config`'s base model."""
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = config.pretrained_model_name_or_path
    common = dict(revision=config.revision, local_files_only=is_local(model))
    frozen = weight_dtype(config.mixed_precision, device)
    index = _read_model_index(model, revision=config.revision)

    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **common)
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", **common)
    inference_scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(model, subfolder="scheduler",
                                                                                    **common)
    te_dtype = torch.float32 if config.train_text_encoder else frozen
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", variant=config.variant,
                                                 **common).to(device, te_dtype)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", variant=config.variant, **common).to(device, frozen)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", variant=config.variant,
                                                **common).to(device, torch.float32)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(config.train_text_encoder)
    unet.requires_grad_(True)
    return Components(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                      noise_scheduler=noise_scheduler, inference_scheduler=inference_scheduler)


def xformers_works(device: torch.device) -> tuple[bool, str]:
    """Try xformers for real: on Colab it often imports but fails at the first call after a torch update."""
    if device.type != "cuda":
        return False, "xformers needs a CUDA GPU"
    try:
        import xformers.ops

        q = torch.randn(1, 16, 2, 40, device=device, dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
        return True, "xformers works"
    except Exception as err:  # ImportError, or any kernel failure: all mean "use SDPA"
        return False, f"xformers is not usable ({type(err).__name__}: {str(err).splitlines()[0][:120]})"


def set_attention(unet, *, backend: str, device: torch.device) -> str:
    """Select the attention backend and return the one actually used. SDPA is diffusers' default."""
    if backend == "xformers":
        ok, why = xformers_works(device)
        if ok:
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        print(f"Attention: {why}; using PyTorch SDPA instead (same speed within a few percent).")
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def enable_tf32(device: torch.device) -> bool:
    """TF32 matmuls on Ampere and newer: free speed, no visible quality change for diffusion training."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return True
    return False


def enable_gradient_checkpointing(components: Components, *, train_text_encoder: bool) -> None:
    components.unet.enable_gradient_checkpointing()
    if train_text_encoder:
        components.text_encoder.gradient_checkpointing_enable()


def count_parameters(module: torch.nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
