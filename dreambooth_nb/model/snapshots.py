"""Snapshots: the trained weights at a step, kept for comparison and export (never rotated).

    snapshots/step-000200/      an intermediate snapshot holds only what training changed
        snapshot.json             step, base model (id or folder, revision, variant), parts, native size
        unet/                     config + weights (fp16 when training used mixed precision)
        text_encoder/             only when the text encoder was trained
    snapshots/step-000400/      the final snapshot is a complete pipeline folder as well:
        model_index.json, vae/, tokenizer/, scheduler/, ...   `StableDiffusionPipeline.from_pretrained(it)`

    A LoRA run's snapshots (every one, the final too) hold its adapters, a few MB:
        snapshot.json, pytorch_lora_weights.safetensors     `pipe.load_lora_weights(folder)` (diffusers)
        lora_kohya.safetensors                              the same in kohya's layout (A1111, ComfyUI)

Why partial: on a free 15 GB Google Drive a complete fp16 SD 1.5 pipeline is 2.13 GB per snapshot, the
UNet alone 1.72 GB; the VAE, the tokenizer and a frozen text encoder never change, so they are written once,
in the final snapshot. `load_pipeline` composes a partial snapshot with its base model (from the Hub cache
or the local folder it names), so comparison, sweeps and export treat every snapshot alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dreambooth_nb import storage
from dreambooth_nb.config import model_location
from dreambooth_nb.errors import ConfigError, DataError
from dreambooth_nb.model.base import BaseModel, facts_from_configs
from dreambooth_nb.dtypes import diffusers_dtype, transformers_dtype
from dreambooth_nb.model.quantization import NF4, quantized_to_fit

_DIFFUSERS_WEIGHTS, _TRANSFORMERS_WEIGHTS = "diffusion_pytorch_model.safetensors", "model.safetensors"


def save(path: Path, *, step: int, config, parts, trained: dict[str, dict], dtype: torch.dtype,
         complete: bool) -> Path:
    """Write the snapshot of `step` atomically.

    `trained` maps each trained part ("unet" or "transformer", "text_encoder") to the tensors to save for it (its state dict,
    or the EMA weights); `parts` (`models.Components`) gives their configs and, for a `complete` snapshot,
    the frozen parts, the tokenizer and the scheduler.
    """
    import diffusers

    family = parts.family
    with storage.atomic_folder(path) as tmp:
        for name, tensors in trained.items():
            _save_part(parts.part(name), tensors, tmp / name, dtype=dtype)
        if complete:
            pipeline = getattr(diffusers, family.pipeline_class)
            modules = {name: getattr(parts, name) for name in (*family.text_encoders, *family.tokenizers)}
            modules[family.denoiser] = parts.denoiser
            pipe = pipeline(vae=parts.vae, scheduler=parts.inference_scheduler, **modules,
                            **family.pipeline_kwargs())
            pipe.save_config(tmp)
            for name in family.tokenizers:
                getattr(parts, name).save_pretrained(tmp / name)
            parts.inference_scheduler.save_pretrained(tmp / "scheduler")
            for name in ("vae", *family.text_encoders):
                if name not in trained:
                    module = getattr(parts, name)
                    _save_part(module, module.state_dict(), tmp / name, dtype=dtype)
        storage.write_json(tmp / storage.SNAPSHOT_MARKER, {
            "format": storage.FORMAT, "step": step, "complete": complete, "trained": sorted(trained),
            "base": BaseModel.of(config).reference, "revision": config.revision,
            "variant": config.variant, "native_resolution": _native_resolution(parts),
            "dtype": str(dtype).removeprefix("torch.")})
    return path


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' name: `pipe.load_lora_weights(folder)` finds it
KOHYA_WEIGHTS = "lora_kohya.safetensors"  # the same adapters in kohya's layout, for AUTOMATIC1111 and ComfyUI


def save_lora(path: Path, *, step: int, config, parts, adapters: dict[str, dict], dtype: torch.dtype,
              alpha: float) -> Path:
    """Write a LoRA snapshot atomically: the adapters of each trained part (by parameter name, as
    `methods.LoRA.saved_tensors` gives them) in diffusers' format and in kohya's (`lora_unet_…`, `lora_te_…`
    keys, `lora_down`/`lora_up`, a per-module `.alpha`), converted by diffusers' own converters.

    The scale alpha / rank is folded into the up weights and both files say alpha = rank: every loader then
    applies exactly what training did (diffusers' kohya converter writes alpha = rank whatever the adapter's
    alpha was, and a diffusers-format file without metadata loads with alpha = rank as well).
    """
    import diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    family = parts.family
    scale = alpha / config.lora_rank
    peft = {}
    for name, tensors in adapters.items():
        tensors = {k: v.detach().to("cpu", torch.float32) for k, v in tensors.items()}
        layer = get_peft_model_state_dict(parts.part(name), state_dict=tensors)
        layer = {k: (v * scale if ".lora_B." in k else v).to(dtype) for k, v in layer.items()}
        if name.startswith("text_encoder"):
            # Named from the CLIP layout, not from what the installed transformers calls its modules: 5.x
            # drops the `text_model.` level that every LoRA file (and kohya's `lora_te_text_model_…`) has.
            layer = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in layer.items()}
        peft[name] = layer
    with storage.atomic_folder(path) as tmp:
        # PEFT's key layout (`….lora_A.weight`), diffusers' current format: its older `lora.down` names
        # cover linear layers only, and a conv adapter beside them made diffusers drop the linear ones.
        getattr(diffusers, family.pipeline_class).save_lora_weights(
            tmp, weight_name=LORA_WEIGHTS, **{f"{name}_lora_layers": layer for name, layer in peft.items()})
        if family.kohya_base_version:
            kohya = family.kohya(peft, denoiser_config=dict(parts.denoiser.config))
            save_file({k: v.contiguous() for k, v in kohya.items()}, tmp / KOHYA_WEIGHTS,
                      metadata={"ss_network_dim": str(config.lora_rank), "ss_network_alpha": str(config.lora_rank),
                                "ss_network_module": "networks.lora",
                                "ss_base_model_version": family.kohya_base_version})
        storage.write_json(tmp / storage.SNAPSHOT_MARKER, {
            "format": storage.FORMAT, "step": step, "complete": False, "trained": sorted(adapters), "method": "lora",
            "lora": {"rank": config.lora_rank, "alpha": alpha, "scale_folded_into_up_weights": scale,
                     "target_modules": list(config.lora_target_modules)},
            "base": BaseModel.of(config).reference, "revision": config.revision,
            "variant": config.variant, "native_resolution": _native_resolution(parts), "vae": parts.vae_source,
            "dtype": str(dtype).removeprefix("torch.")})
    return path


def _save_part(module, tensors: dict, folder: Path, *, dtype: torch.dtype) -> None:
    folder.mkdir(parents=True)
    if hasattr(module, "save_config"):  # diffusers model
        module.save_config(folder)
        filename = _DIFFUSERS_WEIGHTS
    else:  # transformers model
        module.config.save_pretrained(folder)
        filename = _TRANSFORMERS_WEIGHTS
    storage.save_weights(tensors, folder, filename=filename, dtype=dtype)


def _native_resolution(parts) -> int:
    return parts.family.native_size(dict(parts.denoiser.config), dict(parts.vae.config))


# --- Reading -------------------------------------------------------------------------------------------
def holds_adapters(meta: dict) -> bool:
    """Whether a snapshot (its `snapshot.json`, `info`) holds adapters (LoRA's files) rather than weights."""
    return meta.get("method") == "lora"


def info(path) -> dict:
    """What `snapshot.json` says; a complete pipeline folder without one (older runs, base models) too."""
    path = Path(path)
    marker = path / storage.SNAPSHOT_MARKER
    if marker.is_file():
        meta = json.loads(marker.read_text())
        storage.check_format(meta, source=str(marker), what="Train the run again with this version to compare or "
                                                             "export it, or use the version that wrote it.")
        return meta
    if (path / "model_index.json").is_file():  # a pipeline folder (a base model): complete, nothing trained
        return {"format": storage.FORMAT, "complete": True, "trained": [], "base": None}
    raise DataError(f"{path}: not a snapshot (no snapshot.json or model_index.json). Pass a snapshot folder "
                    "such as output_dir/snapshots/step-000400, or train first.")


def is_snapshot(path) -> bool:
    path = Path(path)
    return (path / storage.SNAPSHOT_MARKER).is_file() or (path / "model_index.json").is_file()


def native_resolution(path) -> int:
    """The image size the model was made for (`Family.native_size`: SD 1.5's 512)."""
    path = Path(path)
    meta = info(path)
    if meta.get("native_resolution"):
        return int(meta["native_resolution"])
    try:
        base = BaseModel(str(path))
        return base.family.native_size_of(base.component_configs)
    except (OSError, KeyError, TypeError, ValueError, ConfigError) as err:
        raise DataError(f"{path}: cannot read the denoiser/VAE config to find the native image size ({err}); "
                        "set EvalSpec.resolution explicitly (512 for SD 1.5).") from None


def load_pipeline(path, *, device: torch.device, dtype: torch.dtype | None = None, revision: str | None = None,
                  variant: str | None = None, vae: str | None = None):
    """The inference pipeline of a snapshot, a pipeline folder or a Hub id (`revision`, `variant` for those):
    fp16 on a GPU, fp32 on CPU, safety checker off, no progress bar. A partial snapshot is composed with
    its base model (and the VAE it trained with: SDXL's fp16-fix one); `vae` names another VAE to use."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL

    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    path_text = str(path)
    meta = info(path) if model_location(path_text) == "folder" else {"complete": True, "trained": []}
    meta = {"revision": revision, "variant": variant, "vae": vae, **{k: v for k, v in meta.items() if v is not None}}
    # What loads: the pipeline itself when complete, else its base model (a single file: its converted folder).
    model = BaseModel(path_text if meta["complete"] else meta["base"], revision=meta.get("revision"))
    source, overrides = model.path, {}
    lora = holds_adapters(meta)
    try:
        index, family = model.index, model.family
        if not meta["complete"] and not lora:
            overrides[family.denoiser] = getattr(diffusers, family.denoiser_class).from_pretrained(
                Path(path) / family.denoiser, **diffusers_dtype(dtype))
            for name in meta["trained"]:
                if name.startswith("text_encoder"):
                    overrides[name] = getattr(transformers, index[name][1]).from_pretrained(
                        Path(path) / name, **transformers_dtype(dtype))
        # The VAE the snapshot trained with, the one asked for, or the family's for fp16 wherever the model runs
        # in fp16 (SDXL's own VAE overflows to NaN there: black images); a complete snapshot carries its own.
        other_vae = meta.get("vae") if (vae or not meta["complete"]) else None
        if other_vae is None and dtype == torch.float16:
            other_vae = family.half_precision_vae
        if other_vae:
            overrides["vae"] = AutoencoderKL.from_pretrained(other_vae, **diffusers_dtype(dtype))
        quantized = _quantized(model, device=device, loaded=overrides)
        if quantized:  # each quantized straight onto the GPU as it loads
            from diffusers.quantizers import PipelineQuantizationConfig

            overrides["quantization_config"] = PipelineQuantizationConfig(
                quant_backend="bitsandbytes_4bit", quant_kwargs={**NF4, "bnb_4bit_compute_dtype": dtype},
                components_to_quantize=quantized)
        pipe = getattr(diffusers, family.pipeline_class).from_pretrained(
            source, **diffusers_dtype(dtype), variant=meta.get("variant"), **model.load_kwargs(),
            **family.pipeline_kwargs(), **overrides)
    except OSError as err:
        if meta["complete"]:
            raise
        raise DataError(f"{path}: this snapshot holds only the trained weights and needs its base model "
                        f"{source!r}, which could not be loaded ({str(err).splitlines()[0][:200]}). Connect to the "
                        "internet (Hub id) or restore that folder.") from None
    if lora:  # (fused into 16-bit weights; a 4-bit denoiser keeps them beside its weights, exact)
        _load_adapters(pipe, Path(path), trained=meta["trained"], denoiser=family.denoiser,
                       fuse=family.denoiser not in quantized)
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda":
        # The VAE decodes one image at a time, and in tiles above its native size: a batch of SDXL images at
        # 1024 px would otherwise need several GB at once, beside the UNet, on a 15 GB T4.
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
    return pipe.to(device)


def _quantized(model: BaseModel, *, device: torch.device, loaded: dict) -> list[str]:
    """The components to load in 4 bits on this GPU (`loading.quantized_to_fit`; none on CPU, where
    bitsandbytes' loader does not run, and none of those given already loaded)."""
    if device.type != "cuda":
        return []
    sizes = {name: facts.parameters for name, facts in facts_from_configs(model.component_configs).items()}
    return [name for name in quantized_to_fit(sizes, gpu_bytes=torch.cuda.get_device_properties(device).total_memory)
            if name not in loaded]


def _load_adapters(pipe, path: Path, *, trained: list[str], denoiser: str, fuse: bool) -> None:
    """A LoRA snapshot's adapters into `pipe` (fused: inference runs at the base model's speed)."""
    if any(name.startswith("text_encoder") for name in trained):
        pipe.load_lora_weights(path, weight_name=LORA_WEIGHTS)
    else:  # the denoiser only: loading through the pipeline would warn that the text encoder has no adapter
        # (`load_lora_adapter`: diffusers ≥ 0.32, the floor in pyproject.toml)
        getattr(pipe, denoiser).load_lora_adapter(str(path), weight_name=LORA_WEIGHTS, prefix=denoiser)
    if fuse:
        pipe.fuse_lora()
