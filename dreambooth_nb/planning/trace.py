"""The trace: what one training micro-step holds in memory and computes, measured on fake tensors, from configs alone.

One micro-step (text encoder and denoiser forward, loss, backward) runs under
`torch._subclasses.fake_tensor.FakeTensorMode`: the real diffusers / transformers modules, the real autocast
and gradient checkpointing, but no memory behind any tensor. A dispatch mode counts every tensor's storage as
it is created and freed, so the peak and what is alive at that moment (weights, gradients, autocast's fp16
weight copies, activations) come out exact for that code path. The CPU build of torch cannot run CUDA
autocast, so the trace runs CPU autocast in bf16 (the same bytes as fp16) with CUDA's fp32 list (group_norm,
layer_norm, softmax) patched in for the length of the trace. `planner` adds what a trace cannot see.

`step_flops` runs the same micro-step again to count its floating-point operations (`torch.utils.flop_counter`:
matrix products, convolutions and attention; forward, backward and checkpointing's recompute), and
`trace_render` measures and counts one sampling step of a render and one VAE decode: what `planning.compute`
weighs against each other. Counting runs apart from the memory trace: the FLOP counter decomposes some ops to
count them, which would change what the trace sees alive.

Traces are cached by `TraceKey` (the model's configs and the settings that shape the step).
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import weakref
from dataclasses import dataclass

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dreambooth_nb.model.base import BaseModel, ComponentFacts, facts_from_configs, module_from_config
from dreambooth_nb.model.families import family_named
from dreambooth_nb.model.quantization import nf4_bytes
from dreambooth_nb.model.methods import METHODS, freeze_as

# The CUDA caching allocator hands out multiples of 512 bytes (c10/cuda/CUDACachingAllocator.cpp).
ALLOCATION_ROUNDING = 512


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# On CPU tensors (fake ones too) SDPA runs its CPU flash kernel, which torch's FLOP table does not list: counted as
# the CUDA flash kernel is (the same products), so attention weighs what it weighs on the GPU.
_CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def counting_flops() -> flop_counter.FlopCounterMode:
    """A FLOP counter (`get_total_flops()`) that also counts attention on CPU tensors."""
    return flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)



# --- Model configs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfigs:
    """The configs of a pipeline's model components (`BaseModel.component_configs`), as JSON text: hashable, the
    cache key of every trace."""

    source: str
    text: str
    family: str
    """`Family.name` of the model (its text encoders, how it encodes a prompt and conditions the UNet)."""

    @property
    def components(self) -> dict[str, dict]:
        return json.loads(self.text)

    @property
    def text_encoders(self) -> int:
        return sum(1 for name in self.components if name.startswith("text_encoder"))


def read_model_configs(model: str, *, revision: str | None = None) -> ModelConfigs:
    """The component configs of base model `model` (no weights; see `BaseModel.component_configs`)."""
    base = BaseModel(model, revision=revision)
    return ModelConfigs(source=model, text=json.dumps(base.component_configs, sort_keys=True),
                        family=base.family.name)



# --- The trace --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepTrace:
    """What one traced micro-step holds, by kind, in bytes (rounded as the CUDA allocator does): at the end
    of the forward pass and at the step's peak.

    The kinds: `trained` and `frozen` weights inside the trace (trained masters; frozen parts that take part
    in the step, such as a LoRA's base UNet), `grads`, `autocast copies` (fp16 casts of fp32 weights, which
    autocast caches until it exits) and `activations` (everything else). `trained_numels` are the sizes of
    the trained tensors, for the optimizer state.
    """

    forward: dict
    peak: dict
    trained_numels: tuple[int, ...]
    dequantized: int = 0
    """With a 4-bit base: bytes of its largest weight dequantized to 16 bits, which each matmul makes and frees
    (the trace runs the 16-bit weights themselves, so it does not see that temporary)."""


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage alive, by kind, and remembers the kinds at the highest total.

    Every op's outputs pass through `__torch_dispatch__`; a weakref finalizer on each new storage takes its
    bytes off again when the storage dies, which in eager PyTorch is exactly when the memory is freed.
    """

    def __init__(self, *, trained, frozen, quantized=()):
        super().__init__()
        self.live = dict.fromkeys(("trained", "frozen", "grads", "autocast copies", "activations"), 0)
        self.peak = 0
        self.at_peak = dict(self.live)
        self._kinds: dict[int, list] = {}
        self._weights = set()
        quantized = {id(t) for t in quantized}  # (frozen weights counted at their 4-bit size)
        for kind, tensors in (("trained", trained), ("frozen", frozen)):
            for tensor in tensors:
                self._add(tensor, kind, nbytes=nf4_bytes(tensor.numel()) if id(tensor) in quantized else None)
                self._weights.add(tensor.untyped_storage()._cdata)

    def _add(self, tensor: torch.Tensor, kind: str, *, nbytes: int | None = None) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._kinds:
            return
        size = -(-(nbytes or storage.nbytes()) // ALLOCATION_ROUNDING) * ALLOCATION_ROUNDING
        self._kinds[key] = [kind, size]
        self.live[kind] += size
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        kind, size = self._kinds.pop(key)
        self.live[kind] -= size

    def mark_grad(self, tensor: torch.Tensor) -> None:
        """A parameter's `.grad` was set: its storage (created by the backward) now counts as a gradient."""
        entry = self._kinds.get(tensor.untyped_storage()._cdata)
        if entry is None:
            self._add(tensor, "grads")
        elif entry[0] != "grads":
            self.live[entry[0]] -= entry[1]
            self.live["grads"] += entry[1]
            entry[0] = "grads"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = "activations"
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor) \
                and args[0].untyped_storage()._cdata in self._weights:
            kind = "autocast copies"  # autocast casting a weight to fp16 (cached until autocast exits)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor, kind)
        total = sum(self.live.values())
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.live)
        return out


