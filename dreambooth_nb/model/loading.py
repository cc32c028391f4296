"""Loading the Stable Diffusion parts for training: dtypes, attention backend, checkpointing.

Trained parts stay fp32 *master* weights and run under autocast: loading them in fp16 and training
them is what produces "Attempting to unscale FP16 gradients". Frozen parts go to fp16/bf16 on a GPU
to save memory.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import torch

from dreambooth_nb.errors import ConfigError
from dreambooth_nb.model.base import BaseModel, empty_modules
from dreambooth_nb.dtypes import diffusers_dtype, transformers_dtype
from dreambooth_nb.model.families import Family
from dreambooth_nb.model.methods import method_for
from dreambooth_nb.model.quantization import NF4


@dataclass
class Components:
    family: Family
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    denoiser: torch.nn.Module | None
    """The UNet (SD, SDXL) or transformer: the family's `denoiser` component (None until `load_denoiser`)."""
    noise_scheduler: object
    """The scheduler of the family's objective with the base model's schedule: adds noise in training."""
    inference_scheduler: object
    """The base pipeline's own scheduler, saved unchanged into every snapshot."""
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None
    """SDXL's and SD3's second tokenizer and text encoder (with projection); None for SD 1.x/2.x."""
    tokenizer_3: object = None
    text_encoder_3: torch.nn.Module | None = None
    """SD3's T5 tokenizer and encoder."""
    vae_source: str | None = None
    """Where the VAE came from when not from the base model (SDXL's fp16-fix VAE): snapshots record it."""

    def part(self, name: str) -> torch.nn.Module:
        """A model component by its pipeline name ("unet" or "transformer" is the denoiser)."""
        return self.denoiser if name == self.family.denoiser else getattr(self, name)

    @property
    def text_encoders(self) -> list:
        """The text encoders still loaded (`release_text_encoders` lets them go)."""
        return [getattr(self, name) for name in self.family.text_encoders if getattr(self, name) is not None]

    def release_text_encoders(self) -> None:
        """Let the frozen text encoders go once every prompt is encoded, when nothing saves them later (a LoRA's
        snapshots hold adapters only): SD3's T5-XXL would otherwise hold 9.5 GB of a 12.7 GB Colab VM's RAM."""
        for name in self.family.text_encoders:
            setattr(self, name, None)

    @property
    def tokenizers(self) -> list:
        return [getattr(self, name) for name in self.family.tokenizers]


def vae_source(config, *, family: Family, half: bool) -> str | None:
    """The VAE to load instead of the base model's: the config's, else the family's for half precision where
    the VAE runs in fp16 (SDXL's fp16-fix one; bf16 and fp32 do not overflow), else None."""
    if config.vae_model_name_or_path:
        return config.vae_model_name_or_path
    return family.half_precision_vae if half else None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def unsupported_gpu(*, name: str, capability: tuple[int, int], arch_list: list[str], torch_version: str) -> str | None:
    """Why this torch cannot run on this GPU, or None. A build runs on a GPU it has machine code for (an `sm_XY`
    of the same major version, minor ≤ the GPU's) or PTX it can compile there (a `compute_XY` at or below the
    GPU's capability). Kaggle's current torch has no sm_60 code, so its P100s fail at the first kernel."""
    major, minor = capability
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        if not number.isdigit() or len(number) < 2:
            continue
        arch_major, arch_minor = int(number[:-1]), int(number[-1])
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return None
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return None
    built = ", ".join(a for a in arch_list if a.startswith("sm_")) or "no GPU"
    return (f"This torch ({torch_version}) cannot run on the {name} (compute capability {major}.{minor}): it was built "
            f"for {built}. Choose another GPU: on Kaggle, Settings > Accelerator > GPU T4 x2; on Colab, a T4.")


