"""The study's core experiment in one call: the same subject at several learning rates, seen at several steps.

    result = sweep(config, lrs=(5e-6, 2e-6), save_at=(400, 800, 1200))
    display(Image(result.grid))

One training run per learning rate, each by `train.train` (the one training loop), into
`<output_dir>/sweep/lr<lr>/`, saving a snapshot at every step of `save_at`. Runs that already finished
are skipped on a rerun and interrupted ones resume (with resume_from_checkpoint="latest", the default).
With prior preservation the class images are generated once, before the first run, and shared by all.

Then every snapshot and the base model are rendered with the evaluation spec (cached, see `evaluate`),
measured and drawn as one grid by `compare`: the base model's column (step 0), then each learning rate's
steps side by side (rates in the order given), rows = prompts × seeds, each rate's suggested snapshot
framed. The grid, its JSON sidecar (with the metrics, the suggestions and why) and the metrics plot are
written to `<output_dir>/sweep-grid-<rates>-<steps>.png`, `.json` and `-metrics.png` (`grid_path`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dreambooth_nb.config import lr_label
from dreambooth_nb.errors import ConfigError
from dreambooth_nb.results.compare import compare
from dreambooth_nb.results.evaluate import EvalSpec
from dreambooth_nb.training import priors
from dreambooth_nb.results.early_stop import train



@dataclass
class SweepResult:
    grid: Path
    """The grid PNG: columns = the base model, then each learning rate's steps; rows = prompt × seed."""
    sidecar: Path
    """The grid's JSON sidecar: axes, labels, every cell in row-major order, and "quality" (`quality.assess`)."""
    runs: list[Path]
    """One run folder per learning rate, in the order of `lrs`."""
    lrs: list[float]
    """The learning rates, in the order of `runs`."""


def run_folder(output_dir, lr: float) -> Path:
    """`<output_dir>/sweep/lr5e-6`: where the sweep trains the run with learning rate `lr`, named as training
    runs are (`project.run_name`), so a run, its exports and its grid labels read the same wherever it was
    trained. A sweep begun by an earlier version (`lr-5e-6`) goes on in its folder."""
    earlier = Path(output_dir) / "sweep" / f"lr-{lr_label(lr)}"
    return earlier if earlier.is_dir() else Path(output_dir) / "sweep" / f"lr{lr_label(lr)}"


def grid_path(output_dir, *, lrs, save_at) -> Path:
    """`<output_dir>/sweep-grid-lr5e-6_2e-6-steps400_800.png`: each sweep (its rates and steps) keeps its own
    grid, a second sweep with other rates never overwrites the first's."""
    rates = "_".join(lr_label(lr) for lr in lrs)
    steps = "_".join(str(s) for s in save_at)
    return Path(output_dir) / f"sweep-grid-lr{rates}-steps{steps}.png"


def sweep(config, *, lrs=(5e-6, 2e-6), save_at=(400, 800, 1200), spec: EvalSpec | None = None, on_step=None,
          device=None, judge="auto") -> SweepResult:
    """Train one run per learning rate, render each snapshot with `spec`, draw the LR × steps grid.

    `config` is the base run; the sweep overrides learning_rate, max_train_steps (= max(save_at)),
    snapshot_steps (= save_at) and output_dir per run. `spec` defaults to `EvalSpec.for_config(config)`.
    `on_step(step, loss, lr)` is passed to every run's training (the live loss plot). `judge` measures the
    renders (see `compare`).
    """
    lrs = _learning_rates(lrs, config)
    save_at = _save_points(save_at)
    spec = EvalSpec.for_config(config) if spec is None else spec
    if not isinstance(spec, EvalSpec):
        raise ConfigError(f"spec: expected an EvalSpec or None, got {type(spec).__name__}.")
    # With cached latents the runs share one latent folder: the VAE encodes each photo once per sweep.
    latent_cache = config.latent_cache_dir or (str(Path(config.output_dir) / "latent-cache")
                                               if config.cache_latents else None)
    runs = [config.replace(learning_rate=lr, max_train_steps=max(save_at), snapshot_steps=save_at,
                           output_dir=str(run_folder(config.output_dir, lr)), latent_cache_dir=latent_cache)
            for lr in lrs]
    for run in runs:  # every run checked before the first one starts: a typo never costs a finished run
        run.validate()

    if config.with_prior_preservation:
        priors.generate_class_images(config, device=None if device is None else _device(device))

    for number, run in enumerate(runs, 1):
        print(f"Sweep run {number}/{len(runs)}: learning_rate={run.learning_rate:g} → {run.output_dir}")
        train(run, on_step=on_step)

    folders = [Path(run.output_dir) for run in runs]
    grid = compare({f"LR {lr_label(lr)}": folder for lr, folder in zip(lrs, folders)}, spec, steps=save_at,
                   out=grid_path(config.output_dir, lrs=lrs, save_at=save_at), device=device, judge=judge,
                   title=f"{config.subjects_label}: learning rate × steps")
    return SweepResult(grid=grid, sidecar=grid.with_suffix(".json"), runs=folders, lrs=lrs)


def _learning_rates(lrs, config) -> list[float]:
    lrs = [lrs] if isinstance(lrs, (int, float)) else list(lrs)
    if not lrs:
        raise ConfigError("lrs: give at least one learning rate, e.g. (5e-6, 2e-6).")
    for lr in lrs:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise ConfigError(f"lrs: {lr!r} is not a number; give learning rates such as (5e-6, 2e-6).")
        try:  # the config's own range for its method (full fine-tuning or LoRA)
            config.replace(learning_rate=float(lr)).validate(check_paths=False)
        except ConfigError as err:
            raise ConfigError(f"lrs: {lr!r}: {str(err).removeprefix('learning_rate: ')}") from None
    names = [f"{lr:g}" for lr in lrs]
    if len(set(names)) != len(names):
        raise ConfigError(f"lrs: {lrs} lists the same learning rate twice (at 6 significant digits); "
                          "remove the repeat.")
    return [float(lr) for lr in lrs]


def _save_points(save_at) -> list[int]:
    save_at = [save_at] if isinstance(save_at, int) else list(save_at)
    if not save_at or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in save_at):
        raise ConfigError(f"save_at: give the steps to compare as positive whole numbers, e.g. (400, 800, 1200), "
                          f"got {save_at!r}.")
    return sorted(set(save_at))


def _device(device):
    import torch

    return torch.device(device)