_PATCH_LOCK = threading.Lock()
# CUDA autocast runs these in fp32 (ATen/autocast_mode.h, AT_FORALL_FP32 and ..._SET_OPT_DTYPE); CPU autocast
# leaves them in bf16. For the stand-in trace, CPU autocast borrows CUDA's rule for them.
_CUDA_FP32_OPS = ("group_norm", "layer_norm", "softmax.int", "log_softmax.int")


class _CudaAutocastPolicy:
    """For the length of a trace, CPU autocast runs CUDA's fp32 ops in fp32 (process-wide, hence the lock)."""

    def __enter__(self):
        _PATCH_LOCK.acquire()
        key = torch._C.DispatchKey.AutocastCPU
        self.lib = torch.library.Library("aten", "IMPL")
        for name in _CUDA_FP32_OPS:
            op = getattr(torch.ops.aten, name.split(".")[0])
            overload = getattr(op, name.split(".")[1]) if "." in name else op.default
            self.lib.impl(name, _in_fp32(overload, key), "AutocastCPU")
        return self

    def __exit__(self, *exc):
        self.lib._destroy()
        _PATCH_LOCK.release()


def _in_fp32(op, key):
    def kernel(*args, **kwargs):
        def cast(value):
            return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

    return kernel


@dataclass(frozen=True)
class TraceKey:
    configs: ModelConfigs
    device: str
    half: bool
    method: str
    method_options: tuple
    train_text_encoder: bool
    batch: int
    resolution: int
    checkpointing: bool
    grads_present: bool
    autocast_cache: bool
    quantized: bool = False
    """The frozen denoiser's linear layers in 4 bits (`load_in_4bit`)."""