def gpu_problem() -> str | None:
    """Why the GPU here cannot train (see `unsupported_gpu`), or None (it can, or there is none)."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return unsupported_gpu(name=props.name, capability=(props.major, props.minor), arch_list=torch.cuda.get_arch_list(),
                           torch_version=torch.__version__)


def bf16_supported(device: torch.device) -> bool:
    """bf16 runs natively: on CPU, and on GPUs of compute capability 8.0 and newer (Ampere: A100, L4, RTX 30).

    `torch.cuda.is_bf16_supported()` also says True on a T4 (sm_75), where bf16 is emulated and slow.
    """
    if device.type != "cuda":
        return device.type == "cpu"
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(requested: str, device: torch.device) -> str:
    """The mixed precision a run uses on `device`: "auto" decided here, impossible choices refused."""
    if requested == "auto":
        if device.type != "cuda":
            return "no"
        return "bf16" if bf16_supported(device) else "fp16"
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("mixed_precision: 'fp16' needs a CUDA GPU and this runtime has none; use 'auto' "
                          "(fp32 here, fp16 on a T4), 'no', or 'bf16' on CPU.")
    if requested == "bf16" and not bf16_supported(device):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"mixed_precision: this GPU ({name}) has no native bf16 (it needs compute capability "
                          "8.0 or newer; a T4 is 7.5) and emulating it is slow; use 'fp16' or 'auto'.")
    return requested


def weight_dtype(precision: str, device: torch.device) -> torch.dtype:
    """dtype of the frozen parts: half precision only on a GPU (CPU fp16 kernels are slow or missing)."""
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def load_components(config, *, device: torch.device, precision: str, method=None,
                    base: BaseModel | None = None, with_denoiser: bool = True) -> Components:
    """Load tokenizers, text encoders, VAE, denoiser and the training noise scheduler of `config`'s base model (`base`:
    the run's `BaseModel`, made here if not given). `with_denoiser=False` leaves the denoiser for `load_denoiser`:
    training encodes the prompts with frozen text encoders first, so that the two never share the GPU.

    Each part is loaded in the dtype `method` (`methods.method_for(config)`) wants — trained parts fp32,
    frozen parts half precision on a GPU — never cast after loading: diffusers keeps some modules in fp32
    only when it knows the dtype at load. Which parameters train is the method's business (`setup`).
    """
    import diffusers
    import transformers
    from diffusers import AutoencoderKL

    base = base or BaseModel.of(config)
    model, common, index, family = base.path, base.load_kwargs(), base.index, base.family
    frozen = weight_dtype(precision, device)
    method = method or method_for(config)

    def transformers_part(name: str, **kwargs):  # the class model_index.json names, e.g. CLIPTextModelWithProjection
        return getattr(transformers, index[name][1]).from_pretrained(model, subfolder=name, **kwargs, **common)

    text = {name: transformers_part(name) for name in family.tokenizers}
    for name in family.text_encoders:
        # Straight onto the device, tensor by tensor: T5-XXL (9.5 GB in 16 bits) never sits whole in host memory.
        text[name] = transformers_part(name, variant=config.variant, device_map={"": device},
                                       **transformers_dtype(method.load_dtype(name, frozen=frozen)))
    noise_scheduler = getattr(diffusers, family.objective.scheduler_class).from_pretrained(model, subfolder="scheduler",
                                                                                           **common)
    inference_scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(model, subfolder="scheduler",
                                                                                    **common)
    other_vae = vae_source(config, family=family, half=frozen != torch.float32)
    vae = (AutoencoderKL.from_pretrained(other_vae, **diffusers_dtype(frozen)) if other_vae else
           AutoencoderKL.from_pretrained(model, subfolder="vae", variant=config.variant, **diffusers_dtype(frozen),
                                         **common)).to(device)
    parts = Components(family=family, vae=vae, denoiser=None, noise_scheduler=noise_scheduler,
                       inference_scheduler=inference_scheduler, vae_source=other_vae, **text)
    for module in (vae, *parts.text_encoders):
        module.requires_grad_(False)
    if with_denoiser:
        load_denoiser(parts, config, device=device, precision=precision, method=method, base=base)
    return parts


def load_denoiser(parts: Components, config, *, device: torch.device, precision: str, method=None,
                  base: BaseModel | None = None) -> None:
    """Load the family's denoiser into `parts`, frozen, in the dtype `method` wants (see `load_components`)."""
    import diffusers

    base = base or BaseModel.of(config)
    method = method or method_for(config)
    family = parts.family
    dtype = method.load_dtype(family.denoiser, frozen=weight_dtype(precision, device))
    quantized = {}
    if config.load_in_4bit:
        check_4bit(config, device=device)
        # Quantized tensor by tensor as it is placed on the GPU: the 16-bit weights never sit in host memory
        # whole (FLUX.1-dev's transformer is 24 GB in bf16, a Colab VM has 12.7 GB).
        quantized = dict(quantization_config=diffusers.BitsAndBytesConfig(**NF4, bnb_4bit_compute_dtype=dtype),
                         device_map={"": device})
    denoiser = getattr(diffusers, family.denoiser_class).from_pretrained(
        base.path, subfolder=family.denoiser, variant=config.variant, **diffusers_dtype(dtype), **quantized,
        **base.load_kwargs())
    parts.denoiser = denoiser if quantized else denoiser.to(device)
    parts.denoiser.requires_grad_(False)


