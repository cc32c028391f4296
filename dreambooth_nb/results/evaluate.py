"""Fixed-seed evaluation of snapshots: the same prompts and seeds at every step, rendered once, cached on disk.

    spec = EvalSpec.for_config(config)             # instance prompt, class prompt, two new contexts
    images = render(snapshot_folder, spec)         # list of Rendered(snapshot, step, prompt, seed, image)

Where the images go (next to the run, never inside the snapshot itself):

    <output_dir>/renders/step-000400/<settings-key>/settings.json      scheduler, steps, guidance, resolution
    <output_dir>/renders/step-000400/<settings-key>/<prompt-key>-s<seed>.png
    <output_dir>/renders/step-000400/snapshot.json                     fingerprint of the snapshot rendered

`settings-key` hashes what changes every pixel (scheduler, steps, guidance scale, resolution);
`prompt-key` hashes the prompt text. So adding a prompt or a seed to a spec renders only the new images,
and rendering again costs no inference at all (the pipeline is loaded only when an image is missing).
If the snapshot folder is replaced (a new training run in the same place), its fingerprint changes and
the old renders are deleted instead of being shown as the new model's.

A snapshot folder outside `<output_dir>/snapshots/` (say a base model folder `models/sd15`) is cached
in `models/renders/sd15/`; pass `cache_dir=` to choose another place.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dreambooth_nb.model import snapshots
from dreambooth_nb import storage
from dreambooth_nb.errors import ConfigError
from dreambooth_nb.model.base import BaseModel
from dreambooth_nb.model.families import family_of
from dreambooth_nb.model.objectives import SAMPLERS
from dreambooth_nb.dataset.images import png_bytes
from dreambooth_nb.progress import in_task, report

DEFAULT_CONTEXTS = ("in the snow", "as an oil painting")
_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass
class EvalSpec:
    """What to render at every snapshot: each prompt × each seed, with one sampler setting.

    `scheduler`: "ddim" (default; the study recommends it when images look noisy), "pndm" (SD 1.5's own),
    "dpm" (DPM-Solver++ multistep, good images in 20–25 steps) or "euler"; a flow model (SD 3.x, FLUX.1)
    renders with its own Euler sampler whatever the name. `resolution` None means the model's
    native size (512 for SD 1.5).
    """

    prompts: list[str]
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    scheduler: str = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    resolution: int | None = None

    def __post_init__(self):
        # Friendly to notebook users: one prompt as a string, tuples for lists.
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if isinstance(self.seeds, int) and not isinstance(self.seeds, bool):
            self.seeds = [self.seeds]
        if isinstance(self.prompts, tuple):
            self.prompts = list(self.prompts)
        if isinstance(self.seeds, tuple):
            self.seeds = list(self.seeds)
        self.validate()

    def validate(self) -> "EvalSpec":
        """Raise a `ConfigError` naming the field for the first impossible value."""
        def fail(name: str, message: str):
            raise ConfigError(f"EvalSpec.{name}: {message}")

        if not isinstance(self.prompts, list) or not self.prompts:
            fail("prompts", "give at least one prompt, e.g. ['a photo of sks dog'].")
        for prompt in self.prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                fail("prompts", f"every prompt must be non-empty text, got {prompt!r}.")
        if len(set(self.prompts)) != len(self.prompts):
            fail("prompts", "lists the same prompt twice; remove the repeat.")
        if not isinstance(self.seeds, list) or not self.seeds:
            fail("seeds", "give at least one seed, e.g. [0, 1].")
        for seed in self.seeds:
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
                fail("seeds", f"every seed must be a whole number from 0 to 2**63-1, got {seed!r}.")
        if len(set(self.seeds)) != len(self.seeds):
            fail("seeds", "lists the same seed twice; remove the repeat.")
        if self.scheduler not in SAMPLERS:
            fail("scheduler", f"{self.scheduler!r} is unknown; choose one of {', '.join(SAMPLERS)} "
                 "('ddim' if images look noisy).")
        steps = self.num_inference_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 1000:
            fail("num_inference_steps", f"must be a whole number from 1 to 1000 (50 is usual), got {steps!r}.")
        scale = self.guidance_scale
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 <= scale <= 50:
            fail("guidance_scale", f"must be a number from 0 to 50 (7.5 is usual), got {scale!r}.")
        self.guidance_scale = float(scale)
        res = self.resolution
        if res is not None and (not isinstance(res, int) or isinstance(res, bool) or res <= 0 or res % 8):
            fail("resolution", f"must be a positive multiple of 8 (512 for SD 1.5) or None for the model's "
                 f"native size, got {res!r}.")
        return self

    # --- JSON and cache keys ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EvalSpec":
        if not isinstance(data, dict):
            raise ConfigError(f"EvalSpec: expected a dict of settings, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"EvalSpec: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}.")
        if "prompts" not in data:
            raise ConfigError("EvalSpec.prompts: missing; give at least one prompt.")
        return cls(**data)

    def replace(self, **changes) -> "EvalSpec":
        return EvalSpec.from_dict({**self.to_dict(), **changes})

    def key(self) -> str:
        """Stable hash of the whole spec (prompts, seeds and sampler settings): names a set of renders."""
        return _hash(self.to_dict())

    def settings_key(self, *, resolution: int | None = None) -> str:
        """Hash of what changes every pixel (scheduler, steps, guidance, resolution): the cache folder name.

        `resolution` fills in the model's native size when the spec leaves it None, so None and the
        explicit native size share one cache.
        """
        return _hash(self.settings(resolution=resolution))

    def settings(self, *, resolution: int | None = None) -> dict:
        return {"scheduler": self.scheduler, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "resolution": self.resolution or resolution}

    @classmethod
    def for_config(cls, config, *, contexts=DEFAULT_CONTEXTS, **overrides) -> "EvalSpec":
        """The study's evaluation set for a training config.

        Prompts, in this order: the instance prompt (does it look like the subject?), the class prompt
        alone when the config has one (has the class been forgotten or overwritten — "language drift"?),
        then the instance prompt followed by each context (can the subject go somewhere new, or is it
        stuck in the training photos?). A run of several subjects (`concepts`) has these for each subject in
        turn, so the grid's rows come in one block per subject. `overrides` set any other EvalSpec field
        (seeds, scheduler, ...). The model's family decides what is not given: the sampler (DDIM, or a flow's
        own Euler sampler, which a DDPM sampler's name also means for a flow model) and the guidance (also
        for `guidance_scale=0`: 7.5, SD 3.5's 7, FLUX.1-dev's 3.5).
        """
        if isinstance(contexts, str):
            contexts = [contexts]
        prompts = []
        for subject in config.concepts:
            prompts.append(subject.instance_prompt)
            if subject.class_prompt and subject.class_prompt.strip():
                prompts.append(subject.class_prompt)
            prompts += [f"{subject.instance_prompt} {context}" for context in contexts]
        prompts = list(dict.fromkeys(prompts))  # a prompt two subjects share (their class) appears once
        family = BaseModel.of(config).family
        offered = [name for _, name in family.objective.choices]
        scheduler = overrides.pop("scheduler", offered[0])
        if scheduler in SAMPLERS and scheduler not in offered:
            scheduler = offered[0]
        return cls(prompts=overrides.pop("prompts", prompts), scheduler=scheduler,
                   guidance_scale=overrides.pop("guidance_scale", 0) or family.guidance_scale, **overrides)


@dataclass
class Rendered:
    """One rendered image: which snapshot, prompt and seed made it, and where it is."""

    snapshot: Path
    step: int | None
    prompt: str
    seed: int
    image: Path


# --- Rendering -----------------------------------------------------------------------------------------
def render(snapshot, spec: EvalSpec, *, device=None, cache_dir=None) -> list[Rendered]:
    """Render every prompt × seed of `spec` with the pipeline in `snapshot`; images already on disk are reused.

    Returns one `Rendered` per image, prompts outer and seeds inner, in the spec's order. The pipeline is
    loaded (fp16 on a GPU, fp32 on CPU) only if some image is missing, and freed afterwards. Each image
    has its own generator seeded with its seed, so an image does not depend on which others are rendered
    with it: rendering the same snapshot twice gives the same pixels.
    """
    snapshot = Path(snapshot)
    if not isinstance(spec, EvalSpec):
        raise ConfigError(f"spec: expected an EvalSpec, got {type(spec).__name__}; "
                          "build one with EvalSpec(prompts=[...]) or EvalSpec.for_config(config).")
    spec.validate()
    resolution = spec.resolution or native_resolution(snapshot)  # (also: is it a snapshot?)
    folder = _prepare_cache(snapshot, cache_dir) / spec.settings_key(resolution=resolution)
    step = snapshot_step(snapshot)
    results = [Rendered(snapshot=snapshot, step=step, prompt=prompt, seed=seed,
                        image=folder / image_name(prompt, seed))
               for prompt in spec.prompts for seed in spec.seeds]
    missing = [r for r in results if not r.image.is_file()]
    if not missing:
        return results

    settings = {**spec.settings(resolution=resolution), "snapshot": str(snapshot)}
    storage.write_json(folder / "settings.json", settings)
    device = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # beside training (early stop): the blocks its last step freed go to the pipeline
        torch.cuda.empty_cache()
    pipe = snapshots.load_pipeline(snapshot, device=device)
    try:
        family = family_of({"_class_name": type(pipe).__name__}, source=str(snapshot))
        pipe.scheduler = family.objective.sampler(spec.scheduler, pipe.scheduler.config)
        from tqdm.auto import tqdm

        # (a panel shows its own bar: library bars would land in JupyterLab's log console from its thread)
        bar = tqdm(missing, desc=f"Rendering {snapshot.name}", **({"disable": True} if in_task() else {}))
        for done, item in enumerate(bar):
            report(f"rendering {snapshot.name}", done, len(missing))
            generator = torch.Generator("cpu").manual_seed(item.seed)
            image = pipe(item.prompt, generator=generator, num_inference_steps=spec.num_inference_steps,
                         guidance_scale=spec.guidance_scale, height=resolution, width=resolution).images[0]
            storage.atomic_write_bytes(item.image, png_bytes(image, text={**settings, "prompt": item.prompt,
                                                                          "seed": item.seed}))
        report(f"rendering {snapshot.name}", len(missing), len(missing))
    finally:
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def native_resolution(model) -> int:
    """The image size `model` was made for: a snapshot or pipeline folder's (`snapshots.native_resolution`), or
    for a base model given by Hub id (rendered for comparison, with a `cache_dir`) its family's from its configs."""
    base = BaseModel(str(model))
    if base.location != "hub":
        return snapshots.native_resolution(model)
    return base.family.native_size_of(base.component_configs)


