"""What a run trains — the whole denoiser (full fine-tuning, the study's method) or LoRA adapters on it — and
what that means for loading, states and snapshots. The one place that knows the difference; the training
loop asks it and does not branch.

    method = method_for(config)
    parts = models.load_components(config, ..., method=method)   # dtypes the method wants
    trained = method.setup(parts)                                 # {"unet": ..., "text_encoder": ...}
                                                                  # (the denoiser by its family's name)
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
    """Every weight of the denoiser (the UNet) trains (and the text encoder's with `train_text_encoder`), as
    fp32 masters."""

    name = "full"
    title = "full fine-tuning"
    trains = "{denoiser}"
    """What trains, in a memory plan's one-line summary (`{denoiser}`: the family's, "UNet" or "transformer")."""
    lighter: str | None = "lora"
    """The method to switch to when every memory saver is on and it still does not fit (the last saver)."""
    frozen_base: bool = False
    """Whether the denoiser's own weights stay frozen (adapters train on them): only then may they load in 4 bits
    (`load_in_4bit`, QLoRA)."""

    def __init__(self, config):
        self.config = config

    def label(self, denoiser: str) -> str:
        """What trains, for summaries (`denoiser`: what the family calls its denoiser, "UNet" or "transformer")."""
        return f"{self.title} of the {denoiser}"

    @property
    def run_suffix(self) -> str:
        """What the run folder's name adds for this method (`project.run_name`): nothing for the study's method."""
        return ""

    def snapshot_bytes(self, *, trained: int, total: int, complete: bool, weight_bytes: int) -> int:
        """Bytes of a snapshot: the trained parts, or (`complete`: the final one) the whole pipeline."""
        return (total if complete else trained) * weight_bytes

    def snapshot_contents(self, *, complete: bool) -> str:
        return "complete pipeline" if complete else "trained weights"

    @property
    def final_snapshot_complete(self) -> bool:
        """Whether the last snapshot is a complete pipeline (`from_pretrained(it)`), or like every other one."""
        return True

    @staticmethod
    def trace_adapters(modules: dict, *, options: tuple, frozen_dtype) -> None:
        """What the planner's trace adds to the fake modules it builds (`planning.planner`): nothing here, every
        weight of the trained parts trains."""

    def trace_options(self) -> tuple:
        """The settings that shape `trace_adapters` (part of the trace's cache key)."""
        return ()

    def check(self, family) -> None:
        """Refuse what this method cannot do with the model's family, before anything downloads."""
        if family.full_fine_tuning:
            raise ConfigError(family.full_fine_tuning)
        if self.config.load_in_4bit and not self.frozen_base:
            raise ConfigError("load_in_4bit: a 4-bit base cannot be trained itself, only adapters on it (QLoRA); "
                              "use method='lora', or set load_in_4bit=False.")

    def load_dtype(self, part: str, *, frozen: torch.dtype) -> torch.dtype:
        """The dtype `part` (the denoiser or a text encoder) is loaded in: trained parts are fp32 masters, frozen
        ones half precision on a GPU."""
        trained = not part.startswith("text_encoder") or self.config.train_text_encoder
        return torch.float32 if trained else frozen

    def setup(self, parts) -> dict[str, torch.nn.Module]:
        parts.vae.requires_grad_(False)
        parts.denoiser.requires_grad_(True)
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
    title = "LoRA"
    trains = "LoRA on the {denoiser}"
    lighter = None
    frozen_base = True

    def label(self, denoiser: str) -> str:
        return f"LoRA, rank {self.config.lora_rank} on the {denoiser}'s {', '.join(self.config.lora_target_modules)}"

    @property
    def run_suffix(self) -> str:
        return "-lora"

    def snapshot_bytes(self, *, trained: int, total: int, complete: bool, weight_bytes: int) -> int:
        """Every snapshot holds the adapters, twice: diffusers' format and kohya's."""
        return 2 * trained * weight_bytes

    def snapshot_contents(self, *, complete: bool) -> str:
        return "LoRA adapters"

    @property
    def final_snapshot_complete(self) -> bool:
        return False

    @staticmethod
    def trace_adapters(modules: dict, *, options: tuple, frozen_dtype) -> None:
        """The base frozen in 16-bit (fp32 on CPU) and an adapter of the memory shape of PEFT's on each target."""
        rank, dropout, targets = options
        for name, module in modules.items():
            freeze_as(module, frozen_dtype)
            text = name.startswith("text_encoder")
            _add_trace_lora(module, targets=tuple(LORA_TEXT_ENCODER_TARGETS) if text else targets,
                            rank=rank, dropout=dropout)

    def trace_options(self) -> tuple:
        return (self.config.lora_rank, self.config.lora_dropout, tuple(self.config.lora_target_modules))

    def check(self, family) -> None:
        """LoRA trains every family."""

    def load_dtype(self, part: str, *, frozen: torch.dtype) -> torch.dtype:
        return frozen  # every base weight is frozen; the adapters are added in fp32 by `setup`

    def setup(self, parts) -> dict[str, torch.nn.Module]:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig, inject_adapter_in_model

        config = self.config
        for module in (parts.vae, parts.denoiser, *parts.text_encoders):
            module.requires_grad_(False)
        common = dict(r=config.lora_rank, lora_alpha=self.alpha, lora_dropout=config.lora_dropout,
                      init_lora_weights="gaussian")
        # The adapters' random start from `seed`, whatever the process drew before: the same run in a fresh
        # worker (several GPUs) or in a notebook kernel that trained before starts from the same adapters.
        device = next(parts.denoiser.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config.seed)
            parts.denoiser.add_adapter(LoraConfig(target_modules=list(config.lora_target_modules), **common))
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
"""Each method by its `TrainConfig.method` name. A new method is a class here and an entry in this table."""


def method_for(config):
    return METHODS[config.method](config)


# --- The planner's stand-in for LoRA layers ----------------------------------------------------------------------
class _TraceLoraLinear(torch.nn.Module):
    """A frozen Linear plus a trained low-rank update: the memory shape of PEFT's LoRA layer, for a trace."""

    def __init__(self, base: torch.nn.Linear, *, rank: int, dropout: float):
        super().__init__()
        self.base = base
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        self.down = torch.nn.Linear(base.in_features, rank, bias=False, dtype=torch.float32)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False, dtype=torch.float32)

    def forward(self, x):
        return self.base(x) + self.up(self.down(self.dropout(x)))


def _add_trace_lora(module: torch.nn.Module, *, targets: tuple[str, ...], rank: int, dropout: float) -> None:
    names = [name for name, child in module.named_modules()
             if isinstance(child, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, _TraceLoraLinear(getattr(parent, child), rank=rank, dropout=dropout))


def freeze_as(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Frozen weights in `dtype`, replaced one by one (`Module.to` cannot swap fake parameters in place)."""
    for child in module.modules():
        for name, param in list(child.named_parameters(recurse=False)):
            child._parameters[name] = torch.nn.Parameter(param.detach().to(dtype), requires_grad=False)


def _trained_parts(parts, config) -> dict[str, torch.nn.Module]:
    """The denoiser first, then the text encoders (both of SDXL's) when they train."""
    trained = {parts.family.denoiser: parts.denoiser}
    if config.train_text_encoder:
        trained.update({name: getattr(parts, name) for name in parts.family.text_encoders})
    return trained