def check_4bit(config, *, device: torch.device) -> None:
    """Refuse `load_in_4bit` where it cannot load: diffusers quantizes with bitsandbytes on a CUDA GPU only."""
    if config.load_in_4bit and device.type != "cuda":
        raise ConfigError(f"load_in_4bit: diffusers loads a 4-bit (NF4) base only onto a CUDA GPU, and this run "
                          f"trains on {device.type}; set load_in_4bit=False (on a GPU runtime `fit` turns it on "
                          "where the 16-bit base does not fit).")


def parameter_counts(config, *, base: BaseModel | None = None) -> dict[str, int]:
    """Parameters of the base model's denoiser, text encoder(s) and VAE, and of what `config` trains on them (the
    LoRA adapters, or the parts themselves), from the configs alone (a few KB; the modules are built on the
    meta device, no weights; a single file is not converted): what the disk plan needs before any download."""
    base = base or BaseModel.of(config)
    modules = empty_modules(base.component_configs)
    counts = {name: count_parameters(module) for name, module in modules.items()}
    modules["denoiser"] = modules.pop(base.family.denoiser)
    parts = Components(family=base.family, tokenizer=None, noise_scheduler=None, inference_scheduler=None, **modules)
    with torch.device("meta"):  # (LoRA adapters too)
        trained = method_for(config).setup(parts)
    counts["trained"] = sum(count_parameters(module, trainable_only=True) for module in trained.values())
    return counts


def first_line(err: BaseException, *, limit: int = 160) -> str:
    """`Type: first line of the message` (an exception may have an empty message)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit]}" if lines else type(err).__name__


@functools.lru_cache(maxsize=None)
def bitsandbytes_works(device: torch.device) -> tuple[bool, str]:
    """Run one real 8-bit AdamW step: bitsandbytes can import and still fail at its first kernel call. Asked
    once per device and process (the setup report, the memory plan and the optimizer ask the same question)."""
    try:
        import bitsandbytes as bnb

        probe = torch.nn.Parameter(torch.zeros(4096, device=device))
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
        return True, "bitsandbytes works"
    except Exception as err:
        return False, first_line(err)


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
        return False, f"xformers is not usable ({first_line(err, limit=120)})"


def set_attention(denoiser, *, backend: str, device: torch.device) -> str:
    """Select the attention backend and return the one actually used. SDPA is diffusers' default."""
    if backend == "xformers":
        ok, why = xformers_works(device)
        if ok:
            denoiser.enable_xformers_memory_efficient_attention()
            return "xformers"
        print(f"Attention: {why}; using PyTorch SDPA instead (same speed within a few percent).")
    # SDPA is what diffusers gives every attention layer of a freshly loaded model (AttnProcessor2_0 in a
    # UNet, JointAttnProcessor2_0 in SD3's transformer, ...): nothing to change.
    return "sdpa"


def enable_tf32(device: torch.device) -> bool:
    """TF32 matmuls on Ampere and newer: free speed, no visible quality change for diffusion training."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return True
    return False


def enable_gradient_checkpointing(components: Components, *, train_text_encoder: bool) -> None:
    components.denoiser.enable_gradient_checkpointing()
    if not train_text_encoder:
        return
    # transformers recomputes only in train mode (it checks `self.training`): `train()` sets that mode.
    # Non-reentrant: gradients then reach LoRA adapters behind frozen embeddings too. transformers 5
    # renamed the method (the old name warns); Colab may ship a 4.x that has only the old one.
    kwargs = {"use_reentrant": False}
    for encoder in components.text_encoders:
        if hasattr(encoder, "activation_checkpointing_enable"):
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def count_parameters(module: torch.nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