def snapshot_step(snapshot) -> int | None:
    """The training step of a snapshot folder named `step-000400`; None for any other folder."""
    match = _STEP_RE.match(Path(snapshot).name)
    return int(match.group(1)) if match else None


def render_dir(snapshot, *, cache_dir=None) -> Path:
    """Where the renders of `snapshot` live: `<output_dir>/renders/<snapshot name>` (see the module docs)."""
    snapshot = Path(snapshot)
    if cache_dir is not None:
        return Path(cache_dir) / snapshot.name
    if snapshot.parent.name == "snapshots":
        return snapshot.parent.parent / "renders" / snapshot.name
    return snapshot.parent / "renders" / snapshot.name


def image_name(prompt: str, seed: int) -> str:
    return f"{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:12]}-s{seed}.png"


# --- Helpers ---------------------------------------------------------------------------------------------
def _prepare_cache(snapshot: Path, cache_dir) -> Path:
    """The snapshot's render folder, emptied first if it holds renders of an earlier, replaced snapshot."""
    root = render_dir(snapshot, cache_dir=cache_dir)
    marker = root / "snapshot.json"
    fingerprint = _fingerprint(snapshot)
    if marker.is_file():
        try:
            same = json.loads(marker.read_text()).get("fingerprint") == fingerprint
        except (OSError, ValueError):
            same = False
        if same:
            return root
    if root.is_dir():
        print(f"{snapshot} was replaced since its images were rendered; rendering them again.")
        shutil.rmtree(root, ignore_errors=True)
    storage.write_json(marker, {"snapshot": str(snapshot), "fingerprint": fingerprint})
    return root


def _fingerprint(snapshot: Path) -> str:
    """Hash of the names, sizes and modification times of the snapshot's files: a new save changes it.

    Times are taken to the millisecond, the precision that network drives (Google Drive) keep. A Hub id (a
    base model) is fingerprinted by its name.
    """
    if not snapshot.is_dir():
        return _hash(str(snapshot))
    parts = []
    for file in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        stat = file.stat()
        parts.append([file.relative_to(snapshot).as_posix(), stat.st_size, stat.st_mtime_ns // 1_000_000])
    return _hash(parts)


def _hash(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()[:12]

