"""Model families: what differs between Stable Diffusion 1.x/2.x and SDXL — the one place that knows.

Detected once from the base model's `model_index.json`. A family says which text encoders and tokenizers
the model has, how a prompt becomes the UNet's conditioning (one CLIP encoder; or two, their penultimate
hidden states side by side, plus the second one's pooled projection), what extra conditioning the UNet
takes (SDXL's `add_time_ids`: the image's original size, the crop's top-left corner and the target size —
the crop the data stream actually chose), and how its pipeline is built. The training loop asks it and
does not branch on the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreambooth_nb.errors import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str
    text_encoders: tuple[str, ...]
    """Component names of the text encoders, in the order their hidden states are joined."""
    tokenizers: tuple[str, ...]
    native_resolution: int
    """The size the family's base models were trained at (SD 1.5: 512, SDXL: 1024)."""
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

    @property
    def is_sdxl(self) -> bool:
        return self.name == "sdxl"

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments for `from_pretrained` that only this family's pipeline takes."""
        if self.is_sdxl:
            return {}
        # SD's pipelines would otherwise load a safety checker and a CLIP image processor nobody uses here.
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encode(self, encoders: list, token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states for cross-attention, pooled embedding or None) for a batch of token ids per tokenizer.

        SD: the text encoder's last hidden state. SDXL, as diffusers' train_dreambooth_lora_sdxl.py: each
        encoder's penultimate hidden state, concatenated, and the second encoder's projected pooled output.
        """
        if not self.is_sdxl:
            return encoders[0](token_ids[0])[0], None
        hidden, pooled = [], None
        for encoder, ids in zip(encoders, token_ids):
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0]  # (the last encoder's: CLIPTextModelWithProjection's text_embeds)
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def added_conditioning(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict | None:
        """The UNet's `added_cond_kwargs` (SDXL), or None."""
        if not self.is_sdxl:
            return None
        return {"text_embeds": pooled, "time_ids": time_ids}


SD = Family(name="sd", pipeline_class="StableDiffusionPipeline", text_encoders=("text_encoder",),
            tokenizers=("tokenizer",), native_resolution=512)
SDXL = Family(name="sdxl", pipeline_class="StableDiffusionXLPipeline",
              text_encoders=("text_encoder", "text_encoder_2"), tokenizers=("tokenizer", "tokenizer_2"),
              native_resolution=1024, half_precision_vae="madebyollin/sdxl-vae-fp16-fix",
              encoders_with_unused_parts=("text_encoder",))
FAMILIES = {"StableDiffusionPipeline": SD, "StableDiffusionXLPipeline": SDXL}


def family_of(model_index: dict, *, source: str = "the model") -> Family:
    """The family of a pipeline from its `model_index.json` (`_class_name`)."""
    name = model_index.get("_class_name", "")
    if name not in FAMILIES:
        raise ConfigError(f"pretrained_model_name_or_path: {source} is a {name or 'pipeline of unknown type'}; "
                          f"this suite trains {', '.join(FAMILIES)} models (SD 1.x, 2.x and SDXL).")
    return FAMILIES[name]


def time_ids(*, original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]):
    """SDXL's micro-conditioning for one image: (original h, w, crop top, crop left, target h, w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
