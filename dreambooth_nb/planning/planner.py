"""Will it fit? A pre-flight plan of GPU memory, host RAM and disk for a `TrainConfig`, before any download.

    from dreambooth_nb.planning.planner import plan
    plan(config)               # the GPU here (a T4 where there is none)
    plan(config, gpu="T4")     # or "P100", "L4", "A100-40GB", "A100-80GB", a number of GiB, "cpu"

The plan needs no weights and no GPU: it reads the model's configs (a few KB: `model_index.json` and each
component's `config.json`, shipped in `known_models/` for the usual bases) and combines two things:

- **A trace** of one training micro-step on fake tensors (`planning.trace`): the peak and what is alive at
  it (weights, gradients, autocast's fp16 weight copies, activations), exact for that code path.
- **Arithmetic** (here) for what the trace cannot see: optimizer state (bitsandbytes 8-bit or torch AdamW),
  the optimizer step's temporaries, EMA, the VAE when latents are not cached, DDP's buckets, the CUDA
  context, and the caching allocator's fragmentation; then host RAM and disk (`memory`).
- With `stop_when="suggested"`, **measuring a snapshot** beside training: the snapshot's pipeline loaded in
  16 bits next to what training keeps between steps, and a render's activations (`trace.trace_render`).

Traces are cached, so a settings panel re-plans instantly unless batch, resolution, checkpointing, precision
or what is trained changes (a new SD 1.5 trace takes about 4 s on one core; the first plan in a process
about 10 s, the imports included).
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dreambooth_nb.planning import memory
from dreambooth_nb import storage
from dreambooth_nb.config import Concept
from dreambooth_nb.errors import ConfigError
from dreambooth_nb.model.families import family_named
from dreambooth_nb.model.methods import METHODS, method_for
from dreambooth_nb.model.quantization import nf4_bytes, quantized_to_fit
from dreambooth_nb.planning.trace import (ALLOCATION_ROUNDING, ModelConfigs, StepTrace, TraceKey, component_facts,
                                         component_sizes, read_model_configs, render_passes, render_resolution,
                                         trace_render, trace_step, trace_vae_encode)
from dreambooth_nb.units import GIB, gib, memory_size


# --- GPUs -------------------------------------------------------------------------------------------------
# Total memory as `torch.cuda.get_device_properties(0).total_memory` reports it (what a run can use, before
# the CUDA context), and whether the chip has native bf16 (compute capability ≥ 8.0; a T4 is sm_75 and only
# emulates it, see the project notes).


@dataclass(frozen=True)
class Gpu:
    name: str
    total_bytes: int
    bf16: bool


GPUS = {
    "T4": Gpu("T4", int(14.75 * GIB), bf16=False),          # Colab / Kaggle T4, sm_75 (measured: 14.75 GiB)
    "P100": Gpu("P100", int(15.89 * GIB), bf16=False),      # Kaggle P100-16GB, sm_60
    "L4": Gpu("L4", int(22.0 * GIB), bf16=True),            # Colab L4 24 GB, sm_89 (≈22 GiB usable)
    "A100-40GB": Gpu("A100-40GB", int(39.39 * GIB), bf16=True),  # sm_80
    "A100-80GB": Gpu("A100-80GB", int(79.15 * GIB), bf16=True),  # sm_80
}

# The CUDA context, cuBLAS and cuDNN handles live outside PyTorch's allocator (≈0.3 GiB context with lazy
# module loading, CUDA ≥ 11.7, plus library handles); nvidia-smi counts them, max_memory_allocated does not.
CUDA_CONTEXT_BYTES = int(0.4 * GIB)
# What a run needs beyond its allocated peak even after PyTorch's caching allocator has given back the blocks
# it kept (it does so before failing): blocks only partly used, and cuDNN convolution workspaces. An
# assumption (10 %), to be checked against `torch.cuda.max_memory_reserved` on a GPU.
FRAGMENTATION = 0.10
# Host RAM that importing and running diffusers, transformers and accelerate adds to a Python process that
# already imported torch: measured 0.21–0.24 GiB (peak RSS of `train()` on the tiny pipeline on CPU, Linux,
# diffusers 0.42, transformers 5.24, accelerate 1.15), almost all of it the libraries themselves.
LIBRARIES_BYTES = int(0.22 * GIB)
# Host-side CUDA runtime (driver, cuBLAS/cuDNN kernels loaded lazily): an estimate, not measured here.
CUDA_HOST_BYTES = int(0.5 * GIB)

# bitsandbytes AdamW8bit (optim/optimizer.py, init_state): two uint8 moments and a float32 absmax per
# 256-element block for each; tensors under 4096 elements (`min_8bit_size`) keep two float32 moments.
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096

# Whether training's autocast keeps its cache of fp16 weight copies until the forward pass ends (torch's
# default, `cache_enabled=True`). With the cache, every trained fp32 weight has an fp16 twin for the whole
# forward (1.6 GiB for SD 1.5); `train` turns it off (`AutocastKwargs(cache_enabled=False)`): each weight is
# cast once per forward anyway, and gradient checkpointing recasts it in the backward.
AUTOCAST_WEIGHT_CACHE = False
# Several processes: DDP all-reduces gradients through buckets that hold every trained parameter's gradient
# for the whole run. With `gradient_as_bucket_view` (which `train` asks DDP for when this is True) the
# gradients are views into them: gradient memory is alive from the first forward on, as with accumulation.
# Without (DDP's default) the buckets are a second fp32 copy of every gradient (+3.2 GiB for SD 1.5's UNet).
DDP_BUCKET_VIEWS = True


def resolve_gpu(gpu) -> tuple[Gpu | None, list[str]]:
    """The GPU to plan for (None: a CPU run) and notes on how it was chosen."""
    if gpu is None:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return Gpu(props.name, props.total_memory, bf16=props.major >= 8), []
        return GPUS["T4"], ["No GPU here: planned for a T4 (Colab, Kaggle)."]
    if isinstance(gpu, (int, float)) and not isinstance(gpu, bool):
        if gpu <= 0:
            raise ConfigError(f"gpu: {gpu!r} GiB is not a memory size; give a positive number such as 16.")
        return Gpu(f"{gpu:g} GiB GPU", int(gpu * GIB), bf16=False), []
    if isinstance(gpu, str) and gpu.lower() == "cpu":
        return None, []
    if isinstance(gpu, str):
        for name, known in GPUS.items():
            if gpu.upper() == name.upper():
                return known, []
    raise ConfigError(f"gpu: {gpu!r} is unknown; choose one of {', '.join(GPUS)}, a number of GiB, 'cpu', "
                      "or None for the GPU present.")


# --- What a config asks for -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """The settings of a config that decide memory, resolved for one device (hashable: a cache key)."""

    device: str                 # "cuda" or "cpu"
    precision: str              # "no", "fp16" or "bf16"
    method: str                 # `TrainConfig.method` (`model.methods.METHODS`)
    method_options: tuple       # what shapes the method's trace adapters (`Method.trace_options`)
    train_text_encoder: bool
    batch: int                  # samples per micro-step: instance images, plus as many class images with prior
    accumulation: int
    resolution: int
    checkpointing: bool
    eight_bit_adam: bool
    cache_latents: bool
    ema: bool
    offload_ema: bool
    variant: str | None
    processes: int = 1          # data-parallel processes, one per GPU: the plan is per GPU
    load_in_4bit: bool = False  # the frozen denoiser in 4 bits (QLoRA)
    watched: bool = False       # each snapshot rendered and measured beside training (`stop_when="suggested"`)

    @property
    def half(self) -> bool:
        return self.precision != "no"

    @property
    def ddp_buckets(self) -> bool:
        """Whether DDP's gradient buckets exist (several processes)."""
        return self.processes > 1