@functools.lru_cache(maxsize=64)
def trace_step(key: TraceKey) -> StepTrace:
    """Trace one micro-step on fake tensors: text encoder(s) if trained, the denoiser, loss, backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    family = family_named(key.configs.family)
    with FakeTensorMode(), _policy(key):
        modules, inputs = _step_parts(key)
        trained = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        frozen = [p for m in modules.values() for p in m.parameters() if not p.requires_grad]
        # bitsandbytes quantizes every linear layer's weight of the base (biases and norms stay 16-bit).
        quantized = [m.weight for m in modules[family.denoiser].modules()
                     if type(m) is torch.nn.Linear and not m.weight.requires_grad] if key.quantized else []
        if key.grads_present:
            for p in trained:
                p.grad = torch.zeros_like(p)
        tracker = _LiveBytes(trained=trained, frozen=frozen, quantized=quantized)
        for p in trained:
            p.register_post_accumulate_grad_hook(lambda p: tracker.mark_grad(p.grad))
            if p.grad is not None:
                tracker.mark_grad(p.grad)
        with tracker:
            loss = _micro_step(modules, inputs, key=key)
            forward = dict(tracker.at_peak)
            loss.backward()
        return StepTrace(forward=forward, peak=tracker.at_peak, trained_numels=tuple(p.numel() for p in trained),
                         dequantized=max((2 * w.numel() for w in quantized), default=0))


@functools.lru_cache(maxsize=64)
def step_flops(key: TraceKey) -> int:
    """Floating-point operations of the micro-step `trace_step` traces: forward, backward, and the forward again
    that gradient checkpointing recomputes (frozen weights get no weight gradient: a LoRA's backward is lighter)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), _policy(key):
        modules, inputs = _step_parts(key)
        with counting_flops() as flops:
            _micro_step(modules, inputs, key=key).backward()
    return flops.get_total_flops()


def _step_parts(key: TraceKey) -> tuple[dict, dict]:
    """The modules a micro-step trains (see `_build_trained_modules`) and its inputs, on fake tensors."""
    components = key.configs.components
    family = family_named(key.configs.family)
    frozen_dtype = torch.bfloat16 if key.half and key.device == "cuda" else torch.float32  # see models.weight_dtype
    return (_build_trained_modules(components, family=family, key=key, frozen_dtype=frozen_dtype),
            _step_inputs(components, family=family, key=key))


def _policy(key: TraceKey):
    return _CudaAutocastPolicy() if key.half and key.device == "cuda" else contextlib.nullcontext()


def _build_trained_modules(components: dict, *, family, key: TraceKey, frozen_dtype) -> dict[str, torch.nn.Module]:
    """The denoiser, and the text encoder(s) when trained, with the dtypes and flags training gives them."""
    denoiser = module_from_config(components[family.denoiser])
    encoders = {name: module_from_config(components[name]) for name in family.text_encoders} \
        if key.train_text_encoder else {}
    # What the method adds (LoRA: the base frozen in 16-bit on a GPU, fp32 adapters on it).
    METHODS[key.method].trace_adapters({family.denoiser: denoiser, **encoders}, options=key.method_options,
                                       frozen_dtype=frozen_dtype)
    if key.checkpointing:
        denoiser.enable_gradient_checkpointing()
        for encoder in encoders.values():
            getattr(encoder, "activation_checkpointing_enable", encoder.gradient_checkpointing_enable)()
    modules = {family.denoiser: denoiser, **encoders}
    for module in modules.values():
        module.train()  # (transformers checkpoints only in training mode)
    return modules


def _step_inputs(components: dict, *, family, key: TraceKey) -> dict:
    """Latents, timesteps and token ids for a batch; with the text encoders frozen, also the prompts' encoding,
    made here outside the count (training encodes every prompt once, before the first step)."""
    vae = components["vae"]
    side = key.resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    b = key.batch
    token_ids = [torch.zeros(b, length, dtype=torch.long) for length in family.token_lengths(components)]
    inputs = {"latents": torch.randn(b, vae.get("latent_channels", 4), side, side),
              "timesteps": torch.randint(0, 1000, (b,)), "token_ids": token_ids}
    if not key.train_text_encoder:
        with torch.no_grad():
            encoders = [module_from_config(components[name]) for name in family.text_encoders]
            inputs["encoded"] = family.encode(encoders, token_ids)
    return inputs


def _micro_step(modules: dict, inputs: dict, *, key: TraceKey):
    """The forward and loss of `train.compute_loss`, under the autocast accelerate applies: the family encodes
    the prompts (when its encoders are traced) and conditions the denoiser, as in training; CPU autocast in bf16
    stands in for CUDA's in fp16 (the same bytes)."""
    family, resolution = family_named(key.configs.family), key.resolution
    context = torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=key.autocast_cache) if key.half \
        else contextlib.nullcontext()
    with context:
        if "encoded" in inputs:
            hidden, pooled = inputs["encoded"]
        else:
            hidden, pooled = family.encode([modules[name] for name in family.text_encoders], inputs["token_ids"])
        size = len(inputs["latents"])
        added = family.added_conditioning(pooled, original_sizes=[(resolution, resolution)] * size,
                                          crops=[(0, 0)] * size, resolution=resolution, device="cpu")
        prediction = family.predict(modules[family.denoiser], inputs["latents"], inputs["timesteps"], hidden, added)
    return torch.nn.functional.mse_loss(prediction.float(), inputs["latents"].float())


