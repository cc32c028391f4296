"""Compare runs side by side: every snapshot of every run, rendered with one `EvalSpec`, in one grid.

    compare(["out/run-a", "out/run-b"], spec)                      # rows: run, cols: step
    compare({"LR 5e-6": "out/a", "LR 2e-6": "out/b"}, spec, rows="lr", steps=[400, 800])

`runs` is a list of run folders (each with `snapshots/step-*`), a dict {label: run folder}, or explicit
snapshot folders (see `snapshots`; a base model folder works too), mixed as you like. A run's learning rate is read
from its `config.json` when present.

Every image of the spec lands in the grid: when the spec has several prompts or seeds and they are not
on an axis, they are added to the *rows* (rows=("run", "prompt", "seed")), so each row is one run
(or LR) seen through one prompt and seed, and the columns stay the training steps. For one grid per
prompt, call `compare` once per prompt with `spec.replace(prompts=[prompt])`; to lay prompts across,
pass cols="prompt" (and rows=("run", "step")).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import snapshots, storage
from .errors import ConfigError, DataError
from .evaluate import EvalSpec, render, snapshot_step
from .grids import draw_grid, resolve_axes


def compare(runs, spec: EvalSpec, *, rows="run", cols="step", out=None, steps=None, title=None,
            device=None) -> Path:
    """Render every snapshot of `runs` with `spec` (cached) and draw one grid; return the PNG path.

    `steps` keeps only those training steps (a step a run lacks shows as an empty cell, with a note).
    `out`: a `.png` path, or a folder for the grid; default `<first run's parent>/grids/`. The JSON
    sidecar is written beside the PNG (same name, `.json`).
    """
    if not isinstance(spec, EvalSpec):
        raise ConfigError(f"spec: expected an EvalSpec, got {type(spec).__name__}; "
                          "build one with EvalSpec(prompts=[...]) or EvalSpec.for_config(config).")
    steps = _steps(steps)
    sources = collect_snapshots(runs, steps=steps)
    cells = []
    for source in sources:
        for item in render(source["snapshot"], spec, device=device):
            cells.append({"run": source["run"], "lr": source["lr"], "step": item.step, "prompt": item.prompt,
                          "seed": item.seed, "snapshot": str(item.snapshot), "image": item.image})
    rows, cols = resolve_axes(cells, rows, cols)
    path = _grid_path(out, sources, spec=spec, rows=rows, cols=cols, steps=steps)
    return draw_grid(cells, rows=rows if len(rows) > 1 else rows[0], cols=cols if len(cols) > 1 else cols[0],
                     path=path, title=title)


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
    config = None if run_dir is None else run_dir / "config.json"
    if config is None or not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("learning_rate")
    except (OSError, ValueError):
        return None


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
