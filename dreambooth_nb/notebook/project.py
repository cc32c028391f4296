"""The project folder the notebooks share: one config file and fixed places for everything else.

    PROJECT_DIR/
        config.json        written by notebook 01 (setup), read by 02-06
        instance/          your photos (unless INSTANCE_DIR points elsewhere)
        class_images/      prior-preservation images (notebook 02); class_images-2/, ... those of further
                           subjects with another class (CONCEPTS in notebook 01)
        runs/<name>/       one training run each (notebook 03): states/, snapshots/, renders/
        sweeps/            learning-rate x steps sweeps (notebook 05)
        comparisons/       comparison grids, PNG + JSON (notebook 04)
        exports/           single-file checkpoints for AUTOMATIC1111 / ComfyUI (notebook 06)

On Colab the default PROJECT_DIR is on Google Drive, so all of it survives a disconnect: rerunning a
notebook skips what is done and resumes what is not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dreambooth_nb import storage
from dreambooth_nb.config import PRESETS, Concept, TrainConfig, changed_settings, default_snapshot_steps, lr_label, preset
from dreambooth_nb.errors import ConfigError, DataError
from dreambooth_nb.model.base import BaseModel
from dreambooth_nb.model.methods import METHODS, method_for
from dreambooth_nb.notebook import platform as _platform
from dreambooth_nb.planning.fitting import fit_report



@dataclass(frozen=True)
class Project:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def instance_dir(self) -> Path:
        return self.root / "instance"

    @property
    def class_dir(self) -> Path:
        return self.root / "class_images"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def sweeps_dir(self) -> Path:
        return self.root / "sweeps"

    @property
    def comparisons_dir(self) -> Path:
        return self.root / "comparisons"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    # --- The shared config ----------------------------------------------------------------------------
    def load_config(self) -> TrainConfig:
        if not self.config_path.is_file():
            raise ConfigError(f"No project config at {self.config_path}. Run notebook 01 (setup) first with "
                              "the same PROJECT_DIR, or fix PROJECT_DIR.")
        return TrainConfig.from_json(self.config_path)

    def save_config(self, config: TrainConfig) -> Path:
        config.to_json(self.config_path)
        return self.config_path

    # --- Training runs --------------------------------------------------------------------------------
    def run_dir_for(self, config: TrainConfig) -> Path:
        """The run folder for `config`: named after its settings (`lr2e-06`, `lr1e-06-te-prior`), so the same
        settings resume the same run and new settings never collide with an old run (`-2`, `-3`, ...)."""
        base = run_name(config)
        for n in range(1, 1000):
            candidate = self.runs_dir / (base if n == 1 else f"{base}-{n}")
            if same_training(candidate, config):
                return candidate
        raise ConfigError(f"{self.runs_dir}: too many runs named {base}; delete old ones.")

    def runs(self) -> dict[str, Path]:
        """Run folders (training runs and sweep runs) that hold at least one snapshot, by name."""
        found: dict[str, Path] = {}
        for config_file in sorted(self.runs_dir.glob("*/config.json")):
            if storage.list_snapshots(config_file.parent):
                found[config_file.parent.name] = config_file.parent
        sweeps = [self.sweeps_dir] + sorted(self.root.glob(f"{self.sweeps_dir.name}-*"), key=_number_suffix)
        for sweep in sweeps:
            for config_file in sorted((sweep / "sweep").glob("*/config.json")):
                if storage.list_snapshots(config_file.parent):
                    found[f"{sweep.name}/{config_file.parent.name}"] = config_file.parent
        return found

    def select_runs(self, names: str = "", *, setting: str = "RUNS") -> dict[str, Path]:
        """The runs named in `names` ("lr2e-6, sweeps/lr5e-6"; empty: every run with a snapshot); an unknown
        name is refused naming `setting`, the notebook parameter it came from."""
        available = self.runs()
        if not available:
            raise DataError(f"No trained run with a snapshot in {self.runs_dir} or {self.sweeps_dir}. "
                            "Train first (notebook 3 or 5) with the same PROJECT_DIR.")
        wanted = [n.strip() for n in str(names or "").split(",") if n.strip()]
        if not wanted:
            return available
        unknown = [n for n in wanted if n not in available]
        if unknown:
            raise ConfigError(f"{setting}: {', '.join(unknown)} not found; the runs with snapshots are: "
                              f"{', '.join(available)}.")
        return {n: available[n] for n in wanted}

    def sweep_dir_for(self, config: TrainConfig) -> Path:
        """The sweep's base folder (`sweep()` trains into `<it>/sweep/lr*`): the same settings reuse it (finished
        runs are skipped, interrupted ones resume); other settings get `sweeps-2`, `sweeps-3`, ..."""
        for n in range(1, 1000):
            candidate = self.sweeps_dir if n == 1 else self.root / f"{self.sweeps_dir.name}-{n}"
            runs = sorted((candidate / "sweep").glob("*/config.json"))
            if all(same_training(run.parent, config, ignore=("learning_rate",)) for run in runs):
                return candidate
        raise ConfigError(f"{self.sweeps_dir}: too many sweeps; delete old ones.")


def open_project(project_dir=None, *, create: bool = True) -> Project:
    """The project at PROJECT_DIR ("" = the platform default; Drive is mounted on Colab when needed)."""
    root = _platform.resolve_project_dir(project_dir)
    _platform.mount_drive_if_needed(root)
    root = root.resolve()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    elif not root.is_dir():
        raise ConfigError(f"PROJECT_DIR: {root} does not exist. Run notebook 01 (setup) first with the same "
                          "PROJECT_DIR.")
    return Project(root)


def setup_config(project: Project, *, kind: str = "object", method: str = "full", fit_to_gpu: bool = True,
                 gpu=None, model: str, instance_dir="",
                 instance_prompt: str, class_prompt: str = "", prior_preservation: str = "preset",
                 num_class_images: int = 0, resolution: int = 0, learning_rate: float = 0.0, max_steps: int = 0,
                 concepts=(), with_report: bool = False, **overrides):
    """The project config from the setup notebook's parameters: a preset, then the user's choices.

    `kind` is "object" or "face"; `method` "full" (the study's fine-tuning) or "lora" (the "lora" preset:
    adapters, learning rate 1e-4); an SDXL `model` takes the "sdxl" preset (a LoRA at 1024 px, whatever
    `method` says: full fine-tuning of SDXL does not fit 16 GB); `prior_preservation` is "preset" (faces on,
    objects off), "on" or "off"; `num_class_images`, `resolution` (0: the model's native size), `learning_rate`
    and `max_steps` at 0 keep the preset's values. `concepts`: more subjects for the same run, rows of
    (photo folder, instance prompt[, class prompt]) after the first subject (`instance_dir`, `instance_prompt`,
    `class_prompt`); each class prompt gets its own class folder (`class_images`, `class_images-2`, ...).

    Memory: the 16 GB profile (every saver on, batch by accumulation), then with `fit_to_gpu` (the default)
    `dreambooth_nb.fit` for `gpu` (None: the GPU here, a T4 where there is none): the fastest savers whose plan
    fits, what is trained unchanged. `fit_to_gpu=False` keeps the fixed profile. The choice is saved in the
    config (`TrainConfig.fit_to_gpu`): the training panel follows it, so it is made once, here.
    `with_report=True` returns `(config, FitReport or None)`.
    """
    if kind not in ("object", "face"):
        raise ConfigError(f"PRESET: {kind!r} is unknown; choose 'object' or 'face'.")
    if method not in METHODS:
        raise ConfigError(f"METHOD: {method!r} is unknown; choose 'full' or 'lora'.")
    if prior_preservation not in ("preset", "on", "off"):
        raise ConfigError(f"PRIOR_PRESERVATION: {prior_preservation!r} is unknown; choose 'preset', 'on' or 'off'.")
    # The first subject in the preset's single-subject settings; with more rows, every subject as concepts,
    # and NUM_CLASS_IMAGES (or the preset's count) for each of them.
    photos = Path(instance_dir).resolve() if instance_dir else project.instance_dir
    first = dict(instance_data_dir=str(photos), instance_prompt=instance_prompt, class_prompt=class_prompt or None,
                 class_data_dir=str(project.class_dir))
    subjects = {"concepts": subjects_from_rows(project, concepts, first=Concept(**first))} if concepts else first
    values = dict(pretrained_model_name_or_path=str(model), output_dir=str(project.runs_dir / "run"), **subjects)
    if resolution:
        values["resolution"] = int(resolution)
    if prior_preservation != "preset":
        values["with_prior_preservation"] = prior_preservation == "on"
    if num_class_images or concepts:
        values["num_class_images"] = int(num_class_images) or PRESETS[kind].get("num_class_images",
                                                                             Concept.num_class_images)
    if learning_rate:
        values["learning_rate"] = float(learning_rate)
    if max_steps:
        values["max_train_steps"] = int(max_steps)
    values.update(overrides)
    # The family's own preset where it has one (SDXL: a LoRA at 1024 px, whatever `method` says), else the method's.
    family_preset = BaseModel(str(model)).family.preset
    extra = (family_preset,) if family_preset else ((method,) if method in PRESETS else ())
    if family_preset and PRESETS[family_preset].get("pretrained_model_name_or_path") != str(model):
        values.setdefault("variant", None)  # a preset's weight variant is its own model's; others may lack it
    names = (kind, *extra, "16gb")
    config = preset(*names, **values, fit_to_gpu=bool(fit_to_gpu))
    if "snapshot_steps" not in values:  # (saved as notebook 3's panel will start: one at halfway, one at the end)
        config = config.replace(snapshot_steps=default_snapshot_steps(config.max_train_steps,
                                                                      stop_when=config.stop_when))
    config = config.validate()
    report = None
    if config.fit_to_gpu:
        report = fit_report(config, gpu)
        config = report.config.validate()
    return (config, report) if with_report else config


def subjects_from_rows(project: Project, rows, *, first: Concept) -> list[Concept]:
    """`first`, then a subject per row of the setup notebook's CONCEPTS: (photo folder, instance prompt) or
    (photo folder, instance prompt, class prompt). A class prompt seen before shares that subject's class
    folder; a new one gets `class_images-N` in the project."""
    subjects = [first]
    folders = {first.class_prompt: first.class_data_dir}
    for number, row in enumerate(rows, start=2):
        if isinstance(row, str) or not 2 <= len(row) <= 3 or not all(isinstance(v, str) and v.strip() for v in row):
            raise ConfigError(f"CONCEPTS: row {number - 1} is {row!r}; write each subject as (photo folder, "
                              "instance prompt) or (photo folder, instance prompt, class prompt), e.g. "
                              "('/content/cat', 'a photo of sks cat', 'a photo of a cat').")
        folder, instance_prompt, class_prompt = (*row, None)[:3]
        class_dir = folders.setdefault(class_prompt, str(project.root / f"class_images-{number}"))
        subjects.append(Concept(instance_data_dir=str(Path(folder).expanduser().resolve()),
                                instance_prompt=instance_prompt.strip(), class_prompt=class_prompt,
                                class_data_dir=class_dir if class_prompt else None))
    return subjects


def default_resolution(model: str) -> int:
    """The size a run of `model` trains at unless told (notebook 1's RESOLUTION = 0): its family preset's where it
    has one (SDXL and SD 3.5: 1024; FLUX.1: 512, as Hugging Face's QLoRA recipe for consumer GPUs trains it),
    else the size its family was trained at (SD 1.5: 512), from its model_index.json."""
    family = BaseModel(str(model)).family
    return PRESETS[family.preset].get("resolution", family.native_resolution) if family.preset else \
        family.native_resolution


def run_name(config: TrainConfig) -> str:
    name = f"lr{lr_label(config.learning_rate)}"
    name += method_for(config).run_suffix
    if config.train_text_encoder:
        name += "-te"
    if config.with_prior_preservation:
        name += "-prior"
    return name


def same_training(folder: Path, config: TrainConfig, *, ignore=()) -> bool:
    """True if `folder` is free, or holds a run of `config` (same settings apart from resumable ones)."""
    saved = Path(folder) / "config.json"
    if not saved.is_file():
        return not (Path(folder) / "snapshots").exists() and not (Path(folder) / "states").exists()
    try:
        before = json.loads(saved.read_text())
    except (OSError, ValueError):
        return False
    return not changed_settings(before, config, ignore=ignore)


def _number_suffix(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0
