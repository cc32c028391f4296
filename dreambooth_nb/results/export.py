"""Take the model out: one `.safetensors` file in the original Stable Diffusion layout, for AUTOMATIC1111 and
ComfyUI.

    from dreambooth_nb import export
    export("project/runs/lr2e-6", "project/exports/sks-dog.safetensors")   # a run (its last snapshot) or a snapshot

A single-file checkpoint holds the UNet, the VAE and the text encoder under the names of the original
CompVis / Stability code (`ldm`): `model.diffusion_model.input_blocks.1.1.…` for the UNet,
`first_stage_model.…` for the VAE, `cond_stage_model.transformer.text_model.…` for SD 1.x's CLIP and
`cond_stage_model.model.…` for SD 2.x's OpenCLIP. AUTOMATIC1111 and ComfyUI read only that layout. Here the
names are derived from each part's config (blocks, layers), one table per model family (`LAYOUTS`: SD 1.x,
SD 2.x; SDXL adds its own), following diffusers' reference converter
(scripts/convert_diffusers_to_original_stable_diffusion.py), and the tests prove them with diffusers' own
loader: `StableDiffusionPipeline.from_single_file(file, config=base)` gives back every tensor of the snapshot.

The file is streamed: its header (every name, dtype and shape) is written first, from the source files'
headers, then each tensor is read alone from its safetensors file, converted, written and freed. Host memory
stays at about one tensor (SD 1.5's largest is the 152 MB token embedding), never a copy of the model —
Colab's VM has ≈12.7 GB, SD 1.5 in fp32 is 4.3 GB. (safetensors' own `save_file` needs every tensor in
memory at once, and before 0.6 it copied each one into a bytes object too.)
"""

from __future__ import annotations

import datetime
import json
import math
import tempfile
from pathlib import Path

import torch

from dreambooth_nb import storage
from dreambooth_nb.errors import ConfigError, DataError, ExportError
from dreambooth_nb.model import snapshots
from dreambooth_nb.model.base import BaseModel
from dreambooth_nb.model.layout import Entry, Layout, LAYOUTS, Weights, entries_for, layout_for
from dreambooth_nb.units import disk_size
from dreambooth_nb.results.quality import suggested_step



# --- Which snapshot, and where its parts are ------------------------------------------------------------
def choose_snapshot(run_or_snapshot, *, step: int | None = None) -> Path:
    """The snapshot that `export` and `hub.push_to_hub` take: a snapshot (or pipeline) folder as it is; for a
    run folder the one saved at `step`, else the one the latest comparison suggested (`quality.suggest`, kept
    in `<run>/suggestion.json`) when there is one, else the last. The one place that decides it."""
    path = Path(run_or_snapshot).expanduser()
    if snapshots.is_snapshot(path):
        return path
    saved = dict(storage.list_snapshots(path))
    if not saved:
        raise DataError(f"{path}: no snapshot there. Pass a run folder that finished training (PROJECT_DIR/runs/"
                        "<name>) or a snapshot folder (…/snapshots/step-000400).")
    if step is None:
        suggested, why = suggested_step(path)
        if suggested in saved:
            print(f"The suggested snapshot of {path.name}: {why}")
            return saved[suggested]
        return saved[max(saved)]
    if step not in saved:
        raise ConfigError(f"STEP: {path.name} has no snapshot at step {step}; it has steps "
                          f"{', '.join(map(str, saved))} (0: the one notebook 4 suggested, else the last).")
    return saved[step]


def snapshot_in_project(project, run: str = "", *, step: int = 0) -> Path:
    """Notebook 6's snapshot: of run `run` (a name as notebook 4 lists them: `lr2e-6`, `sweeps/lr5e-6`), else
    of the run the project's settings train (notebook 3's); at `step`, else the one `choose_snapshot` picks."""
    runs = project.select_runs(run, setting="RUN")
    folder = next(iter(runs.values())) if run.strip() else project.run_dir_for(project.load_config())
    if folder not in runs.values():
        raise ConfigError(f"RUN: the run of the project's settings ({folder.name}) has no snapshot yet; train it "
                          f"(notebook 3), or name one of the runs that have: {', '.join(runs)}.")
    return choose_snapshot(folder, step=step or None)


