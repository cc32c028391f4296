"""Compare runs side by side: every snapshot of every run and the base model, rendered with one `EvalSpec`,
in one grid, measured, with a suggested snapshot per run.

    compare(["out/run-a", "out/run-b"], spec)                     # each run's steps side by side, grouped by run
    compare({"LR 5e-6": "out/a", "LR 2e-6": "out/b"}, spec, steps=[400, 800])

`runs` is a list of run folders (each with `snapshots/step-*`), a dict {label: run folder}, or explicit
snapshot folders (see `snapshots`; a base model folder works too), mixed as you like. A run's learning rate
and prompts are read from its `config.json` when present.

The grid reads at a glance: columns are each run's steps side by side, grouped by run, after a **base
model** column (step 0) so that drift shows against where training started; rows are the spec's prompts ×
seeds. It is fitted to a notebook's width (`grids.NOTEBOOK_WIDTH`). Every image of the spec lands in it
(a label that would put two images on one position joins the rows). cols="prompt" lays the prompts across
instead (rows: run × step × seed).

The renders are measured (`quality`: subject fidelity, prompt fidelity, prior preservation, diversity) and
each run's suggested snapshot is framed in the grid; everything goes into the JSON sidecar (under
"quality"), a plot of the metrics against steps beside it (`<grid>-metrics.png`), and each run's suggestion
into `<run>/suggestion.json`, which `export` takes by default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dreambooth_nb import storage
from dreambooth_nb.dataset.images import load_image, scan_images
from dreambooth_nb.errors import ConfigError, DataError
from dreambooth_nb.model import snapshots
from dreambooth_nb.model.base import BaseModel
from dreambooth_nb.results import quality
from dreambooth_nb.results.evaluate import EvalSpec, render, snapshot_step
from dreambooth_nb.results.grids import NOTEBOOK_WIDTH, draw_grid, resolve_axes



def compare(runs, spec: EvalSpec, *, rows=("prompt", "seed"), cols=("run", "step"), out=None, steps=None,
            title=None, device=None, base: bool = True, judge="auto") -> Path:
    """Render every snapshot of `runs` (and the base model) with `spec` (cached), measure them, draw one grid;
    return the PNG path.

    `steps` keeps only those training steps (a step a run lacks shows as an empty cell, with a note).
    `out`: a `.png` path, or a folder for the grid; default `<first run's parent>/grids/`. The JSON
    sidecar is written beside the PNG (same name, `.json`). `base=False` leaves the base model out (and
    with it every metric relative to it). `judge`: "auto" (`quality.judge_for` the runs' base model), a
    judge (`quality.ToyJudge()`, `quality.EmbeddingJudge.tiny()`, …), or None for no metrics.
    """
    steps = _steps(steps)
    sources, cells, base_cells, base_model = _rendered(runs, spec, steps=steps, device=device, base=base)
    rows, cols = resolve_axes(cells, rows, cols)
    judge = quality.judge_for(base_model) if judge == "auto" else judge
    report = None if judge is None else quality.assess(_measured_runs(sources, cells), _measured_base(base_cells),
                                                       judge=judge)
    path = draw_grid(base_cells + cells, rows=rows if len(rows) > 1 else rows[0],
                     cols=cols if len(cols) > 1 else cols[0], title=title, max_width=NOTEBOOK_WIDTH,
                     path=_grid_path(out, sources, spec=spec, rows=rows, cols=cols, steps=steps),
                     highlight=quality.highlights(report), cell_size=2.0)
    _add_quality(path, report, spec=spec)
    return path


def assess(runs, spec: EvalSpec, *, steps=None, device=None, judge="auto") -> dict | None:
    """What `compare` measures, without drawing: render (cached) and measure the runs' snapshots and the base
    model with `spec`, suggest a snapshot per run; the report (`quality.assess`), or None without a judge.
    Nothing is written (no grid, no suggestion files): for more seeds than a grid should show."""
    sources, cells, base_cells, base_model = _rendered(runs, spec, steps=_steps(steps), device=device, base=True)
    judge = quality.judge_for(base_model) if judge == "auto" else judge
    return None if judge is None else quality.assess(_measured_runs(sources, cells), _measured_base(base_cells),
                                                     judge=judge)


def _rendered(runs, spec: EvalSpec, *, steps, device, base: bool):
    """(sources, their cells, the base model's cells, the base model) with every image rendered (cached)."""
    if not isinstance(spec, EvalSpec):
        raise ConfigError(f"spec: expected an EvalSpec, got {type(spec).__name__}; "
                          "build one with EvalSpec(prompts=[...]) or EvalSpec.for_config(config).")
    sources = collect_snapshots(runs, steps=steps)
    cells = []
    for source in sources:
        for item in render(source["snapshot"], spec, device=device):
            cells.append({"run": source["run"], "lr": source["lr"], "step": item.step, "prompt": item.prompt,
                          "seed": item.seed, "snapshot": str(item.snapshot), "image": item.image})
    base_model = _base_model(sources)
    # Beside the runs (not beside the grid): every comparison and sweep of these runs reuses the base renders.
    base_cells = (_base_cells(base_model, spec, cache_dir=Path(sources[0]["folder"]).parent / "base-renders",
                              device=device) if base else [])
    return sources, cells, base_cells, base_model


def _add_quality(grid: Path, report: dict | None, *, spec: EvalSpec) -> None:
    """The report into the grid's sidecar, its plot beside the grid, each run's suggestion into the run."""
    side = json.loads(grid.with_suffix(".json").read_text())
    side["quality"] = report
    side["metrics_plot"] = None
    if report and any(r["steps"] for r in report["runs"]) and report["base"]:
        plot = quality.plot({"": report}, path=grid.with_name(f"{grid.stem}-metrics.png"),
                            title="metrics against steps (★ suggested)")
        side["metrics_plot"] = plot.name
    storage.write_json(grid.with_suffix(".json"), side)
    if report:
        quality.write_suggestions(report, grid=grid, spec_key=spec.key())


def _base_model(sources: list[dict]) -> str | None:
    """The base model the runs started from: the first run's `pretrained_model_name_or_path` (from its config,
    else its snapshot's `snapshot.json`); None when neither says (e.g. a bare pipeline folder)."""
    for source in sources:
        config = _run_config(source["folder"]) or {}
        model = config.get("pretrained_model_name_or_path")
        if model is None and snapshots.is_snapshot(source["snapshot"]):
            model = snapshots.info(source["snapshot"]).get("base")
        if model:
            return BaseModel(str(model)).path
    return None


def _base_cells(model: str | None, spec: EvalSpec, *, cache_dir: Path, device) -> list[dict]:
    """The base model's renders as grid cells (run "base model", step 0); none, with a note, if it cannot render."""
    if model is None:
        return []
    try:
        items = render(model, spec, device=device, cache_dir=cache_dir)
    except (OSError, DataError) as err:
        print(f"Note: the base model {model} could not be rendered ({str(err).splitlines()[0][:160]}); the grid "
              "has no base-model column and the metrics nothing to compare with.")
        return []
    return [{"run": quality.BASE_RUN, "lr": None, "step": 0, "prompt": item.prompt, "seed": item.seed,
             "snapshot": str(model), "image": item.image} for item in items]


def _measured_runs(sources: list[dict], cells: list[dict]) -> list[dict]:
    """What `quality.assess` measures: per run its roles, photos and renders by step and prompt."""
    runs = {}
    for source in sources:
        if source["run"] not in runs:
            config = _run_config(source["folder"]) or {}
            runs[source["run"]] = {"run": source["run"], "lr": source["lr"],
                                   "folder": source["folder"] if config else None, "config": config, "steps": {}}
    prompts = list(dict.fromkeys(c["prompt"] for c in cells))
    for cell in (c for c in cells if c["step"] is not None):  # a bare pipeline folder has no step to judge
        images = runs[cell["run"]]["steps"].setdefault(cell["step"], {})
        images.setdefault(cell["prompt"], []).append(load_rgb(cell["image"]))
    for run in runs.values():
        config = run.pop("config")
        run["subjects"] = [(quality.Roles.of(prompts, instance_prompt=subject.get("instance_prompt"),
                                             class_prompt=subject.get("class_prompt")),
                            subject_photos(subject, resolution=config.get("resolution")))
                           for subject in config.get("concepts", [])]
    return list(runs.values())


def _measured_base(base_cells: list[dict]) -> dict | None:
    if not base_cells:
        return None
    images: dict = {}
    for cell in base_cells:
        images.setdefault(cell["prompt"], []).append(load_rgb(cell["image"]))
    return {"images": images}


def subject_photos(subject: dict, *, resolution) -> list:
    """A subject's instance photos (one of a run config's `concepts`), loaded as training loads them; none
    (with a note) if the folder is gone."""
    folder = subject.get("instance_data_dir")
    if not folder:
        return []
    resolution = int(resolution or 512)
    try:
        report = scan_images(folder, resolution=resolution, min_images=0)
    except DataError as err:
        print(f"Note: no subject fidelity: {err}")
        return []
    return [load_image(p, max_side=resolution) for p in report.usable]


def load_rgb(path):
    """An image file as an RGB PIL image, its file closed."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _run_config(run_dir) -> dict | None:
    config = None if run_dir is None else Path(run_dir) / "config.json"
    if config is None or not config.is_file():
        return None
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError):
        return None


def collect_snapshots(runs, *, steps=None) -> list[dict]:
    """[{run, lr, step, snapshot, folder}] for every snapshot to compare, runs in the given order, steps ascending."""
    if isinstance(runs, (str, Path)):
        runs = [runs]
    if isinstance(runs, dict):
        named = [(str(label), Path(folder)) for label, folder in runs.items()]
    else:
        folders = [Path(f) for f in runs]
        named = list(zip(_unique_names(folders), folders))
    if not named:
        raise ConfigError("runs: give at least one run folder or snapshot folder.")
    wanted = _steps(steps)
    found = []
    for label, folder in named:
        if snapshots.is_snapshot(folder):  # one explicit snapshot
            run_dir = folder.parent.parent if folder.parent.name == "snapshots" else None
            snaps = [(snapshot_step(folder), folder)]
            if wanted is not None:
                snaps = [(s, p) for s, p in snaps if s in wanted]
        elif folder.is_dir():
            run_dir = folder
            snaps = storage.list_snapshots(folder)
            if not snaps:
                raise DataError(f"{folder}: no snapshots in {folder / 'snapshots'}; train this run first "
                                "(or pass snapshot folders directly).")
            if wanted is not None:
                have = {s for s, _ in snaps}
                lacking = [s for s in wanted if s not in have]
                if lacking:
                    print(f"Note: {label} has no snapshot at step(s) {lacking} (it has {sorted(have)}); "
                          "those cells stay empty.")
                snaps = [(s, p) for s, p in snaps if s in wanted]
        else:
            raise DataError(f"{folder}: no such run folder or snapshot; check the path.")
        lr = _learning_rate(run_dir)
        found += [{"run": label, "lr": lr, "step": step, "snapshot": path, "folder": run_dir or folder}
                  for step, path in snaps]
    if not found:
        raise DataError(f"none of the runs has a snapshot at step(s) {wanted}; drop `steps` to see what there is.")
    return found


def _steps(steps) -> list[int] | None:
    if steps is None:
        return None
    steps = [steps] if isinstance(steps, int) else list(steps)
    if not steps or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in steps):
        raise ConfigError(f"steps: give training steps as positive whole numbers, e.g. [400, 800], got {steps!r}.")
    return sorted(set(steps))


def _learning_rate(run_dir: Path | None):
    return (_run_config(run_dir) or {}).get("learning_rate")


def _unique_names(folders: list[Path]) -> list[str]:
    """Short run labels: the run folder's name (for a snapshot, its run's), longer only where two clash."""
    def run_folder(f: Path) -> Path:
        if snapshots.is_snapshot(f) and f.parent.name == "snapshots":
            return f.parent.parent
        return f

    bases = [run_folder(f.resolve()) for f in folders]
    distinct = list(dict.fromkeys(bases))
    for depth in range(1, max(len(b.parts) for b in distinct) + 1):
        names = {b: "/".join(b.parts[-depth:]) for b in distinct}
        if len(set(names.values())) == len(distinct):
            break
    return [names[b] for b in bases]


def _grid_path(out, sources, *, spec: EvalSpec, rows, cols, steps) -> Path:
    what = {"snapshots": [str(s["snapshot"]) for s in sources], "runs": [s["run"] for s in sources],
            "spec": spec.key(), "rows": list(rows), "cols": list(cols), "steps": steps}
    name = f"compare-{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]}.png"
    if out is None:
        return Path(sources[0]["folder"]).parent / "grids" / name
    out = Path(out)
    return out if out.suffix.lower() == ".png" else out / name
