"""What a run trains — the whole UNet (full fine-tuning, the study's method) or LoRA adapters on it — and
what that means for loading, states and snapshots. The one place that knows the difference; the training
loop asks it and does not branch.

    method = method_for(config)
    parts = models.load_components(config, ..., method=method)   # dtypes the method wants
    trained = method.setup(parts)                                 # {"unet": ..., "text_encoder": ...}
    method.saved_tensors(module)                                  # what a state holds for a trained part
    method.save_snapshot(path, ...)                               # what a snapshot holds

LoRA is built on PEFT (`unet.add_adapter(LoraConfig(...))`), the way diffusers' `train_dreambooth_lora.py`
does it: the base weights frozen in half precision on a GPU, the adapters trained as fp32 masters.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dreambooth_nb.errors import ConfigError
from dreambooth_nb.model import snapshots

# The text encoder's attention projections, as diffusers' train_dreambooth_lora.py targets them.
LORA_TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class FullFineTuning:
    """Every UNet weight trains (and the text encoder's with `train_text_encoder`), as fp32 masters."""

    name = "full"

    def __init__(self, config):
        self.config = config

    def check(self, family) -> None:
        """Refuse what this method cannot do with the model's family, before anything downloads."""
        if family.full_fine_tuning:
            raise ConfigError(family.full_fine_tuning)

    def load_dtype(self, part: str, *, frozen: torch.dtype) -> torch.dtype:
        """The dtype a part is loaded in: trained parts are fp32 masters, frozen ones half precision on a GPU."""
        trained = part == "unet" or (part.startswith("text_encoder") and self.config.train_text_encoder)
        return torch.float32 if trained else frozen

    def setup(self, parts) -> dict[str, torch.nn.Module]:
        parts.vae.requires_grad_(False)
        parts.unet.requires_grad_(True)
        for encoder in parts.text_encoders:
            encoder.requires_grad_(self.config.train_text_encoder)
        return _trained_parts(parts, self.config)

    def saved_tensors(self, module) -> dict[str, torch.Tensor]:
        """A state holds the whole trained part."""
        return dict(module.state_dict())

    def save_snapshot(self, path: Path, *, step: int, parts, weights: dict, dtype: torch.dtype) -> None:
        snapshots.save(path, step=step, config=self.config, parts=parts, trained=weights, dtype=dtype,
                       complete=step == self.config.max_train_steps)


class LoRA(FullFineTuning):
    """Low-rank adapters on the UNet's attention projections (and the text encoder's, with
    `train_text_encoder`); the base model stays frozen. States and snapshots hold the adapters only."""

    name = "lora"

    def check(self, family) -> None:
        """LoRA trains every family."""

    def load_dtype(self, part: str, *, frozen: torch.dtype) -> torch.dtype:
        return frozen  # every base weight is frozen; the adapters are added in fp32 by `setup`

    def setup(self, parts) -> dict[str, torch.nn.Module]:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig, inject_adapter_in_model

        config = self.config
        for module in (parts.vae, parts.unet, *parts.text_encoders):
            module.requires_grad_(False)
        common = dict(r=config.lora_rank, lora_alpha=self.alpha, lora_dropout=config.lora_dropout,
                      init_lora_weights="gaussian")
        # The adapters' random start from `seed`, whatever the process drew before: the same run in a fresh
        # worker (several GPUs) or in a notebook kernel that trained before starts from the same adapters.
        device = next(parts.unet.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config.seed)
            parts.unet.add_adapter(LoraConfig(target_modules=list(config.lora_target_modules), **common))
            if config.train_text_encoder:
                # PEFT's own injection, not transformers' `add_adapter`: transformers 5 demands a PEFT release
                # (0.22) that package indexes may not have yet, and the result is the same adapter layers.
                for encoder in parts.text_encoders:
                    inject_adapter_in_model(LoraConfig(target_modules=LORA_TEXT_ENCODER_TARGETS, **common), encoder)
        trained = _trained_parts(parts, config)
        # The adapters train as fp32 masters under autocast, over half-precision base weights.
        cast_training_params(list(trained.values()), dtype=torch.float32)
        return trained

    @property
    def alpha(self) -> float:
        return self.config.lora_alpha if self.config.lora_alpha is not None else float(self.config.lora_rank)

    def saved_tensors(self, module) -> dict[str, torch.Tensor]:
        """A state holds the adapters only (a few MB), by their parameter names."""
        return {name: param for name, param in module.named_parameters() if ".lora_" in name}

    def save_snapshot(self, path: Path, *, step: int, parts, weights: dict, dtype: torch.dtype) -> None:
        snapshots.save_lora(path, step=step, config=self.config, parts=parts, adapters=weights, dtype=dtype,
                            alpha=self.alpha)


METHODS = {"full": FullFineTuning, "lora": LoRA}


def method_for(config):
    return METHODS[config.method](config)


def _trained_parts(parts, config) -> dict[str, torch.nn.Module]:
    """The UNet first, then the text encoders (both of SDXL's) when they train."""
    trained = {"unet": parts.unet}
    if config.train_text_encoder:
        trained.update({name: getattr(parts, name) for name in parts.family.text_encoders})
    return trained