def file_name(snapshot: Path, name: str = "") -> str:
    """`name` as a .safetensors file name; by default the run's and the snapshot's (`lr2e-6-step-000400`)."""
    stem = Path(name.strip()).name.removesuffix(".safetensors") if name.strip() else label(snapshot, sep="-")
    return f"{stem}.safetensors"


def label(snapshot: Path, *, sep: str = "/") -> str:
    """`run/step-000400` for a run's snapshot, the folder's name for any other pipeline folder."""
    snapshot = Path(snapshot)
    if snapshot.parent.name != "snapshots":
        return snapshot.name
    return f"{snapshot.parent.parent.name}{sep}{snapshot.name}"


def run_config(snapshot: Path) -> dict:
    """The saved config of the run a snapshot belongs to (`run/snapshots/step-N`), or {} for a bare pipeline."""
    saved = Path(snapshot).parent.parent / "config.json"
    return json.loads(saved.read_text()) if Path(snapshot).parent.name == "snapshots" and saved.is_file() else {}


def subject_prompts(config: dict, key: str = "instance_prompt") -> str | None:
    """A saved run config's instance (or, with `key="class_prompt"`, class) prompt: each subject's, joined
    with "; " when the run had several; None when there is none."""
    values = [subject.get(key) for subject in config.get("concepts", [])]
    return "; ".join(dict.fromkeys(v for v in values if v)) or None


_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
PARTS = tuple(_STEMS)


def part_sources(snapshot: Path, meta: dict) -> tuple[dict[str, Weights], Path]:
    """Each part's weights — from the snapshot when it holds the part (it was trained, or the snapshot is
    complete), else from its base model — and the folder holding the scheduler config."""
    inside = [name for name in PARTS if meta["complete"] or name in meta["trained"]]
    base = None if len(inside) == len(PARTS) else base_folder(meta, [p for p in PARTS if p not in inside])
    parts = {name: Weights.open(snapshot / name, stem=_STEMS[name]) if name in inside else
             Weights.open(base / name, stem=_STEMS[name], variant=meta.get("variant")) for name in PARTS}
    return parts, snapshot if (snapshot / "scheduler").is_dir() else base


def base_folder(meta: dict, parts: list[str]) -> Path:
    """A local folder holding the base model's `parts` and scheduler config: the folder itself, the converted
    folder of a single file, or the Hub cache (downloading only those files when they are not there yet)."""
    base = BaseModel(meta["base"], revision=meta.get("revision")) if meta.get("base") else None
    where = base.location if base else None
    if where in ("folder", "file"):  # (a single file: its converted folder)
        return Path(base.path)
    if where != "hub":
        raise ExportError(f"The snapshot's base model {base!r} is not there any more (not a folder, a file or a "
                          "Hub id); restore it, or export the run's final snapshot, which is complete.")
    return _from_hub(base.name, parts, revision=base.revision, variant=meta.get("variant"))


def _from_hub(repo: str, parts: list[str], *, revision: str | None, variant: str | None) -> Path:
    from huggingface_hub import snapshot_download

    ext = f".{variant}" if variant else ""
    wanted = ["model_index.json", "scheduler/*.json"]
    for name in parts:
        wanted += [f"{name}/config.json", f"{name}/{_STEMS[name]}{ext}.safetensors",
                   f"{name}/{_STEMS[name]}.safetensors.index{ext}.json"]
    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=wanted))
        shards = [f"{name}/{shard}" for name in parts
                  for index in (folder / name).glob(f"*.safetensors.index{ext}.json")
                  for shard in set(json.loads(index.read_text())["weight_map"].values())]
        return Path(snapshot_download(repo, revision=revision, allow_patterns=wanted + shards)) if shards else folder
    except Exception as err:  # offline, gated, deleted: each means "the base is not reachable"
        raise ExportError(f"The snapshot holds only the trained weights; the rest comes from its base model "
                          f"{repo!r}, which could not be loaded ({type(err).__name__}). Connect to the internet (and "
                          "set HF_TOKEN for a gated model), or export the run's final snapshot, which is complete."
                          ) from None