def setup_for(config, gpu: Gpu | None) -> Setup:
    precision = config.mixed_precision
    if gpu is None:
        precision = "bf16" if precision == "bf16" else "no"  # CPU autocast is bf16 only; "auto" means fp32
    elif precision == "auto":
        precision = "bf16" if gpu.bf16 else "fp16"
    if config.method not in METHODS:
        raise ConfigError(f"method: {config.method!r} is unknown; choose one of {', '.join(METHODS)}.")
    prior = 2 if config.with_prior_preservation else 1
    return Setup(
        device="cpu" if gpu is None else "cuda", precision=precision, method=config.method,
        method_options=method_for(config).trace_options(), train_text_encoder=config.train_text_encoder,
        batch=config.train_batch_size * prior, accumulation=config.gradient_accumulation_steps,
        resolution=config.resolution, checkpointing=config.gradient_checkpointing,
        eight_bit_adam=config.use_8bit_adam, cache_latents=config.cache_latents, ema=config.use_ema,
        offload_ema=config.offload_ema, variant=config.variant, processes=config.num_processes,
        load_in_4bit=config.load_in_4bit, watched=config.stop_when == "suggested")


# --- The trace's key: what a config asks of it -----------------------------------------------------------
def trace_key(configs: ModelConfigs, setup: Setup) -> TraceKey:
    # From the second accumulated micro-batch on, the gradients of the earlier ones are alive throughout; so
    # are DDP's buckets when the gradients are views into them (DDP_BUCKET_VIEWS).
    grads_present = setup.accumulation > 1 or (setup.ddp_buckets and DDP_BUCKET_VIEWS)
    return TraceKey(configs=configs, device=setup.device, half=setup.half, method=setup.method,
                    method_options=setup.method_options, train_text_encoder=setup.train_text_encoder,
                    batch=setup.batch, resolution=setup.resolution,
                    checkpointing=setup.checkpointing, grads_present=grads_present,
                    autocast_cache=AUTOCAST_WEIGHT_CACHE, quantized=setup.load_in_4bit)