@functools.lru_cache(maxsize=16)
def trace_vae_encode(configs: ModelConfigs, *, resolution: int, dtype_bytes: int) -> int:
    """Bytes the VAE encoder needs beyond its weights to encode one image (`LatentSource` encodes one by one)."""
    from diffusers import AutoencoderKL
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype = torch.float32 if dtype_bytes == 4 else torch.bfloat16
    with FakeTensorMode(), torch.no_grad():
        vae = AutoencoderKL.from_config(configs.components["vae"])
        freeze_as(vae, dtype)
        tracker = _LiveBytes(trained=[], frozen=list(vae.parameters()))
        pixels = torch.randn(1, 3, resolution, resolution, dtype=dtype)
        with tracker:
            vae.encode(pixels).latent_dist.mean.float()
        return tracker.peak - tracker.live["frozen"]


@dataclass(frozen=True)
class RenderTrace:
    """One sampling step of a render and one image's VAE decode, as a 16-bit pipeline runs them on a GPU:
    their FLOPs, and the bytes each needs beyond the weights (activations and temporaries)."""

    step_flops: int
    """The denoiser on the step's samples: the prompt and, with classifier-free guidance, the empty prompt."""
    step_bytes: int
    decode_flops: int
    decode_bytes: int


def render_resolution(configs, resolution: int | None = None) -> int:
    """The size renders are made at: `resolution`, else the model's native size (`EvalSpec`'s None)."""
    return resolution or family_named(configs.family).native_size_of(configs.components)


def render_passes(configs, guidance_scale: float) -> int:
    """Denoiser samples per sampling step: the family's guided passes where the pipeline guides (scale > 1)."""
    return family_named(configs.family).guided_passes if guidance_scale > 1 else 1


@functools.lru_cache(maxsize=16)
def trace_render(configs: ModelConfigs, *, resolution: int, passes: int) -> RenderTrace:
    """Trace a render of one image at `resolution` on fake tensors: one sampling step of the denoiser on `passes`
    samples (2 with classifier-free guidance), then the VAE decode; 16-bit weights, no gradients."""
    from diffusers import AutoencoderKL
    from torch._subclasses.fake_tensor import FakeTensorMode

    components = configs.components
    family = family_named(configs.family)
    dtype = torch.bfloat16  # stands in for fp16: the same bytes and products
    key = TraceKey(configs=configs, device="cuda", half=True, method="full", method_options=(),
                   train_text_encoder=False, batch=passes, resolution=resolution, checkpointing=False,
                   grads_present=False, autocast_cache=False)
    with FakeTensorMode(), torch.no_grad():
        denoiser = module_from_config(components[family.denoiser]).eval()
        freeze_as(denoiser, dtype)
        inputs = _step_inputs(components, family=family, key=key)
        hidden, pooled = (t.to(dtype) if t is not None else None for t in inputs["encoded"])
        added = family.added_conditioning(pooled, original_sizes=[(resolution, resolution)] * passes,
                                          crops=[(0, 0)] * passes, resolution=resolution, device="cpu")
        if added:
            added = {name: value.to(dtype) for name, value in added.items()}
        latents = inputs["latents"].to(dtype)
        vae = AutoencoderKL.from_config(components["vae"]).eval()
        freeze_as(vae, dtype)
        # Each twice: its bytes, then its FLOPs (see the module's docstring).
        tracker = _LiveBytes(trained=[], frozen=list(denoiser.parameters()))
        with tracker:
            family.predict(denoiser, latents, inputs["timesteps"], hidden, added)
        with counting_flops() as step:
            family.predict(denoiser, latents, inputs["timesteps"], hidden, added)
        decoder = _LiveBytes(trained=[], frozen=list(vae.parameters()))
        with decoder:
            vae.decode(latents[:1]).sample.float()
        with counting_flops() as decode:
            vae.decode(latents[:1]).sample.float()
    return RenderTrace(step_flops=step.get_total_flops(), step_bytes=tracker.peak - tracker.live["frozen"],
                       decode_flops=decode.get_total_flops(), decode_bytes=decoder.peak - decoder.live["frozen"])


@functools.lru_cache(maxsize=16)
def component_facts(configs: ModelConfigs) -> dict[str, ComponentFacts]:
    """`base.facts_from_configs` of a model's configs, built once per process (the planner asks often)."""
    return facts_from_configs(configs.components)


def component_sizes(configs: ModelConfigs) -> dict[str, int]:
    """Parameter count of each component, from its config alone (built on the meta device: no memory)."""
    return {name: facts.parameters for name, facts in component_facts(configs).items()}