# --- The file ---------------------------------------------------------------------------------------------
DTYPE_CODES = {torch.float16: "F16", torch.float32: "F32"}  # safetensors' header codes


def write_safetensors(path: Path, entries: list[Entry], *, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
    """Write `entries` as one safetensors file, a tensor at a time. The format
    (github.com/huggingface/safetensors, "Format"): 8 bytes little-endian header length, a JSON header
    (`__metadata__` of strings; per tensor dtype, shape and [begin, end) byte offsets into the data, which
    follows without holes), padded with spaces to 8 bytes as the reference writer does, then the data."""
    header, offset = {"__metadata__": metadata}, 0
    for entry in entries:
        size = math.prod(entry.shape) * dtype.itemsize
        header[entry.name] = {"dtype": DTYPE_CODES[dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with storage.atomic_file(path) as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        for entry in entries:
            out.write(entry.tensor(dtype).view(torch.uint8).numpy().data)  # little-endian, as the format wants
    return path


# --- Export ----------------------------------------------------------------------------------------------
def export(snapshot_or_run, path, *, half: bool = True, step: int | None = None, merged: bool = False) -> Path:
    """Write the snapshot (a run: its snapshot at `step`, else its last) as one original-layout `.safetensors`
    file at `path` (fp16 with `half`: 2.1 GB for SD 1.5, half the fp32 size, what AUTOMATIC1111 and ComfyUI
    compute in anyway). A v-prediction model also gets `<path stem>.yaml` beside it, the config AUTOMATIC1111
    needs for it. A LoRA run exports its adapters (kohya's layout: a few MB that AUTOMATIC1111 and ComfyUI load
    as a LoRA), or with `merged` the base model with the adapters fused in, as one checkpoint. Returns `path`."""
    snapshot = choose_snapshot(snapshot_or_run, step=step)
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: the exported file must end in .safetensors (AUTOMATIC1111 and ComfyUI look "
                          "for that name).")
    meta = snapshots.info(snapshot)
    if snapshots.holds_adapters(meta):
        return _export_lora(snapshot, meta, path, half=half, merged=merged)
    return _export_checkpoint(snapshot, meta, path, half=half)


def _export_lora(snapshot: Path, meta: dict, path: Path, *, half: bool, merged: bool) -> Path:
    """The adapters as kohya's file with the run's metadata; or (`merged`) base + adapters as a checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    if merged:
        # Asked before anything loads: merging an SDXL LoRA would load the whole SDXL pipeline in fp32 on the CPU
        # (≈13.9 GB, more than a Colab VM has) only to find that its single-file layout is not written here.
        if not BaseModel(meta["base"], revision=meta.get("revision")).family.single_file_export:
            raise ExportError("merged: an SDXL, SD 3.x or FLUX.1 LoRA cannot be merged into a single checkpoint here "
                              "yet (single-file export covers SD 1.x and 2.x). Export the LoRA itself (merged=False: a "
                              "few MB) and load it on top of its base model in ComfyUI or AUTOMATIC1111.")
        with tempfile.TemporaryDirectory() as folder:  # the fused pipeline, saved, then exported as any snapshot
            pipe = snapshots.load_pipeline(snapshot, device=torch.device("cpu"), dtype=torch.float32)
            pipe.unload_lora_weights()  # (the fused weights stay)
            pipe.save_pretrained(folder, safe_serialization=True)
            del pipe
            return _export_checkpoint(Path(folder), {"complete": True, "trained": [], "base": meta.get("base"),
                                                     "step": meta.get("step")}, path, half=half, described=snapshot)
    base = BaseModel(meta["base"], revision=meta.get("revision"))
    family = base.family
    # kohya's layout where the family has one (A1111, ComfyUI, Forge), else diffusers' (ComfyUI reads SD3's)
    source = snapshot / (snapshots.KOHYA_WEIGHTS if family.kohya_base_version else snapshots.LORA_WEIGHTS)
    with safe_open(source, framework="pt") as handle:
        source_meta = dict(handle.metadata() or {})
    config = run_config(snapshot)
    prompt = subject_prompts(config)
    info = {**source_meta, "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{family.architecture(base.component_configs[family.denoiser])}/lora",
            "modelspec.implementation": family.modelspec_implementation,
            "modelspec.title": f"{prompt} ({snapshot.parent.parent.name}, step {meta.get('step')})",
            "modelspec.description": f"Dreambooth LoRA of {base_name(meta.get('base'))} made with dreambooth-nb.",
            **({"modelspec.trigger_phrase": prompt} if prompt else {}),
            "dreambooth_nb.base_model": base_name(meta.get("base")), "dreambooth_nb.step": str(meta.get("step")),
            "dreambooth_nb.learning_rate": str(config.get("learning_rate")), "dreambooth_nb.method": "lora"}
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v if k.endswith(".alpha") else v.to(dtype).contiguous() for k, v in load_file(source).items()}
    storage.atomic_write_bytes(path, save(tensors, metadata=info))  # a few MB: written whole
    layout = "kohya's layout" if family.kohya_base_version else "diffusers' layout"
    print(f"Exported the LoRA of {label(snapshot)} ({disk_size(path.stat().st_size)}, {layout}) to {path}")
    return path


def _export_checkpoint(snapshot: Path, meta: dict, path: Path, *, half: bool, described: Path | None = None) -> Path:
    parts, scheduler_folder = part_sources(snapshot, meta)
    configs = {name: weights.config for name, weights in parts.items()}
    layout = layout_for(configs)
    scheduler = json.loads((scheduler_folder / "scheduler" / "scheduler_config.json").read_text())
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in layout.architecture:
        raise ExportError(f"{snapshot}: the model predicts {prediction!r}; AUTOMATIC1111 and ComfyUI load epsilon and "
                          "v-prediction models.")
    entries = entries_for(parts, layout)
    described = described or snapshot  # (a merged LoRA is described as its snapshot, not the temporary folder)
    config = run_config(described)
    info = describe(described, meta, config, layout=layout, prediction=prediction, configs=configs)
    write_safetensors(path, entries, dtype=torch.float16 if half else torch.float32, metadata=info)
    if prediction == "v_prediction":
        storage.atomic_write_text(path.with_suffix(".yaml"), ldm_yaml(configs, scheduler, layout=layout))
    print(f"Exported {label(snapshot)} ({layout.family}, {'fp16' if half else 'fp32'}, {disk_size(path.stat().st_size)}) "
          f"to {path}"
          + (f" with {path.with_suffix('.yaml').name} (v-prediction)" if prediction == "v_prediction" else ""))
    return path


def base_name(base: str | None) -> str:
    """A base model as the file's metadata names it: a Hub id as it is, a local folder or file by its name only.
    Its absolute path says nothing on another machine and shows the user's folders (/content/drive/MyDrive/…,
    /home/alice/…) to everyone the file is shared with."""
    if not base:
        return "unknown"
    return base if BaseModel(base).location == "hub" else f"local: {Path(base).name}"


def describe(snapshot: Path, meta: dict, config: dict, *, layout: Layout, prediction: str,
             configs: dict[str, dict]) -> dict[str, str]:
    """The file's metadata: Stability AI's ModelSpec keys (`modelspec.*`, as kohya's sd-scripts and the UIs read
    them) and the run's settings (`dreambooth_nb.*`). Nothing secret: no token (a config never holds one), no
    local paths (`base_name`), no photo folders."""
    from importlib.metadata import version

    marker = snapshot / storage.SNAPSHOT_MARKER
    made = marker if marker.is_file() else snapshot / "model_index.json"
    native = int(configs["unet"]["sample_size"]) * 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    resolution = int(config.get("resolution") or native)
    prompt, step, base = subject_prompts(config), meta.get("step"), base_name(meta.get("base"))
    title = f"{prompt} ({snapshot.parent.parent.name}, step {step})" if prompt else snapshot.name
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": layout.architecture[prediction],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.date": datetime.date.fromtimestamp(made.stat().st_mtime).isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
        "modelspec.description": f"Dreambooth fine-tune of {base} made with dreambooth-nb.",
    }
    if prompt:
        spec["modelspec.trigger_phrase"] = prompt
        spec["modelspec.usage_hint"] = f"Prompt with '{prompt}'."
    run = {"base_model": base, "step": step, "instance_prompt": prompt,
           "class_prompt": subject_prompts(config, "class_prompt"), "learning_rate": config.get("learning_rate"),
           "max_train_steps": config.get("max_train_steps"), "resolution": config.get("resolution"), "train_text_encoder": config.get("train_text_encoder"),
           "prior_preservation": config.get("with_prior_preservation"), "seed": config.get("seed"),
           "version": version("dreambooth-nb")}
    return spec | {f"dreambooth_nb.{k}": str(v) for k, v in run.items() if v is not None}


def ldm_yaml(configs: dict[str, dict], scheduler: dict, *, layout: Layout) -> str:
    """The ldm config AUTOMATIC1111 reads from `<model>.yaml` beside a checkpoint (it takes v-prediction from
    there), built from the model's own configs in the shape of Stability AI's
    configs/stable-diffusion/v2-inference-v.yaml (stablediffusion repository)."""
    import yaml

    unet, vae = configs["unet"], configs["vae"]
    channels = unet["block_out_channels"]
    heads = unet["attention_head_dim"]  # diffusers' name; SD 1.x/2.x configs store the number of heads there
    heads = heads if isinstance(heads, int) else heads[0]
    sd2 = layout is LAYOUTS["sd2"]
    cond = ({"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
             "params": {"freeze": True, "layer": "penultimate"}} if sd2 else
            {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"})
    unet_params = {"use_checkpoint": True, "use_fp16": True, "image_size": 32, "in_channels": unet["in_channels"],
                   "out_channels": unet["out_channels"], "model_channels": channels[0],
                   "attention_resolutions": [2**i for i, kind in enumerate(unet["down_block_types"])
                                             if kind.startswith("CrossAttn")][::-1],
                   "num_res_blocks": unet["layers_per_block"], "channel_mult": [c // channels[0] for c in channels],
                   "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": unet["cross_attention_dim"],
                   "use_linear_in_transformer": bool(unet.get("use_linear_projection")), "legacy": False}
    unet_params |= {"num_head_channels": channels[0] // heads} if sd2 else {"num_heads": heads}
    vae_channels = vae["block_out_channels"]
    config = {"model": {
        "base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "parameterization": "v" if scheduler.get("prediction_type") == "v_prediction" else "eps",
            "linear_start": scheduler.get("beta_start", 0.00085), "linear_end": scheduler.get("beta_end", 0.012),
            "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": scheduler.get("num_train_timesteps", 1000),
            "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": unet["sample_size"],
            "channels": unet["in_channels"], "cond_stage_trainable": False, "conditioning_key": "crossattn",
            "monitor": "val/loss_simple_ema", "scale_factor": vae.get("scaling_factor", 0.18215), "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": vae["latent_channels"], "monitor": "val/rec_loss",
                "ddconfig": {"double_z": True, "z_channels": vae["latent_channels"], "resolution": 256,
                             "in_channels": vae["in_channels"], "out_ch": vae["out_channels"], "ch": vae_channels[0],
                             "ch_mult": [c // vae_channels[0] for c in vae_channels],
                             "num_res_blocks": vae["layers_per_block"], "attn_resolutions": [], "dropout": 0.0},
                "lossconfig": {"target": "torch.nn.Identity"}}},
            "cond_stage_config": cond}}}
    return yaml.safe_dump(config, sort_keys=False)


def _how_to_use_lora(name: str, *, meta: dict, prompt: str) -> str:
    xl = meta.get("modelspec.architecture", "").startswith("stable-diffusion-xl")
    pipeline = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    base = meta.get("dreambooth_nb.base_model", "")
    base = base if base and not base.startswith(("local:", "unknown")) else "<the base model it was trained on>"
    stem = Path(name).stem
    return "\n".join([
        "## How to use it (a LoRA: load it on top of its base model)", "", "**diffusers**", "", "```python",
        "import torch", f"from diffusers import {pipeline}", "",
        f'pipe = {pipeline}.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")',
        f'pipe.load_lora_weights(".", weight_name="{name}")', f'image = pipe("{prompt}, in the snow").images[0]',
        "```", "",
        f"**AUTOMATIC1111**: put `{name}` into `stable-diffusion-webui/models/Lora/`, choose the base model as the "
        f"checkpoint and prompt with `{prompt}, <lora:{stem}:1>`.", "",
        f"**ComfyUI**: put `{name}` into `ComfyUI/models/loras/` and add a *LoraLoader* node after *Load "
        "Checkpoint* (the base model).", ""])


def how_to_use(file=None, *, repo_id: str | None = None, prompt: str | None = None) -> str:
    """Markdown: how to generate with the model in diffusers (from the Hub repository `repo_id`, or from the
    exported `file`), AUTOMATIC1111 and ComfyUI. Prompt, base model and prediction type come from the file's
    metadata when there is a file."""
    meta = {}
    if file is not None:
        from safetensors import safe_open

        with safe_open(file, framework="pt") as handle:
            meta = handle.metadata() or {}
    # (a run of several subjects has their prompts joined with "; ": the example uses the first)
    prompt = (prompt or meta.get("modelspec.trigger_phrase") or "a photo of sks dog").split("; ")[0]
    name = Path(file).name if file is not None else None
    if meta.get("dreambooth_nb.method") == "lora":
        return _how_to_use_lora(name, meta=meta, prompt=prompt)
    base = meta.get("dreambooth_nb.base_model", "")
    v = meta.get("modelspec.prediction_type") == "v"
    lines = ["## How to use it", "", "**diffusers**", "", "```python", "import torch",
             "from diffusers import StableDiffusionPipeline", ""]
    if repo_id:
        lines.append(f'pipe = StableDiffusionPipeline.from_pretrained("{repo_id}", torch_dtype=torch.float16)')
    if name:
        # from_single_file guesses the configs from the keys; naming the base is exact (SD 2.x 512 vs 768 px).
        config = f', config="{base}"' if base and not base.startswith(("local:", "unknown")) else ""
        load = f'pipe = StableDiffusionPipeline.from_single_file("{name}"{config}, torch_dtype=torch.float16)'
        lines += ["# or from the single file:", f"# {load}"] if repo_id else [load]
    lines += ['pipe = pipe.to("cuda")', f'image = pipe("{prompt}, in the snow").images[0]', "```", ""]
    if name:
        yaml_note = (f" with `{Path(name).with_suffix('.yaml')}` beside it (it tells AUTOMATIC1111 that the model "
                     "predicts v)") if v else ""
        comfy_note = (" ComfyUI guesses v-prediction from the weights; if images come out grey or noisy, add a "
                      "*ModelSamplingDiscrete* node set to v_prediction.") if v else ""
        lines += [f"**AUTOMATIC1111**: put `{name}` into `stable-diffusion-webui/models/Stable-diffusion/`"
                  f"{yaml_note}, refresh the checkpoint list, choose it and prompt with `{prompt}`.", "",
                  f"**ComfyUI**: put `{name}` into `ComfyUI/models/checkpoints/` and choose it in the *Load "
                  f"Checkpoint* node.{comfy_note}", ""]
    return "\n".join(lines)
