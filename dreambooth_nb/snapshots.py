"""Snapshots: the trained weights at a step, kept for comparison and export (never rotated).

    snapshots/step-000200/      an intermediate snapshot holds only what training changed
        snapshot.json             step, base model (id or folder, revision, variant), parts, native size
        unet/                     config + weights (fp16 when training used mixed precision)
        text_encoder/             only when the text encoder was trained
    snapshots/step-000400/      the final snapshot is a complete pipeline folder as well:
        model_index.json, vae/, tokenizer/, scheduler/, ...   `StableDiffusionPipeline.from_pretrained(it)`

Why partial: on a free 15 GB Google Drive a complete fp16 SD 1.5 pipeline is 2.13 GB per snapshot, the
UNet alone 1.72 GB; the VAE, the tokenizer and a frozen text encoder never change, so they are written once,
in the final snapshot. `load_pipeline` composes a partial snapshot with its base model (from the Hub cache
or the local folder it names), so comparison, sweeps and export treat every snapshot alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import storage
from .errors import DataError

FORMAT = 1
_WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
            "text_encoder": "model.safetensors"}


def save(path: Path, *, step: int, config, parts, trained: dict[str, dict], dtype: torch.dtype,
         complete: bool) -> Path:
    """Write the snapshot of `step` atomically.

    `trained` maps each trained part ("unet", "text_encoder") to the tensors to save for it (its state dict,
    or the EMA weights); `parts` (`models.Components`) gives their configs and, for a `complete` snapshot,
    the frozen parts, the tokenizer and the scheduler.
    """
    from diffusers import StableDiffusionPipeline

    with storage.atomic_folder(path) as tmp:
        for name, tensors in trained.items():
            _save_part(getattr(parts, name), tensors, tmp / name, dtype=dtype)
        if complete:
            pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                           unet=parts.unet, scheduler=parts.inference_scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
            pipe.save_config(tmp)
            parts.tokenizer.save_pretrained(tmp / "tokenizer")
            parts.inference_scheduler.save_pretrained(tmp / "scheduler")
            for name in ("vae", "text_encoder"):
                if name not in trained:
                    module = getattr(parts, name)
                    _save_part(module, module.state_dict(), tmp / name, dtype=dtype)
        storage.write_json(tmp / storage.SNAPSHOT_MARKER, {
            "format": FORMAT, "step": step, "complete": complete, "trained": sorted(trained),
            "base": _base_reference(config.pretrained_model_name_or_path), "revision": config.revision,
            "variant": config.variant, "native_resolution": _native_resolution(parts),
            "dtype": str(dtype).removeprefix("torch.")})
    return path


def _save_part(module, tensors: dict, folder: Path, *, dtype: torch.dtype) -> None:
    folder.mkdir(parents=True)
    if hasattr(module, "save_config"):  # diffusers model
        module.save_config(folder)
        filename = _WEIGHTS["unet"]
    else:  # transformers model
        module.config.save_pretrained(folder)
        filename = _WEIGHTS["text_encoder"]
    storage.save_weights(tensors, folder, filename=filename, dtype=dtype)


def _base_reference(model: str) -> str:
    """A Hub id as is; a local folder as an absolute path, so the snapshot loads from any working folder."""
    from .config import model_location

    return str(Path(model).expanduser().resolve()) if model_location(model) == "folder" else model


def _native_resolution(parts) -> int:
    return int(parts.unet.config.sample_size) * 2 ** (len(parts.vae.config.block_out_channels) - 1)


# --- Reading -------------------------------------------------------------------------------------------
def info(path) -> dict:
    """What `snapshot.json` says; a complete pipeline folder without one (older runs, base models) too."""
    path = Path(path)
    marker = path / storage.SNAPSHOT_MARKER
    if marker.is_file():
        return json.loads(marker.read_text())
    if (path / "model_index.json").is_file():
        return {"format": 0, "complete": True, "trained": [], "base": None}
    raise DataError(f"{path}: not a snapshot (no snapshot.json or model_index.json). Pass a snapshot folder "
                    "such as output_dir/snapshots/step-000400, or train first.")


def is_snapshot(path) -> bool:
    path = Path(path)
    return (path / storage.SNAPSHOT_MARKER).is_file() or (path / "model_index.json").is_file()


def native_resolution(path) -> int:
    """The image size the model was made for: UNet sample size × the VAE's downsampling (8 for SD)."""
    path = Path(path)
    meta = info(path)
    if meta.get("native_resolution"):
        return int(meta["native_resolution"])
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
        vae = json.loads((path / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: cannot read the UNet/VAE config to find the native image size ({err}); "
                        "set EvalSpec.resolution explicitly (512 for SD 1.5).") from None


def load_pipeline(path, *, device: torch.device, dtype: torch.dtype | None = None, revision: str | None = None,
                  variant: str | None = None):
    """The inference pipeline of a snapshot, a pipeline folder or a Hub id (`revision`, `variant` for those):
    fp16 on a GPU, fp32 on CPU, safety checker off, no progress bar. A partial snapshot is composed with
    its base model."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .config import model_location
    from .models import diffusers_dtype, transformers_dtype

    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    path_text = str(path)
    meta = info(path) if model_location(path_text) == "folder" else {"complete": True, "trained": []}
    meta = {"revision": revision, "variant": variant, **{k: v for k, v in meta.items() if v is not None}}
    source, overrides = path_text, {}
    if not meta["complete"]:
        source = meta["base"]
        overrides["unet"] = UNet2DConditionModel.from_pretrained(Path(path) / "unet", **diffusers_dtype(dtype))
        if "text_encoder" in meta["trained"]:
            overrides["text_encoder"] = CLIPTextModel.from_pretrained(Path(path) / "text_encoder",
                                                                      **transformers_dtype(dtype))
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, **diffusers_dtype(dtype), revision=meta.get("revision"), variant=meta.get("variant"),
            local_files_only=model_location(source) == "folder", safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **overrides)
    except OSError as err:
        if meta["complete"]:
            raise
        raise DataError(f"{path}: this snapshot holds only the trained weights and needs its base model "
                        f"{source!r}, which could not be loaded ({str(err).splitlines()[0][:200]}). Connect to the "
                        "internet (Hub id) or restore that folder.") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