# --- Arithmetic -------------------------------------------------------------------------------------------
def _rounded(nbytes: float) -> int:
    return int(-(-nbytes // ALLOCATION_ROUNDING) * ALLOCATION_ROUNDING)


def optimizer_state_bytes(numels, *, eight_bit: bool) -> int:
    """AdamW state for tensors of these sizes: two fp32 moments, or bitsandbytes' 8-bit blockwise state."""
    total = 0
    for n in numels:
        if eight_bit and n >= BNB_MIN_8BIT_SIZE:
            blocks = math.ceil(n / BNB_BLOCK)
            total += 2 * _rounded(n) + 2 * _rounded(4 * blocks)
        else:
            total += 2 * _rounded(4 * n)
    return total


def optimizer_step_bytes(numels, *, eight_bit: bool, device: str) -> int:
    """Temporaries of one optimizer step.

    bitsandbytes updates in place, and so does torch's fused AdamW, which `train` uses on CUDA (its default,
    the foreach path, would build `torch._foreach_sqrt(...)`: one fp32 temporary per trained tensor at once,
    3.2 GiB for SD 1.5). On CPU it goes tensor by tensor: two temporaries the size of the largest tensor.
    """
    if eight_bit or not numels or device == "cuda":
        return 0
    return 2 * _rounded(4 * max(numels))


# --- The plan ---------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Peak GPU memory, host RAM and disk of a training run, each with where it goes; the verdict; advice.

    GPU, three numbers: `gpu_allocated_bytes`, the peak of live tensors (what `torch.cuda.max_memory_allocated`
    reports); `gpu_peak_bytes`, what the card shows at the peak (nvidia-smi: allocated, the caching
    allocator's kept blocks and the CUDA context; the breakdown adds up to it); `gpu_required_bytes`, the
    least the card must have (allocated + a margin for fragmentation and workspaces + the context: before
    failing, the allocator gives its cache back). `fits` compares the last with `gpu_total_bytes`.
    `host_peak_bytes` is what the run adds to a Python process that has imported torch; `disk_bytes` the most
    the run's new files (class images, snapshots, states) occupy at once.
    """

    gpu: str
    gpu_total_bytes: int
    gpu_peak_bytes: int
    gpu_allocated_bytes: int
    gpu_required_bytes: int
    gpu_phase: str
    gpu_breakdown: dict[str, int]
    host_peak_bytes: int
    host_phase: str
    host_breakdown: dict[str, int]
    disk_bytes: int
    disk_breakdown: dict[str, int]
    fits: bool
    trained_params: int
    total_params: int
    summary: str
    advice: list[str] = field(default_factory=list)
    advised_changes: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def headroom_bytes(self) -> int:
        """Memory the card has beyond what the run requires (negative: short by that much)."""
        return self.gpu_total_bytes - self.gpu_required_bytes

    def _rows(self) -> list[tuple[str, str]]:
        rows = []
        if self.gpu_total_bytes:
            verdict = "fits" if self.fits else "does NOT fit"
            rows.append((f"GPU peak ({self.gpu_phase})", f"{memory_size(self.gpu_peak_bytes)}; needs "
                         f"{gib(self.gpu_required_bytes)} of {gib(self.gpu_total_bytes)} GiB: {verdict}"))
            rows += [(f"  {name}", memory_size(size)) for name, size in self.gpu_breakdown.items() if size]
        rows.append((f"Host RAM peak ({self.host_phase})", memory_size(self.host_peak_bytes)))
        rows += [(f"  {name}", memory_size(size)) for name, size in self.host_breakdown.items() if size]
        rows.append(("Disk peak", memory_size(self.disk_bytes)))
        rows += [(f"  {name}", memory_size(size)) for name, size in self.disk_breakdown.items() if size]
        return rows

    def __repr__(self) -> str:
        rows = self._rows()
        width = max(len(name) for name, _ in rows)
        lines = [f"Memory plan: {self.summary}"] + [f"{name:<{width}}  {value}" for name, value in rows]
        lines += [f"To fit: {a}" for a in self.advice] + self.notes
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><td style='text-align:left;padding-left:{'1.5em' if name.startswith('  ') else '0'}'>"
            f"{html.escape(name.strip())}</td><td style='text-align:right'>{html.escape(value)}</td></tr>"
            for name, value in self._rows())
        extra = "".join(f"<li>To fit: {html.escape(a)}</li>" for a in self.advice) + \
            "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        colour = "#2e7d32" if self.fits else "#c62828"
        return (f"<div><b style='color:{colour}'>Memory plan</b>: {html.escape(self.summary)}"
                f"<table>{body}</table>{f'<ul>{extra}</ul>' if extra else ''}</div>")


def plan(config, gpu=None, *, advise: bool = True) -> MemoryPlan:
    """Plan the memory of training `config` on `gpu` (see `resolve_gpu`); no weights, no GPU needed.

    When it does not fit, `advice` names the fewest memory savers, tried in the order of
    `memory.next_memory_saver`, that make it fit, and `advised_changes` holds them as settings.
    """
    card, notes = resolve_gpu(gpu)
    result = _plan(config, card)
    result.notes = notes + result.notes
    if advise and not result.fits:
        result.advice, result.advised_changes = _advice(config, card)
    return result


def _plan(config, card: Gpu | None) -> MemoryPlan:
    setup = setup_for(config, card)
    configs = read_model_configs(config.pretrained_model_name_or_path, revision=config.revision)
    sizes = component_sizes(configs)
    step = trace_step(trace_key(configs, setup))
    trained_params = sum(step.trained_numels)
    measuring = measuring_for(configs, sizes, card=card) if setup.watched and card is not None else None
    device = device_peak(setup, configs=configs, sizes=sizes, step=step, measuring=measuring)
    host = _host_parts(config, setup, sizes=sizes, trained_params=trained_params, configs=configs)
    notes = []
    if card is None:  # a CPU run: the device's memory is host RAM
        host_phase, host_parts = _host_peak(host, device=device)
        gpu_name, total, allocated, required, peak, gpu_parts, gpu_phase = "cpu", 0, 0, 0, 0, {}, "none"
        ram = _host_ram_bytes()
        fits = ram is None or sum(host_parts.values()) <= ram
        if ram is not None and not fits:
            notes.append(f"This machine has {gib(ram)} GiB of RAM.")
    else:
        gpu_name, total, gpu_phase = card.name, card.total_bytes, device.phase
        allocated = sum(device.allocated.values())
        reserved = max(device.reserved, int(allocated * (1 + FRAGMENTATION)))
        required = int(allocated * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES
        fits = required <= total
        # Where the run fits, the allocator trims its cache rather than fail: the card shows at most its total.
        peak = min(reserved + CUDA_CONTEXT_BYTES, total) if fits else reserved + CUDA_CONTEXT_BYTES
        gpu_parts = {**device.allocated, "allocator cache": peak - CUDA_CONTEXT_BYTES - allocated,
                     "CUDA context": CUDA_CONTEXT_BYTES}
        host_phase, host_parts = _host_peak(host, device=None, measuring=measuring)
    disk_bytes, disk = _disk_parts(config, sizes=sizes, trained_params=trained_params)
    what = METHODS[setup.method].trains.format(denoiser=family_named(configs.family).denoiser_label)
    if setup.train_text_encoder:
        what += " + text encoder" + ("s" if configs.text_encoders > 1 else "")
    summary = (f"{configs.source}, {what}, {setup.resolution} px, {setup.batch} image"
               f"{'s' if setup.batch > 1 else ''} per micro-step × {setup.accumulation}, "
               f"{setup.precision if setup.half else 'fp32'}, on {gpu_name}")
    return MemoryPlan(gpu=gpu_name, gpu_total_bytes=total, gpu_peak_bytes=peak, gpu_allocated_bytes=allocated,
                      gpu_required_bytes=required, gpu_phase=gpu_phase, gpu_breakdown=gpu_parts,
                      host_peak_bytes=sum(host_parts.values()), host_phase=host_phase, host_breakdown=host_parts,
                      disk_bytes=disk_bytes, disk_breakdown=disk, fits=fits, trained_params=trained_params,
                      total_params=sum(sizes.values()), summary=summary, notes=notes)


MEASURING = "measuring a snapshot"
"""The GPU phase of early stop's render beside training (`Measuring`)."""


@dataclass(frozen=True)
class Measuring:
    """What rendering a snapshot beside training adds (`stop_when="suggested"`): the snapshot's pipeline on the
    GPU, in 16 bits or in 4 where `quantized_to_fit` loads a component so on this card; the larger of a
    sampling step's and a VAE decode's activations; and the pipeline in host RAM while it loads (its 16-bit
    parts: `from_pretrained` reads them into RAM and moves the whole pipeline to the GPU after)."""

    weights: int
    activations: int
    host: int


def measuring_for(configs: ModelConfigs, sizes: dict, *, card: Gpu) -> Measuring:
    family = family_named(configs.family)
    quantized = set(quantized_to_fit(sizes, gpu_bytes=card.total_bytes))
    render = trace_render(configs, resolution=render_resolution(configs),
                          passes=render_passes(configs, family.guidance_scale))
    half = sum(2 * n for name, n in sizes.items() if name not in quantized)
    return Measuring(weights=half + sum(nf4_bytes(sizes[name]) for name in quantized),
                     activations=max(render.step_bytes, render.decode_bytes), host=half)


@dataclass(frozen=True)
class DevicePeak:
    """The training device's peak: the phase, what is allocated then by kind, and what the allocator reserves."""

    phase: str
    allocated: dict
    reserved: int


def device_peak(setup: Setup, *, configs: ModelConfigs, sizes: dict, step: StepTrace,
                measuring: Measuring | None = None) -> DevicePeak:
    """The largest of the micro-step, the optimizer step, the VAE encode (uncached), the offloaded EMA update and,
    with `measuring` (early stop on a GPU), the render of a snapshot beside training.

    Allocated: what is alive in each phase, the trace's peak plus what stays resident outside it (optimizer
    state, EMA, the VAE when latents are not cached). Reserved: PyTorch's caching allocator keeps every block a
    step frees, and the gradients (and the foreach optimizer's temporaries), each the fp32 size of a weight,
    seldom fit in the blocks the forward's activations and fp16 weight copies leave: so the allocator holds
    both, as if the forward's peak and all gradients were alive at once. This reproduces the published T4
    table (README) where the allocated peak alone falls up to 30 % short.

    On a CPU run every part stays in RAM: the VAE and a frozen text encoder too, all fp32 (`models.weight_dtype`).
    """
    cuda = setup.device == "cuda"
    numels = step.trained_numels
    opt = optimizer_state_bytes(numels, eight_bit=setup.eight_bit_adam)
    ema = 4 * sum(numels) if setup.ema else 0
    resident_ema = 0 if setup.offload_ema and cuda else ema
    grads = sum(_rounded(4 * n) for n in numels)
    buckets = grads if setup.ddp_buckets and not DDP_BUCKET_VIEWS else 0  # a second copy, alive throughout
    # Gradients alive between optimizer steps too: DDP's buckets when the gradients are views into them.
    kept_grads = grads if setup.ddp_buckets and DDP_BUCKET_VIEWS else 0
    step_temp = optimizer_step_bytes(numels, eight_bit=setup.eight_bit_adam, device=setup.device)
    # SDXL's VAE overflows in fp16 (its config says force_upcast): training keeps it in fp32.
    vae_bytes = 4 if configs.components["vae"].get("force_upcast") or not (setup.half and cuda) else 2
    frozen = sizes["vae"] * vae_bytes if not (setup.cache_latents and cuda) else 0
    encoders = [name for name in sizes if name.startswith("text_encoder")]
    if not cuda:  # text encoders that are not trained stay in RAM beside the rest
        frozen += sum(sizes[n] * 4 for n in encoders if not setup.train_text_encoder)
    peak, forward = step.peak, step.forward

    def phase(at: dict, *, grads: int, copies: int = 0, activations: int = 0, ema_bytes: int = resident_ema):
        return {"trained weights": at["trained"], "gradients": grads, "DDP gradient buckets": buckets,
                "optimizer state": opt, "frozen weights": at["frozen"] + frozen, "EMA": ema_bytes,
                "autocast weight copies": copies, "activations and temporaries": activations}

    phases = {
        "forward/backward": phase(peak, grads=peak["grads"], copies=peak["autocast copies"],
                                  activations=peak["activations"] + step.dequantized),
        "optimizer step": phase(peak, grads=grads, activations=step_temp),
    }
    if not setup.cache_latents:
        encode = trace_vae_encode(configs, resolution=setup.resolution, dtype_bytes=vae_bytes)
        phases["VAE encode"] = phase(peak, grads=grads if setup.accumulation > 1 else kept_grads, activations=encode)
    if ema and not resident_ema:
        phases["EMA update"] = phase(peak, grads=kept_grads, ema_bytes=ema)  # brought to the GPU for its update
    if measuring is not None:
        # Between two optimizer steps (the gradients set to None): training keeps its weights, optimizer state and
        # EMA on the GPU while the snapshot's pipeline renders beside them (`results.early_stop`).
        phases[MEASURING] = {**phase(peak, grads=kept_grads, activations=measuring.activations),
                             "snapshot's pipeline (measuring)": measuring.weights}
    if cuda and not setup.train_text_encoder:
        # Frozen text encoders encode every prompt once, before the denoiser loads, then leave the GPU: small
        # for SD's CLIP (0.25 GB), not for SD3's T5-XXL (9.5 GB in fp16). Beside them only the VAE, when the
        # latents are not cached (cached, it has left already).
        facts = component_facts(configs)
        on_gpu = sum(sizes[n] * (2 if setup.half else 4) for n in encoders)
        if setup.precision == "fp16":  # (what transformers keeps in fp32 at fp16: T5's `wo`, +2 GB for T5-XXL)
            on_gpu += sum(facts[n].fp32_in_fp16 * 2 for n in encoders)
        phases["encoding the prompts"] = {"frozen weights": frozen + on_gpu}
    name = max(phases, key=lambda n: sum(phases[n].values()))
    unreused = sum(phase(forward, grads=grads, copies=forward["autocast copies"],
                         activations=forward["activations"]).values())
    reserved = max(sum(phases[name].values()), unreused + step_temp)
    return DevicePeak(phase=name, allocated=phases[name], reserved=reserved)


@dataclass(frozen=True)
class _HostParts:
    libraries: int
    cuda_runtime: int
    loading: int
    kept: dict
    data: int
    saving: int


def _host_parts(config, setup: Setup, *, sizes: dict, trained_params: int, configs: ModelConfigs) -> _HostParts:
    """Host RAM of a GPU run by phase: libraries, loading, parts kept in RAM, photos and latents, saving."""
    cuda = setup.device == "cuda"

    components = configs.components

    def stored(name: str) -> int:  # bytes per weight in its files: the fp16 variant, or what its config says
        half_files = setup.variant == "fp16" or components[name].get("torch_dtype") in ("float16", "bfloat16")
        return 2 if half_files else 4

    # from_pretrained reads one component at a time into RAM before moving it to the GPU; the text encoders
    # and a 4-bit denoiser stream onto it tensor by tensor instead (`loading.load_components`).
    streamed = {n for n in sizes if n.startswith("text_encoder")}
    if setup.load_in_4bit:
        streamed.add(family_named(configs.family).denoiser)
    facts = component_facts(configs)
    loading = max((facts[n].largest if n in streamed else size) * stored(n) for n, size in sizes.items()) \
        if cuda else 0
    half = 2 if setup.half else 4
    kept = {}
    if cuda and setup.cache_latents:
        kept["VAE (latents cached)"] = sizes["vae"] * half
    if cuda and not setup.train_text_encoder and method_for(config).final_snapshot_complete:
        # (kept for the final, complete snapshot; a LoRA's encoders are let go once the prompts are encoded)
        kept["text encoder (embeddings precomputed)"] = sum(sizes[n] for n in sizes
                                                            if n.startswith("text_encoder")) * half
    if cuda and setup.ema and setup.offload_ema:
        kept["EMA (offloaded)"] = 4 * trained_params  # one buffer, pinned once (`ema.HostBuffer`)
    # Weights are saved a shard at a time (`storage.save_weights`), each copied to the host first; on a CPU
    # run `.to("cpu")` copies nothing.
    saving = min(4 * trained_params, storage.MAX_SHARD_BYTES) if cuda else 0
    return _HostParts(libraries=LIBRARIES_BYTES, cuda_runtime=CUDA_HOST_BYTES if cuda else 0, loading=loading,
                      kept=kept, data=_data_bytes(config, setup), saving=saving)


def _data_bytes(config, setup: Setup) -> int:
    """Photos and class images held as 8-bit RGB (shorter side = resolution), plus cached latents in RAM."""
    photos, classes = _image_counts(config)
    pixels = setup.resolution**2 * 3
    images = int(photos * pixels * 4 / 3) + classes * pixels  # photos are often 4:3, class images square
    latents = 0
    if setup.cache_latents:
        flips = 2 if config.random_flip else 1
        side = setup.resolution // 8
        latents = (photos + classes) * flips * 2 * 4 * side * side * 4  # mean and std, fp32, 4 channels
    return images + latents


def _image_counts(config) -> tuple[int, int]:
    """(photos, class images) of all the run's subjects: what training holds in memory. A config with no subject
    yet (a plan before the photos) is planned as one subject of 10 photos."""
    subjects = config.concepts or [Concept(instance_data_dir="", instance_prompt="")]
    photos = sum(_count_files(s.instance_data_dir, default=10) for s in subjects)
    classes = sum(s.num_class_images for s in subjects) if config.with_prior_preservation else 0
    return photos, classes


def _count_files(folder, *, default: int) -> int:
    if not folder or not Path(folder).is_dir():
        return default
    return sum(1 for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))


def _host_peak(host: _HostParts, *, device: DevicePeak | None, measuring: Measuring | None = None) -> tuple[str, dict]:
    """The largest of loading, training (on a GPU while a state is saved; on CPU the step itself) and, with
    `measuring`, loading a snapshot's pipeline beside training, by kind."""
    base = {"Python libraries": host.libraries, "CUDA runtime (host side)": host.cuda_runtime}
    kept = {**base, **host.kept, "photos, class images, latents": host.data}
    if device is not None:  # a CPU run: the training step itself is in RAM
        phases = {f"training, {device.phase}": {**kept, **device.allocated}}
    else:
        phases = {"training, saving a state": {**kept, "saving a state": host.saving}}
    if measuring is not None:
        phases["training, loading a snapshot's pipeline to measure it"] = {**kept, "snapshot's pipeline": measuring.host}
    phases["loading"] = {**base, "loading (largest part)": host.loading}
    name = max(phases, key=lambda n: sum(phases[n].values()))  # (a tie goes to training: the first)
    return name, phases[name]


def _host_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _disk_parts(config, *, sizes: dict, trained_params: int) -> tuple[int, dict[str, int]]:
    """The disk's peak as `memory.disk_plan` simulates it (class images, snapshots, rotated states), by kind."""
    run = memory.RunSizes(total=sum(sizes.values()), trained=trained_params)
    disk = memory.disk_plan(config, sizes=run)
    classes = sum(size for what, size in disk.items if "class images" in what)
    parts = {"class images": classes, "states and snapshots": disk.peak_bytes - classes}
    if config.cache_latents and config.latent_cache_dir:
        n = sum(_image_counts(config))
        side = config.resolution // 8
        parts["latent cache"] = n * 2 * 4 * side * side * 4  # mean and std, fp32, 4 channels
    return disk.peak_bytes, parts


# --- Advice -----------------------------------------------------------------------------------------------
def _advice(config, card: Gpu | None) -> tuple[list[str], dict]:
    """The fewest savers, in `next_memory_saver`'s order, whose plan fits: their text, and their settings.

    Climbs the ladder until the plan fits, then drops each saver whose removal still fits (a cheaper rung
    may be needless once a later one is on: 8-bit Adam alone can do what checkpointing could not).
    """
    ladder, current = [], config
    while not _plan(current, card).fits:
        saver = memory.next_memory_saver(current)
        if saver is None:  # the ladder's end
            final = _plan(current, card)
            need = final.gpu_required_bytes if card else final.host_peak_bytes
            return [*map(str, ladder), f"even with every saver on it needs {gib(need)} GiB: lower the resolution "
                    "or use a GPU with more memory."], {}
        ladder.append(saver)
        current = dataclasses.replace(current, **saver.changes)
    kept = list(ladder)
    for saver in ladder[:-1]:
        trial = [s for s in kept if s is not saver]
        if _plan(dataclasses.replace(config, **{k: v for s in trial for k, v in s.changes.items()}), card).fits:
            kept = trial
    return [str(s) for s in kept], {k: v for s in kept for k, v in s.changes.items()}
