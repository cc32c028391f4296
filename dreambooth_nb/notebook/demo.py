"""Run the whole notebook suite headless on the toy model, on CPU, in a few minutes.

    python -m dreambooth_nb.notebook.demo --out demo-output

Writes the toy world's Dreambooth subject (a purple-and-orange striped circle) into a fresh project
folder, then executes notebooks 01 → 06 in order with nbclient, exactly as a user would run them, sharing
that project folder: setup, class images, training (without a click: headless runs train directly),
comparison grid, learning-rate sweep, single-file export. The executed notebooks (with their outputs and
widget state) and the grids are saved into --out.

`run_notebook` is also what the tests use: papermill-style parameters (a cell inserted after the one
tagged `parameters`), widget state stored in the executed notebook.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from dreambooth_nb.toy import world
from dreambooth_nb.toy.tiny import build_tiny_pipeline
from dreambooth_nb.toy.world import TOY_MODEL_DIR

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"  # (the checkout: dreambooth_nb/notebook/demo.py)
ORDER = ("01_setup", "02_class_images", "03_training", "04_comparison", "05_sweep", "06_export")


def inject_parameters(nb, parameters: dict):
    """Insert a cell setting `parameters` right after the cell tagged `parameters` (as papermill does)."""
    import nbformat

    if not parameters:
        return nb
    index = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if index is None:
        raise ValueError("the notebook has no cell tagged 'parameters'")
    known = set()
    for line in nb.cells[index].source.splitlines():
        name = line.split("=")[0].strip()
        if "=" in line and name.isidentifier():
            known.add(name)
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise ValueError(f"not parameters of this notebook: {', '.join(unknown)} (it has {', '.join(sorted(known))})")
    source = "# Parameters injected by dreambooth_nb.notebook.demo.run_notebook\n" + "\n".join(
        f"{name} = {value!r}" for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    cell.id = "injected-parameters"
    nb.cells.insert(index + 1, cell)
    return nb


def run_notebook(path, parameters: dict | None = None, *, workdir=None, out=None, timeout: int = 900, env=None,
                 extra_cells=()):
    """Execute the notebook at `path` top to bottom with `parameters`, headless; return the executed notebook.

    `extra_cells` are code cells appended at the end (tests use them to press a panel's button).
    The executed copy (outputs and widget state included) is written to `out` when given, also when a
    cell fails (then `nbclient.exceptions.CellExecutionError` is raised after writing). A cell running
    longer than `timeout` seconds raises `CellTimeout` with what the kernel had shown by then (the cell's
    last outputs and the panels' status lines), instead of waiting silently.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError

    nb = inject_parameters(nbformat.read(str(path), as_version=4), parameters or {})
    nb.cells.extend(nbformat.v4.new_code_cell(source) for source in extra_cells)
    workdir = Path(workdir or Path(path).parent)
    kernel_env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
                  "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute(env=kernel_env)
    except CellTimeoutError as err:
        raise CellTimeout(f"{Path(path).name}: a cell ran longer than {timeout} s.\n{err}\n"
                          f"{_kernel_state(nb, client)}") from None
    finally:
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, str(out))
    return nb


class CellTimeout(RuntimeError):
    """A notebook cell did not finish within `run_notebook`'s timeout."""


def _kernel_state(nb, client) -> str:
    """What the kernel had shown when a cell timed out: the last outputs and every HTML status line."""
    running = next((c for c in reversed(nb.cells) if c.cell_type == "code" and c.get("outputs")), None)
    lines = []
    if running is not None:
        for output in running.outputs[-5:]:
            text = output.get("text") or output.get("data", {}).get("text/plain", "")
            lines.append(f"  output: {str(text).strip()[-300:]}")
    for state in getattr(client, "widget_state", {}).values():
        if state.get("_model_name") == "HTMLModel" and state.get("value"):
            lines.append(f"  status widget: {state['value'][:300]}")
        if state.get("_model_name") == "ButtonModel":
            lines.append(f"  button {state.get('description')!r}: {'disabled' if state.get('disabled') else 'enabled'}")
    return "The kernel's state at the timeout:\n" + ("\n".join(lines) or "  (no output yet)")


def toy_model_or_tiny(out: Path) -> tuple[Path, bool]:
    """The trained toy model if it is in the package, else a random tiny pipeline built into `out`."""
    try:
        if (Path(TOY_MODEL_DIR) / "model_index.json").is_file():
            return Path(TOY_MODEL_DIR), True
    except ImportError:
        pass

    return build_tiny_pipeline(out / "tiny-model"), False


def write_subject(folder: Path, n: int = 5) -> tuple[str, str, str]:
    """The toy subject's photos into `folder`; returns (instance prompt, class prompt, a new context)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for i, image in enumerate(world.subject_images(n=n)):
            image.save(folder / f"subject-{i}.png")
        context = world.SUBJECT_CONTEXT_PROMPT[len(world.SUBJECT_INSTANCE_PROMPT):].strip()
        return world.SUBJECT_INSTANCE_PROMPT, world.SUBJECT_CLASS_PROMPT, context or "in the snow"
    except (ImportError, AttributeError):  # toy world not available: coloured noise as "photos"
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(folder / f"subject-{i}.png")
        return "a photo of sks dog", "a photo of a dog", "in the snow"


def demo_parameters(project: Path, model: Path, *, instance_prompt: str, class_prompt: str, context: str,
                    trained_model: bool) -> dict[str, dict]:
    """Small settings per notebook so the whole suite runs on 2 CPU cores in a few minutes."""
    # Measured by bench/reproduce_study.py on the toy model: LR 1e-4 learns the subject within 400 steps
    # (without prior preservation, as the study advises for objects); 1e-3 is the sweep's "high" rate.
    lr, steps = (1e-4, 400) if trained_model else (1e-4, 8)
    return {
        "01_setup": dict(PROJECT_DIR=str(project), MODEL_ID=str(model), UPLOAD_PHOTOS=False, PRESET="object",
                         FIT_TO_GPU=True, INSTANCE_PROMPT=instance_prompt, CLASS_PROMPT=class_prompt,
                         PRIOR_PRESERVATION="off" if trained_model else "on", NUM_CLASS_IMAGES=8, RESOLUTION=32, LEARNING_RATE=lr,
                         MAX_STEPS=steps),
        "02_class_images": dict(PROJECT_DIR=str(project)),
        "03_training": dict(PROJECT_DIR=str(project), SNAPSHOT_STEPS=f"{steps // 3}, {2 * steps // 3}",
                            SAMPLE_INFERENCE_STEPS=25),
        "04_comparison": dict(PROJECT_DIR=str(project), INFERENCE_STEPS=25, GUIDANCE=4.0, CONTEXTS=context,
                              SEEDS="0, 1"),
        "05_sweep": dict(PROJECT_DIR=str(project), LEARNING_RATES=f"{lr * 10:g}, {lr:g}",
                         SAVE_AT=f"{steps // 3}, {2 * steps // 3}", INFERENCE_STEPS=25, GUIDANCE=4.0, CONTEXTS=context),
        "06_export": dict(PROJECT_DIR=str(project)),
    }


def collect_grids(project: Path, grids: Path) -> Path:
    """Copy the comparison and sweep grids of `project` into `grids`, each with its JSON sidecar and its metrics
    plot (`<grid>-metrics.png`) where `compare` drew one, as comparison.png, sweep.png, …"""
    grids.mkdir(parents=True, exist_ok=True)
    def grids_only(paths):  # (a grid has a JSON sidecar; a metrics plot has none)
        return [p for p in paths if p.with_suffix(".json").is_file()]

    # Each sweep keeps its own grid (`sweep.grid_path`): the latest one of each sweep folder is the demo's.
    sweeps = {}
    for png in sorted(grids_only((project / "sweeps").rglob("sweep-grid*.png")), key=lambda p: p.stat().st_mtime):
        sweeps[png.parent] = png
    found = [*grids_only((project / "comparisons").glob("*.png")), *sweeps.values()]
    for png in sorted(found):
        name = ("comparison" if png.parent.name == "comparisons" else "sweep" if png.parent.name == "sweeps"
                else f"sweep-{png.parent.name}")
        shutil.copyfile(png, grids / f"{name}.png")
        shutil.copyfile(png.with_suffix(".json"), grids / f"{name}.json")
        plot = png.with_name(f"{png.stem}-metrics.png")
        if plot.is_file():
            shutil.copyfile(plot, grids / f"{name}-metrics.png")
    return grids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run notebooks 01-06 headless on the toy model (CPU).")
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="folder for all results")
    parser.add_argument("--notebooks", type=Path, default=NOTEBOOK_DIR, help="folder with 01_setup.ipynb ...")
    parser.add_argument("--keep", action="store_true", help="keep an existing project folder (resume)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a local 32 px toy-world pipeline folder to use instead of the embedded toy model")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    project = out / "project"
    if project.exists() and not args.keep:
        shutil.rmtree(project)
    out.mkdir(parents=True, exist_ok=True)
    missing = [name for name in ORDER if not (args.notebooks / f"{name}.ipynb").is_file()]
    if missing:
        print(f"Notebooks not found in {args.notebooks}: {', '.join(missing)}. Run from a checkout of the "
              "repository, or pass --notebooks.", file=sys.stderr)
        return 1

    start = time.monotonic()
    model, trained = (args.model.resolve(), True) if args.model else toy_model_or_tiny(out)
    if not trained:
        print("The trained toy model is not in the package; using a random tiny model (images will be noise).")
    instance_prompt, class_prompt, context = write_subject(project / "instance")
    parameters = demo_parameters(project, model, instance_prompt=instance_prompt, class_prompt=class_prompt,
                                 context=context, trained_model=trained)
    executed = out / "executed"
    for name in ORDER:
        t0 = time.monotonic()
        print(f"Running {name} ...", flush=True)
        try:
            run_notebook(args.notebooks / f"{name}.ipynb", parameters[name], workdir=out,
                         out=executed / f"{name}.ipynb")
        except Exception as err:
            print(f"{name} failed; the executed notebook is in {executed / (name + '.ipynb')}:\n{err}",
                  file=sys.stderr)
            return 1
        print(f"  done in {time.monotonic() - t0:.0f} s", flush=True)

    grids = collect_grids(project, out / "grids")
    print(f"\nDemo finished in {time.monotonic() - start:.0f} s.")
    print(f"  executed notebooks: {executed}")
    print(f"  grids:              {grids}")
    print(f"  project folder:     {project}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
