"""What the notebooks show: the training panel, the live loss plot, image grids, short error messages.

The rule: widgets only *collect values*. A plain function (`config_from_widgets`) turns those values into
a `TrainConfig`, and the Train button and a headless run call the very same code path
(`TrainingPanel.train`), so what a test executes is what a user's click executes.

Only ipywidgets API common to 7.7 (Colab) and 8 is used.
"""

from __future__ import annotations

import contextvars
import html
import io
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from dreambooth_nb.units import gib
from dreambooth_nb.config import MIXED_PRECISION, PRESETS, TrainConfig, default_snapshot_steps
from dreambooth_nb.environment import COLAB, detect_platform, is_headless
from dreambooth_nb.model.methods import METHODS, method_for
from dreambooth_nb.errors import ActionStopped, ConfigError, DreamboothError, TrainingStopped
from dreambooth_nb.planning.fitting import fit_report, previous_run
from dreambooth_nb.planning.memory import out_of_memory_record
from dreambooth_nb.planning.planner import plan
from dreambooth_nb.progress import Task, running, stop_tasks_on_interrupt
from dreambooth_nb.results import quality
from dreambooth_nb.results.compare import compare
from dreambooth_nb.results.evaluate import EvalSpec, render, render_dir
from dreambooth_nb.results.grids import draw_grid
from dreambooth_nb.results.sweep import run_folder, sweep
from dreambooth_nb.storage import latest_state, list_snapshots
from dreambooth_nb.training.distributed import for_processes, visible_gpus
from dreambooth_nb.training.train import train


# --- Errors: the message, not a stack trace ----------------------------------------------------------


def _short_error(shell, etype, value, tb, tb_offset=None):
    """IPython custom exception handler: show `DreamboothError`s as one red message, no traceback."""
    stb = [f"\x1b[31m{etype.__name__}: {value}\x1b[0m"]
    # _showtraceback publishes an `error` output (kernel) or prints (terminal); the cell still fails, so
    # "Run all" stops here and headless runs (nbclient, papermill, tests) raise CellExecutionError.
    shell._showtraceback(etype, value, stb)
    return stb


def show_errors_as_messages(shell=None) -> bool:
    """Make every `DreamboothError` in this notebook show as its message only. Returns False outside IPython.

    Other exceptions (bugs) keep their full traceback. The cell is still marked as failed.
    """
    if shell is None:
        try:
            from IPython import get_ipython

            shell = get_ipython()
        except ImportError:
            return False
    if shell is None:
        return False
    shell.set_custom_exc((DreamboothError,), _short_error)
    return True


# --- Parsing text fields --------------------------------------------------------------------------------
def parse_int_list(text, *, name: str = "steps", allow_zero: bool = False) -> list[int]:
    """"400, 800 1200" -> [400, 800, 1200] (sorted, no repeats); a list passes through."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [t for t in str(text or "").replace(",", " ").split() if t]
    values = []
    for item in items:
        try:
            value = int(item) if not isinstance(item, float) or item.is_integer() else None
        except (TypeError, ValueError):
            value = None
        if value is None or value < 0 or (value == 0 and not allow_zero):
            kind = "whole number (0 or more)" if allow_zero else "positive whole number"
            raise ConfigError(f"{name}: {item!r} is not a {kind}; write e.g. '400, 800'.")
        values.append(value)
    return sorted(set(values))


def parse_float_list(text, *, name: str = "learning rates") -> list[float]:
    """"5e-6, 2e-6" -> [5e-06, 2e-06] (order kept, no repeats)."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [t for t in str(text or "").replace(",", " ").split() if t]
    values: list[float] = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            value = math.nan
        if not value > 0 or math.isinf(value):
            raise ConfigError(f"{name}: {item!r} is not a positive number; write e.g. '5e-6, 2e-6'.")
        if value not in values:
            values.append(value)
    if not values:
        raise ConfigError(f"{name}: the list is empty; write e.g. '5e-6, 2e-6'.")
    return values


def adjust_snapshot_steps(text: str, *, old_steps: int, new_steps: int) -> tuple[str, str]:
    """The snapshot-steps field after Steps changed from `old_steps` to `new_steps`, and a note for the user.

    The default (halfway) follows the new step count; chosen steps at or past the new end are dropped, and
    the note says which (the last step is always saved anyway). Text that does not parse is left alone:
    Train reports it.
    """
    try:
        steps = parse_int_list(text, name="snapshot steps")
    except ConfigError:
        return text, ""
    if steps == default_snapshot_steps(old_steps):
        steps = default_snapshot_steps(new_steps)
    kept = [s for s in steps if s < new_steps]
    dropped = [s for s in steps if s >= new_steps]
    note = (f"Snapshot step(s) {', '.join(map(str, dropped))} dropped: past the new {new_steps} steps "
            "(the last step is always saved)." if dropped else "")
    return ", ".join(map(str, kept)), note


# --- Config <-> widget values (pure) ----------------------------------------------------------------------
PANEL_FIELDS = ("method", "learning_rate", "max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                "num_processes", "with_prior_preservation", "prior_loss_weight", "train_text_encoder",
                "use_8bit_adam", "gradient_checkpointing", "mixed_precision", "snapshot_steps")


def widget_values(config: TrainConfig) -> dict:
    """The panel's initial values for `config` (snapshot steps as editable text)."""
    values = {name: getattr(config, name) for name in PANEL_FIELDS}
    values["snapshot_steps"] = ", ".join(str(s) for s in config.snapshot_steps)
    return values


def config_from_widgets(values: dict, base: TrainConfig) -> TrainConfig:
    """`base` with the panel's values applied; the function both the Train button and headless runs use.

    `values` holds TrainConfig field names (see `PANEL_FIELDS`); `snapshot_steps` may be text
    ("200, 400"). Snapshot steps past the last step are dropped (the last step is always saved).
    Raises `ConfigError` for an unknown name or an impossible value, before anything is loaded.
    """
    unknown = sorted(set(values) - set(PANEL_FIELDS))
    if unknown:
        raise ConfigError(f"Unknown panel setting(s): {', '.join(unknown)}.")
    changes = dict(values)
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "num_processes"):
        if name in changes:
            changes[name] = int(changes[name])
    for name in ("learning_rate", "prior_loss_weight"):
        if name in changes:
            changes[name] = float(changes[name])
    if "learning_rate" in changes:  # a log slider gives 1.9953e-06 for "2.0e-06": keep what the readout shows
        changes["learning_rate"] = float(f"{changes['learning_rate']:.2g}")
    for name in ("with_prior_preservation", "train_text_encoder", "use_8bit_adam", "gradient_checkpointing"):
        if name in changes:
            changes[name] = bool(changes[name])

    steps = changes.get("max_train_steps", base.max_train_steps)
    if "snapshot_steps" in changes:
        changes["snapshot_steps"] = [s for s in parse_int_list(changes["snapshot_steps"], name="snapshot steps")
                                     if s < steps]
    else:
        changes["snapshot_steps"] = [s for s in base.snapshot_steps if s < steps]
    config = base.replace(**changes)
    return config.validate(check_paths=False)


def _keep(value) -> bool:
    """A notebook parameter that means "keep setup's value": None, empty text, or a number 0 (no number
    parameter can be 0). False is a value: `TRAIN_TEXT_ENCODER=False` turns it off."""
    if value is None or isinstance(value, bool):
        return value is None
    return value == "" or (isinstance(value, (int, float)) and value == 0)


def apply_parameters(config: TrainConfig, **values) -> TrainConfig:
    """`config` with notebook parameters applied; 0 (numbers), "" and None mean "keep the value from setup".

    Keys are TrainConfig field names; `snapshot_steps` may be text. With a new step count and no explicit
    snapshot steps, snapshots default to halfway (`default_snapshot_steps`).
    """
    changes = {k: v for k, v in values.items() if not _keep(v)}
    if "snapshot_steps" in changes:
        changes["snapshot_steps"] = parse_int_list(changes["snapshot_steps"], name="SNAPSHOT_STEPS")
    steps = int(changes.get("max_train_steps", config.max_train_steps))
    if "snapshot_steps" not in changes and (not config.snapshot_steps or "max_train_steps" in changes):
        changes["snapshot_steps"] = default_snapshot_steps(steps)
    changes["snapshot_steps"] = [s for s in changes["snapshot_steps"] if s < steps]
    return config.replace(**changes)


def config_summary(config: TrainConfig) -> str:
    """The settings a user chose or should check, one per line."""
    batch = config.train_batch_size * config.gradient_accumulation_steps
    subjects = config.subjects()
    if len(subjects) == 1:
        who = [f"Photos:             {config.instance_data_dir}", f"Instance prompt:    {config.instance_prompt}"]
        prior = f"{config.num_class_images} class images of '{config.class_prompt}', "
    else:  # several subjects: one line each, in the order they take turns in every batch
        who = [f"Subjects:           {len(subjects)}, taking turns in every batch"]
        who += [f"  {i}. '{s.instance_prompt}' from {s.instance_data_dir}"
                + (f"; {s.num_class_images} class images of '{s.class_prompt}'" if config.with_prior_preservation
                   else "") for i, s in enumerate(subjects, 1)]
        prior = "class images per subject (above), "
    prior = f"on: {prior}weight {config.prior_loss_weight:g}" if config.with_prior_preservation else "off"
    memory = ", ".join(name for name, on in (("8-bit Adam", config.use_8bit_adam),
                                             ("gradient checkpointing", config.gradient_checkpointing),
                                             ("cached latents", config.cache_latents)) if on) or "none"
    return "\n".join([
        f"Model:              {config.pretrained_model_name_or_path}",
        *who,
        f"Prior preservation: {prior}",
        f"Method:             {method_for(config).label}",
        f"Learning rate:      {config.learning_rate:.1e}",
        f"Steps:              {config.max_train_steps} (snapshots at {config.snapshot_steps or 'the end only'})",
        f"Batch:              {config.train_batch_size} x {config.gradient_accumulation_steps} accumulated = {batch}",
        f"Text encoder:       {'trained' if config.train_text_encoder else 'frozen'}",
        f"Resolution:         {config.resolution}",
        f"Mixed precision:    {config.mixed_precision}; memory savers: {memory}",
    ])


# --- Pictures ---------------------------------------------------------------------------------------------
def figure_png(fig) -> bytes:
    """PNG bytes of a matplotlib Figure, without pyplot (no global state, works in any backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def _moving_average(values: list[float], window: int) -> list[float]:
    smooth, acc = [], 0.0
    for i, value in enumerate(values):
        acc += value
        if i >= window:
            acc -= values[i - window]
        smooth.append(acc / min(i + 1, window))
    return smooth


def loss_plot_png(steps, losses, *, total: int | None = None, title: str = "", validation=(), others=()) -> bytes:
    """The training loss per step (light) and its moving average (dark) as a PNG, with the validation loss
    at each snapshot (`validation.py`: on the photos, and on the class) as marked lines. `others`: finished
    runs to draw beside it, (label, steps, losses) each, as their moving average (a sweep's earlier rates)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 2.8))
    ax = fig.add_subplot(1, 1, 1)
    for number, (label, other_steps, other_losses) in enumerate(others):
        if other_steps:
            window = max(1, len(other_losses) // 20)
            ax.plot(other_steps, _moving_average(other_losses, window), color=f"C{(number + 2) % 10}",
                    linewidth=1.4, label=label)
    if steps:
        # Points are marked while there are few, so a first step shows; the moving average appears once it
        # averages something (it spans a 20th of the points, at least 2).
        ax.plot(steps, losses, color="#9ecae1", linewidth=0.8, label="loss per step",
                marker="o" if len(steps) <= 30 else None, markersize=3)
        window = len(losses) // 20
        if window >= 2:
            ax.plot(steps, _moving_average(losses, window), color="#08519c", linewidth=1.6,
                    label=f"average of {window} steps")
        for half, colour, label in (("fit", "#e6550d", "validation: your photos"),
                                    ("prior", "#31a354", "validation: the class")):
            points = [(v["step"], v[half]) for v in validation if half in v]
            if points:
                ax.plot(*zip(*points), color=colour, marker="D", markersize=4, linewidth=1.2, label=label)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlim(0, max(total or 0, steps[-1] if steps else 1))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return figure_png(fig)


def show_png(data: bytes) -> None:
    from IPython.display import Image

    _show(Image(data=data))


def show_image(image, *, width: int | None = None) -> None:
    """Display a PIL image or an image file inline (or into the panel output that `_into` selected)."""
    from IPython.display import Image

    if isinstance(image, (str, Path)):
        _show(Image(filename=str(image), width=width))
        return
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    _show(Image(data=buffer.getvalue(), width=width))


# --- Writing into a panel's Output widget ---------------------------------------------------------------
# Panels write into their Output widgets *by value* (the widget's `outputs` list), never by capture
# (`with output:`). Capture makes a headless executor answer every captured output on the kernel's shell
# socket while it waits on that same socket for the cell's reply; nbclient then sometimes never sees the
# reply and waits on an idle kernel until another message arrives (nbclient #312: it hung the button test
# for 13 minutes). By value, the kernel only publishes widget state, as for any other widget, and every
# frontend (JupyterLab, Colab, VS Code) renders it the same way.
_TARGET: contextvars.ContextVar = contextvars.ContextVar("dreambooth_nb_output", default=None)


class _Routed(io.TextIOBase):
    """sys.stdout or sys.stderr while a panel writes into its Output widget: what the panel's own work writes
    (its context holds the widget: `_TARGET`) goes into the widget; everything else goes where it went before.
    A panel's action runs in a thread for minutes or hours: a cell run meanwhile must print into its own output,
    not into the panel's log."""

    def __init__(self, previous, name: str):
        self.previous, self.name = previous, name

    def write(self, text: str) -> int:
        target = _TARGET.get()
        if target is None:
            return self.previous.write(text)
        if text:
            (target.append_stdout if self.name == "stdout" else target.append_stderr)(text)
        return len(text)

    def flush(self) -> None:
        if _TARGET.get() is None:
            self.previous.flush()

    def isatty(self) -> bool:
        return False


@contextmanager
def _into(output):
    """Inside the block (in this thread), prints and `show_*` images go into `output` (an Output widget), or,
    with None, into the running cell as usual."""
    if output is None:
        yield
        return
    token = _TARGET.set(output)
    routed = {name: _Routed(getattr(sys, name), name) for name in ("stdout", "stderr")}
    for name, stream in routed.items():
        setattr(sys, name, stream)
    try:
        yield
    finally:
        # Put back what was there, unless another panel's action put its own on top meanwhile (it forwards to
        # this one, which forwards to what was there before: nothing is lost either way).
        for name, stream in routed.items():
            if getattr(sys, name) is stream:
                setattr(sys, name, stream.previous)
        _TARGET.reset(token)


def _display_data(obj) -> dict:
    from IPython.core.formatters import format_display_data

    data, metadata = format_display_data(obj)
    return {"output_type": "display_data", "data": data, "metadata": metadata}


def _show(obj) -> None:
    target = _TARGET.get()
    if target is None:
        from IPython.display import display

        display(obj)
    else:
        target.outputs = (*target.outputs, _display_data(obj))


def _replace_outputs(output, *objs) -> None:
    """Set what `output` shows in one update (no flicker, no capture)."""
    output.outputs = tuple(_display_data(obj) for obj in objs)


def show_rendered(rendered, *, path, title: str | None = None) -> Path | None:
    """Rendered images (evaluate.render) as one labelled grid, a row per prompt and a column per seed,
    saved at `path` and shown."""
    rendered = list(rendered)
    if not rendered:
        return None
    grid = draw_grid(rendered, rows="prompt", cols="seed", path=path, title=title, cell_size=2.0)
    show_image(grid)
    return grid


# --- Live progress -----------------------------------------------------------------------------------------
class LiveLoss:
    """`on_step(step, loss, lr)` for `train`: moves a progress bar every step and redraws the loss plot into
    an Output widget every `plot_every` steps (or `plot_seconds`), and at the last step."""

    def __init__(self, *, total: int, progress=None, status=None, plot=None, plot_every: int = 25,
                 plot_seconds: float = 20.0, history: dict | None = None, title: str = ""):
        self.total = total
        self.progress, self.status, self.plot = progress, status, plot
        self.plot_every, self.plot_seconds = plot_every, plot_seconds
        self.steps = list((history or {}).get("steps", []))
        self.losses = list((history or {}).get("losses", []))
        self.validation = list((history or {}).get("validation", []))
        self.title = title
        self._t0: float | None = None  # when the first step of this session ended (loading is not a step)
        self._first_step = 0
        self._last_plot = 0.0

    ESTIMATE_AFTER = 3
    """Steps timed before the time left is shown: the first ones hold one-off work (kernels compiled, memory
    allocated) and made the first estimate read "139.3 min left" for a 20-minute run."""

    def __call__(self, step: int, loss: float, lr: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        now = time.monotonic()
        if self._t0 is None:
            self._t0, self._first_step = now, step
        if self.progress is not None:
            self.progress.max, self.progress.value = self.total, step
        if self.status is not None:
            done = step - self._first_step
            if done >= self.ESTIMATE_AFTER:
                per_step = (now - self._t0) / done
                speed = f"{per_step:.2f} s/step · {per_step * (self.total - step) / 60:.1f} min left"
            else:
                speed = "estimating the time left…"
            self.status.value = f"step {step}/{self.total} · loss {loss:.4f} · lr {lr:.1e} · {speed}"
        if step == self.total or step % self.plot_every == 0 or now - self._last_plot > self.plot_seconds:
            self.redraw()
            self._last_plot = now

    def png(self) -> bytes:
        return loss_plot_png(self.steps, self.losses, total=self.total, title=self.title, validation=self.validation)

    def redraw(self) -> None:
        if self.plot is None or not self.steps:
            return
        from IPython.display import Image

        _replace_outputs(self.plot, Image(data=self.png()))

    def validation_point(self, step: int, losses: dict) -> None:
        """`on_validation` for `train`: the validation losses of a snapshot, drawn at once."""
        self.validation.append({"step": step, **losses})
        self.redraw()


# --- What a saved notebook shows without its kernel --------------------------------------------------------------
class Fallback:
    """A panel's static copy: what a saved notebook shows where the panel was once its kernel is gone, instead
    of only "Error displaying widget: model not found" — the last status line and images (loss plot, samples,
    grid), and how to get the controls back.

    It is an ordinary HTML output under the panel, updated at the end of every action. While the panel is live,
    a style inside the panel (`hider`) hides it, so nothing shows twice; without the kernel the panel and its
    style are gone and the copy shows. Colab draws each output in a frame of its own, where the style cannot
    reach: there the copy is left out.
    """

    CSS_CLASS = "dreambooth-nb-fallback"

    def __init__(self, what: str):
        self.what = what
        self.handle = None
        self.status, self.images = "", []

    def hider(self):
        import ipywidgets as widgets

        return widgets.HTML(value=f"<style>.{self.CSS_CLASS} {{display: none !important;}}</style>")

    def show(self) -> None:
        from IPython.display import HTML, display

        if detect_platform() != COLAB:
            self.handle = display(HTML(self.html()), display_id=True)

    def update(self, *, status: str, images=(), plots: bytes | None = None) -> None:
        """The panel's state now: its status (HTML), image files, and PNG bytes of a plot."""
        import base64

        self.status = status
        pngs = [*([plots] if plots else []), *(Path(path).read_bytes() for path in images)]
        self.images = [base64.b64encode(data).decode() for data in pngs]
        if self.handle is not None:
            from IPython.display import HTML

            self.handle.update(HTML(self.html()))

    def html(self) -> str:
        images = "".join(f"<img src='data:image/png;base64,{data}' style='max-width:100%'/>" for data in self.images)
        return (f"<div class='{self.CSS_CLASS}'><p><i>The {self.what} needs its kernel: rerun this cell to get the "
                f"controls back. What it showed last:</i></p><p>{self.status or 'Nothing run yet.'}</p>{images}</div>")


# --- Long actions: a Stop button, one progress bar, the kernel free --------------------------------------------
class Runner:
    """How a panel runs its long action (Train, Draw, Run sweep) and lets it be stopped.

    Started by the panel's button (`start`) the action runs in a thread of its own: the kernel stays free to
    receive the Stop button's click, and its interrupt (■) stops the action too (`progress.stop_tasks_on_
    interrupt`). Called from a cell or headless (`run`) it runs right there, and the kernel's interrupt stops
    it the same way. Either way it ends at its next image or step (`progress.report`) with `Stopped`, which the
    panel words as one message; its one progress bar follows every phase (training, generating, rendering,
    measuring), and library progress bars stay out of the notebook.
    """

    def __init__(self, *, button, progress, status):
        import ipywidgets as widgets

        self.button, self.progress, self.status = button, progress, status
        self.stop_button = widgets.Button(description="Stop", icon="stop", disabled=True,
                                          tooltip="Stop at the next image or step (the kernel's ■ does the same)")
        self.stop_button.on_click(lambda _button: self.stop())
        self.task = None
        self.thread = None

    def _begin(self):
        self.task = Task(on_progress=self._moved)
        self.button.disabled, self.stop_button.disabled = True, False
        return self.task

    def _end(self) -> None:
        self.button.disabled, self.stop_button.disabled = False, True

    def run(self, work):
        """`work()` here and now; what it returns. The kernel's interrupt stops it at its next report."""
        import signal
        import threading

        task = self._begin()
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, lambda signum, frame: task.stop()) if main else None
        try:
            with running(task):
                return work()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
            self._end()

    def start(self, work) -> None:
        """`work()` in a thread of its own (what a button's click runs); returns at once. `work` must say
        its own errors: nothing may escape a thread into JupyterLab's log console."""
        import threading

        stop_tasks_on_interrupt()
        task = self._begin()

        def target():
            try:
                with running(task):
                    work()
            except KeyboardInterrupt:  # a stop that `work` left unsaid: it ended, as asked
                pass
            finally:
                self._end()

        self.thread = threading.Thread(target=target, name="dreambooth-nb-panel", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """What the Stop button does: the action ends at its next image or step."""
        if self.task is not None and not self.task.stopping:
            self.task.stop()
            self.stop_button.disabled = True
            self.status.value = "<i>Stopping at the next image or step…</i>"

    def join(self, timeout: float | None = None) -> None:
        """Wait for an action started by `start` (tests; a script driving a panel)."""
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _moved(self, phase: str, done: int, total: int) -> None:
        self.progress.max = max(1, total)
        self.progress.value = min(done, total)
        self.progress.description = phase.split()[0].capitalize()
        if phase != "training":  # (training has its own status line: loss, speed, time left)
            self.status.value = f"{html.escape(phase[0].upper() + phase[1:])}: {done} of {total}…"


# --- The training panel ------------------------------------------------------------------------------------
def _lr_slider(value: float, widgets):
    """1e-7 to 1e-3 (the highest rate a config accepts), wider only to hold a smaller value."""
    low = min(-7.0, math.floor(math.log10(value)))
    return widgets.FloatLogSlider(value=value, base=10, min=low, max=-3.0, step=0.01, description="Learning rate",
                                  readout_format=".1e", continuous_update=False)


SAVER_FIELDS = ("gradient_checkpointing", "train_batch_size", "gradient_accumulation_steps", "use_8bit_adam")
"""The panel's memory-saver widgets: `fit` sets them while "Fit to this GPU" is ticked; changing one by hand
unticks it (the person overrides the fit)."""


class TrainingPanel:
    """Widgets for the settings that matter, a Train button, a progress bar, the loss plot and samples.

    `panel.train()` is what the button runs, here and now (headless runs); `panel.start()` runs it as the button
    does, in the background where a Stop button can stop it. While the "Fit to this GPU" box is ticked — as
    notebook 1 chose (`config.fit_to_gpu`), unless `fit` says otherwise — the memory savers are the fastest that
    fit `gpu` (None: the GPU here, a T4 where there is none; see `dreambooth_nb.fit`), re-chosen as settings
    change and again when Train resumes a run, maybe on another GPU, never as large as what ran out of memory
    there before; setting a saver by hand unticks the box.
    On a machine with several GPUs (Kaggle's 2×T4) a "GPUs" choice trains data-parallel on that many, all by
    default (`processes`: how many it offers; None: the visible GPUs, one on Colab); batch size is per GPU
    and the panel shows the effective batch, batch × accumulation × GPUs.
    """

    def __init__(self, config: TrainConfig, *, run_dir_for=None, sample_steps: int = 50, sample_seeds=(0, 1),
                 fit: bool | None = None, gpu=None, processes: int | None = None):
        import ipywidgets as widgets

        processes = visible_gpus() if processes is None else processes
        # Every GPU by default, as train(num_processes=None), with the effective batch of the config: the
        # object preset's 4 images per step become 2 per GPU on two GPUs, not 8.
        config = for_processes(config, processes) if processes != config.num_processes else config
        self.base = config
        self.gpu = gpu
        self.fit_report = None  # the last `fitting.FitReport` applied to the saver widgets
        self._fit_cache: dict = {}
        self._applying = False  # (True while fit writes the saver widgets: not a person's override)
        self._config: TrainConfig | None = None
        self.run_dir_for = run_dir_for
        self.sample_steps = sample_steps
        self.sample_seeds = list(sample_seeds)
        self.final: Path | None = None
        v = widget_values(config)
        wide = {"description_width": "170px"}
        layout = widgets.Layout(width="520px")
        steps_max = max(3000, v["max_train_steps"])
        self.fields = {
            "method": widgets.Dropdown(options=[(cls.title, name) for name, cls in METHODS.items()],
                                       value=v["method"], description="Method"),
            "learning_rate": _lr_slider(v["learning_rate"], widgets),
            "max_train_steps": widgets.IntSlider(value=v["max_train_steps"], min=min(10, v["max_train_steps"]),
                                                 max=steps_max, step=10, description="Steps (or type)",
                                                 continuous_update=False),
            "train_batch_size": widgets.IntSlider(value=v["train_batch_size"], min=1,
                                                  max=max(8, v["train_batch_size"]), description="Batch size"),
            "gradient_accumulation_steps": widgets.IntSlider(
                value=v["gradient_accumulation_steps"], min=1, max=max(8, v["gradient_accumulation_steps"]),
                description="Grad. accumulation"),
            "num_processes": widgets.Dropdown(options=list(range(1, processes + 1)), value=processes,
                                              description="GPUs (data-parallel)"),
            "with_prior_preservation": widgets.Checkbox(value=v["with_prior_preservation"],
                                                        description="Prior preservation"),
            "prior_loss_weight": widgets.BoundedFloatText(value=v["prior_loss_weight"], min=0.0, max=10.0,
                                                          step=0.1, description="Prior loss weight"),
            "train_text_encoder": widgets.Checkbox(value=v["train_text_encoder"],
                                                   description="Train text encoder (+≈1 GB)"),
            "use_8bit_adam": widgets.Checkbox(value=v["use_8bit_adam"], description="8-bit Adam"),
            "gradient_checkpointing": widgets.Checkbox(value=v["gradient_checkpointing"],
                                                       description="Gradient checkpointing"),
            "mixed_precision": widgets.Dropdown(options=list(MIXED_PRECISION), value=v["mixed_precision"],
                                                description="Mixed precision"),
            "snapshot_steps": widgets.Text(value=v["snapshot_steps"], description="Snapshots at steps",
                                           placeholder="e.g. 200, 400 (the last step is always saved)"),
        }
        for widget in self.fields.values():
            widget.style = wide
            widget.layout = layout
        if processes == 1:  # one GPU (or none): nothing to choose
            self.fields["num_processes"].layout = widgets.Layout(display="none")
        self.batch_note = widgets.HTML(value="")
        self.note = widgets.HTML(value="")
        self.fields["max_train_steps"].observe(self._steps_changed, names="value")
        self.fields["method"].observe(self._method_changed, names="value")
        self.button = widgets.Button(description="Train", button_style="primary", icon="play")
        self.progress = widgets.IntProgress(value=0, min=0, max=v["max_train_steps"], description="Progress",
                                            style=wide, layout=layout)
        self.status = widgets.HTML(value="Ready: press Train (Stop, or the kernel's ■, stops at the next step; "
                                         "Train again resumes).")
        self.plot = widgets.Output()
        self.log = widgets.Output()
        self.button.on_click(self._clicked)
        self.runner = Runner(button=self.button, progress=self.progress, status=self.status)
        self.fallback = Fallback("training panel")
        self.memory = widgets.HTML(value="")
        # (notebook 1's choice, saved in the config, unless a caller decides here)
        self.fit_box = widgets.Checkbox(value=config.fit_to_gpu if fit is None else bool(fit),
                                        description="Fit the memory savers to this GPU", style=wide, layout=layout)
        self.fit_note = widgets.HTML(value="")
        self._names = {id(widget): name for name, widget in self.fields.items()}
        self.fields["num_processes"].observe(self._gpus_changed, names="value")  # (before the re-fit below)
        for widget in self.fields.values():
            widget.observe(self._settings_changed, names="value")
        self.fit_box.observe(self._fit_toggled, names="value")
        self.box = widgets.VBox([*self.fields.values(), self.batch_note, self.fit_box, self.fit_note, self.note,
                                 self.memory, widgets.HBox([self.button, self.runner.stop_button]), self.progress,
                                 self.status, self.plot, self.log, self.fallback.hider()])
        self.live: LiveLoss | None = None
        self.samples: Path | None = None
        self._settings_changed()

    def _settings_changed(self, change=None) -> None:
        """Re-fit the savers (while "Fit to this GPU" is ticked) and re-plan the memory for the panel's settings
        (from the model's configs: milliseconds once a setup has been traced); show the verdict in one line.
        A saver set by hand unticks the fit: the person's choice stands."""
        if self._applying:
            return
        name = self._names.get(id(change["owner"])) if change is not None else None
        if name in SAVER_FIELDS and self.fit_box.value:
            self._applying = True
            try:
                self.fit_box.value = False
            finally:
                self._applying = False
            self.fit_note.value = FIT_OFF_NOTE
        elif self.fit_box.value:
            self._apply_fit()
        self.batch_note.value = batch_line(self.values())
        self.memory.value = memory_line(self)

    def _gpus_changed(self, change) -> None:
        """Another number of GPUs keeps the images per step: batch and accumulation are split anew."""
        try:
            current = config_from_widgets({**self.values(), "num_processes": change["old"]}, self.base)
            split = for_processes(current, change["new"])
        except DreamboothError:  # a half-typed field: Train will say what is wrong
            return
        self._applying = True  # (not a person's override of the fit's savers)
        try:
            self.fields["train_batch_size"].value = split.train_batch_size
            self.fields["gradient_accumulation_steps"].value = split.gradient_accumulation_steps
        finally:
            self._applying = False

    def _fit_toggled(self, change) -> None:
        if self._applying:
            return
        if change["new"]:
            self._apply_fit()
        else:
            self.fit_report, self.fit_note.value = None, FIT_OFF_NOTE
        self.memory.value = memory_line(self)

    def _apply_fit(self) -> None:
        """Set the saver widgets to `fit`'s choice for the panel's settings (for the run they would resume,
        within what may change on resume), and say what it chose and why."""
        import json

        try:
            # From the savers of the config the panel opened with (notebook 1's): "before" stays what was saved.
            config = with_savers_of(self.base, config_from_widgets(self.values(), self.base))
            if self.run_dir_for is not None:
                config = config.replace(output_dir=str(self.run_dir_for(config)))
            previous = previous_run(config)
            # (a run that just ran out of memory is fitted anew: the fit then keeps below what failed)
            key = (config.to_json(), json.dumps(previous, sort_keys=True, default=str), str(self.gpu),
                   json.dumps(out_of_memory_record(config.output_dir), sort_keys=True, default=str))
            if key not in self._fit_cache:
                self._fit_cache[key] = fit_report(config, self.gpu, previous=previous)
            report = self._fit_cache[key]
        except (DreamboothError, OSError, ValueError) as err:  # a half-typed field, or configs out of reach
            self.fit_report = None
            self.fit_note.value = f"<i>Fit unavailable: {html.escape(str(err).splitlines()[0][:160])}</i>"
            return
        self.fit_report = report
        self._applying = True
        try:
            for name in SAVER_FIELDS:
                self.fields[name].value = getattr(report.config, name)
        finally:
            self._applying = False
        self.fit_note.value = fit_html(report)

    def settings(self) -> TrainConfig:
        """The training settings the panel describes (without the run folder): the widgets' values, and while
        the fit is on the savers it chose that have no widget (cached latents, EMA offload)."""
        config = config_from_widgets(self.values(), self.base)
        if self.fit_box.value and self.fit_report is not None:
            config = config.replace(cache_latents=self.fit_report.config.cache_latents,
                                    offload_ema=self.fit_report.config.offload_ema)
        return config

    def _method_changed(self, change) -> None:
        """LoRA needs ≈50× the learning rate of full fine-tuning: move the slider (visibly; it can be moved
        again) and say where the rate comes from."""
        lr, why = method_learning_rate(change["new"], base=self.base)
        self.fields["learning_rate"].value = lr
        self.note.value = f"<i>Learning rate set to {lr:.0e}: {html.escape(why, quote=False)}.</i>"

    def _steps_changed(self, change) -> None:
        field = self.fields["snapshot_steps"]
        field.value, note = adjust_snapshot_steps(field.value, old_steps=change["old"], new_steps=change["new"])
        self.note.value = f"<i>{note}</i>" if note else ""

    def values(self) -> dict:
        return {name: widget.value for name, widget in self.fields.items()}

    def config(self) -> TrainConfig:
        """The config the panel describes, with its run folder (same settings → same folder → resume)."""
        config = self.settings()
        if self.run_dir_for is not None:
            config = config.replace(output_dir=str(self.run_dir_for(config)))
        return config

    def show(self) -> "TrainingPanel":
        from IPython.display import display

        display(self.box)
        self.fallback.show()
        return self

    def start(self) -> None:
        """Train as the button does: in the background, so that Stop works; headless, here and now."""
        if is_headless():
            self.train()
        else:
            self._clicked()

    def _clicked(self, _button=None) -> None:
        """The Train button: training in a thread of its own (the kernel stays free for Stop)."""
        self.log.outputs = ()
        self.runner.start(lambda: _say_errors(self.log, lambda: self._train_and_say(output=self.log)))

    def train(self, *, output=None) -> Path:
        """Train with the panel's settings (resuming if this run was interrupted), then show samples: what the
        Train button does, here and now (a cell, a headless run).

        Stop, or the kernel's interrupt (Colab's stop button), ends training at the next step with a
        `TrainingStopped` that says where the run stopped and that Train resumes it, as one line.
        """
        return self.runner.run(lambda: self._train_and_say(output=output))

    def _train_and_say(self, *, output=None) -> Path:
        try:
            return self._train(output=output)
        except KeyboardInterrupt:  # (Stop, the kernel's interrupt: `progress.Stopped` is one)
            stopped = TrainingStopped(self._stopped_message())  # (raised below: not chained to the interrupt)
            self.status.value = _failure_html(stopped)
        except DreamboothError as err:
            self.status.value = _failure_html(err)
            raise
        except Exception as err:  # not ours to word: the status must not keep saying "Loading…" or "step N"
            self.status.value = f"<b style='color:#c00'>Failed:</b> {html.escape(f'{type(err).__name__}: {err}')}"
            raise
        finally:
            self.fallback.update(status=self.status.value, images=[self.samples] if self.samples else [],
                                 plots=self.live.png() if self.live is not None and self.live.steps else None)
        raise stopped

    def _stopped_message(self) -> str:
        step = self.progress.value
        state = latest_state(self._config.output_dir) if self._config is not None else None
        kept = f"the last saved state is {state.name} (step {int(state.name.split('-')[1])})" if state else \
            "no state was saved yet, so it starts over"
        return f"Training stopped at step {step}; {kept}. Press Train to resume."

    def _train(self, *, output=None) -> Path:
        self.status.value = "Loading the model and the photos…"
        if self.fit_box.value:  # again: a state saved since (another GPU yesterday) is resumed within what may change
            self._apply_fit()
        self._config = config = self.config()
        history_file = Path(config.output_dir) / "history.json"
        history = None
        if history_file.is_file():
            import json

            saved = json.loads(history_file.read_text())
            history = {key: saved.get(key, []) for key in ("steps", "losses", "validation")}
        self.progress.max = config.max_train_steps
        self.progress.value = history["steps"][-1] if history and history["steps"] else 0
        self.live = live = LiveLoss(total=config.max_train_steps, progress=self.progress, status=self.status,
                                    plot=self.plot, plot_every=max(1, config.max_train_steps // 20), history=history,
                                    title=f"{Path(config.output_dir).name}: lr {config.learning_rate:.1e}")
        self.samples = None
        print(f"Run folder: {config.output_dir}")
        subjects = config.subjects()
        if len(subjects) > 1:  # (they take turns in every batch: one run learns them all)
            print(f"Training {len(subjects)} subjects together: " + "; ".join(s.instance_prompt for s in subjects))
            self.status.value = f"Loading the model and the photos of {len(subjects)} subjects…"
        if self.fit_box.value and self.fit_report is not None:
            print("\n".join([self.fit_report.headline(), *self.fit_report.resumed]))
        final = train(config, num_processes=config.num_processes, on_step=live, on_validation=live.validation_point,
                      progress_bar=False)  # the panel's bar is the one progress bar
        live.redraw()
        self.progress.value = config.max_train_steps
        self.final = final
        snapshots = list_snapshots(config.output_dir)
        print("Snapshots: " + ", ".join(f"step {s}" for s, _ in snapshots))
        if output is None and live.steps:  # headless: the final plot also goes into the cell's own output
            show_png(loss_plot_png(live.steps, live.losses, total=live.total, title=live.title,
                                   validation=live.validation))
        self.status.value = f"Trained {config.max_train_steps} steps; rendering sample images…"
        with _into(output):
            self.show_samples(config, final)
        self.progress.description, self.progress.max = "Done", config.max_train_steps
        self.progress.value = config.max_train_steps
        self.status.value = f"Done: {config.max_train_steps} steps. Final snapshot: {final}"
        return final

    def show_samples(self, config: TrainConfig, snapshot: Path) -> None:
        """Fixed-seed samples of `snapshot` (cached on disk: showing them again costs nothing)."""
        # The subject and its class only: new contexts are notebook 4's job (and each prompt costs ~7 s on a T4).
        spec = EvalSpec.for_config(config, contexts=(), seeds=self.sample_seeds, num_inference_steps=self.sample_steps)
        print(f"Samples from {snapshot.name} (DDIM, {spec.num_inference_steps} steps):")
        self.samples = show_rendered(render(snapshot, spec), path=render_dir(snapshot) / f"samples-{spec.key()}.png",
                                     title=f"{snapshot.name}: DDIM, {spec.num_inference_steps} steps, guidance "
                                           f"{spec.guidance_scale:g}")


def method_learning_rate(method: str, *, base: TrainConfig) -> tuple[float, str]:
    """The learning rate a switch to `method` sets, and where it comes from: back to notebook 1's rate when it
    was set for that method, else the preset's (LoRA's; full fine-tuning: the object preset's, faces lower)."""
    title = METHODS[method].title
    if base.method == method:
        return base.learning_rate, f"back to the rate notebook 1 set for {title}"
    if method in PRESETS:  # a method with a preset of its own (LoRA: diffusers' Dreambooth LoRA example's rate)
        return PRESETS[method]["learning_rate"], f"the {title} preset's rate"
    return (PRESETS["object"]["learning_rate"],
            f"the object preset's rate for {title} (the study; faces: {PRESETS['face']['learning_rate']:.0e})")


def _say_errors(log, work) -> None:
    """Run a button's `work` with its prints in `log`: our errors as their message, a bug with its traceback
    there — never in JupyterLab's log console, where nobody looks (a thread's exception would land there)."""
    with _into(log):
        try:
            work()
        except DreamboothError as err:  # the message, not a traceback
            print(f"{type(err).__name__}: {err}")
        except Exception:
            import traceback

            traceback.print_exc()


def _failure_html(err: DreamboothError) -> str:
    """The status line of a panel whose action ended early: "Stopped" for a stop, "Error" for a setting or a
    file to fix."""
    label = "Stopped" if isinstance(err, (TrainingStopped, ActionStopped)) else "Error"
    return f"<b style='color:#c00'>{label}:</b> {html.escape(str(err))}"


def with_savers_of(base: TrainConfig, config: TrainConfig) -> TrainConfig:
    """`config` with the memory savers of `base` (its batch split where the effective batch is the same, else
    batch 1 × accumulation): what the panel's fit starts from, so its "before" is the config it opened with."""
    effective = config.train_batch_size * config.gradient_accumulation_steps
    batch = base.train_batch_size if base.train_batch_size * base.gradient_accumulation_steps == effective else 1
    return config.replace(gradient_checkpointing=base.gradient_checkpointing, use_8bit_adam=base.use_8bit_adam,
                          cache_latents=base.cache_latents, offload_ema=base.offload_ema, train_batch_size=batch,
                          gradient_accumulation_steps=effective // batch)


FIT_OFF_NOTE = ("<i>Fit off: the memory savers are yours as set (tick “Fit the memory savers to this GPU” to "
                "let the memory plan choose the fastest that fit).</i>")


def fit_html(report) -> str:
    """The training panel's account of a fit: what it turned on or off and why, the plan before and after."""
    colour = "#2e7d32" if report.fits else "#c62828"
    items = "".join(f"<li>{html.escape(choice.line())}</li>" for choice in report.choices)
    items += "".join(f"<li>{html.escape(line)}</li>" for line in report.resumed + report.notes)
    return (f"<span style='color:{colour}'>{html.escape(report.headline())}</span>"
            f"<ul style='margin:0'>{items}</ul>")


def batch_line(values: dict) -> str:
    """The panel's effective batch: photos per optimizer step, from its batch, accumulation and GPUs."""
    batch, accumulation, gpus = (int(values[k]) for k in ("train_batch_size", "gradient_accumulation_steps",
                                                          "num_processes"))
    on_gpus = f" × {gpus} GPUs" if gpus > 1 else ""
    return (f"<i>Effective batch: {batch} × {accumulation} accumulated{on_gpus} = {batch * accumulation * gpus} "
            "photos per step.</i>")


def memory_line(panel) -> str:
    """One line for the training panel: the memory plan of its settings on this GPU (a T4 when there is none)."""
    try:
        config = panel.settings() if hasattr(panel, "settings") else config_from_widgets(panel.values(), panel.base)
        result = plan(config, getattr(panel, "gpu", None))
    except (DreamboothError, OSError, ValueError) as err:  # a half-typed field, or configs out of reach
        return f"<i>Memory plan unavailable: {html.escape(str(err).splitlines()[0][:160])}</i>"
    colour, verdict = ("#2e7d32", "fits") if result.fits else ("#c62828", "does not fit")
    advice = f" To fit: {html.escape('; '.join(result.advice))}" if result.advice else ""
    return (f"<span style='color:{colour}'>Memory plan: {gib(result.gpu_required_bytes, digits=1)} GiB needed of "
            f"{gib(result.gpu_total_bytes, digits=1)} GiB on {html.escape(result.gpu)}: {verdict}.</span>{advice}")


# --- Comparison and sweep panels -----------------------------------------------------------------------------
SCHEDULER_CHOICES = [("DDIM (recommended)", "ddim"), ("PNDM (SD 1.5's default)", "pndm"), ("DPM-Solver++", "dpm")]
COLUMN_CHOICES = [("training steps", "step"), ("prompts", "prompt")]


def grid_axes(columns: str) -> tuple:
    """(rows, cols) for `compare`: prompts × seeds down and each run's steps across, or runs × steps down and
    prompts across."""
    if columns == "step":
        return ("prompt", "seed"), ("run", "step")
    if columns == "prompt":
        return ("run", "step"), "prompt"
    raise ConfigError(f"COLUMNS: {columns!r} is unknown; choose 'step' or 'prompt'.")


class ComparePanel:
    """Scheduler, inference steps, guidance and layout widgets, a Draw button and a Stop button over `compare`.

    `runs`: {name: run folder}, or a function giving them (`project.select_runs`), asked again at every Draw so
    that a run trained since is drawn too. `draw()` draws here and now (a cell); `start()` draws as the button
    does, in the background, where a person can press Stop (headless: here and now).
    """

    def __init__(self, runs, spec, *, out_dir, columns: str = "step", title: str | None = None):
        import ipywidgets as widgets

        self.runs_for = runs if callable(runs) else (lambda: runs)
        self.base_spec, self.out_dir, self.title = spec, Path(out_dir), title
        style, layout = {"description_width": "150px"}, widgets.Layout(width="520px")
        # (wide enough for "DDIM (recommended)": the default width cut it to "DDIM (recommende")
        self.scheduler = widgets.Dropdown(options=SCHEDULER_CHOICES, value=spec.scheduler, description="Scheduler",
                                          style=style, layout=layout)
        self.steps = widgets.IntSlider(value=spec.num_inference_steps, min=min(10, spec.num_inference_steps),
                                       max=max(150, spec.num_inference_steps), step=5, description="Inference steps",
                                       continuous_update=False, style=style, layout=layout)
        self.guidance = widgets.FloatSlider(value=spec.guidance_scale, min=1.0, max=max(15.0, spec.guidance_scale),
                                            step=0.5, description="Guidance", continuous_update=False, style=style,
                                            layout=layout)
        self.columns = widgets.Dropdown(options=COLUMN_CHOICES, value=columns, description="Columns", style=style,
                                        layout=layout)
        self.button = widgets.Button(description="Draw", button_style="primary", icon="th")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="Progress", style=style,
                                            layout=layout)
        self.status = widgets.HTML(value="Ready: press Draw.")
        self.output = widgets.Output()  # what was drawn, where it was saved (or the error)
        self.view = widgets.Output()  # the grid: one at a time, replaced by each Draw
        self.button.on_click(self._clicked)
        self.runner = Runner(button=self.button, progress=self.progress, status=self.status)
        self.fallback = Fallback("comparison panel")
        self.box = widgets.VBox([self.scheduler, self.steps, self.guidance, self.columns,
                                 widgets.HBox([self.button, self.runner.stop_button]), self.progress, self.status,
                                 self.output, self.view, self.fallback.hider()])
        self.grid: Path | None = None

    def spec(self):
        return self.base_spec.replace(scheduler=self.scheduler.value, num_inference_steps=int(self.steps.value),
                                      guidance_scale=float(self.guidance.value))

    def show(self) -> "ComparePanel":
        from IPython.display import display

        display(self.box)
        self.fallback.show()
        return self

    def draw(self) -> Path:
        """Draw the grid with the panel's settings into the panel (replacing the last one); return its PNG. The
        kernel's interrupt stops it at the next image (rendered images are kept: drawing again goes on)."""
        return self.runner.run(self._draw_and_say)

    def start(self) -> None:
        """Draw as the Draw button does: in the background, so that Stop works; headless, here and now."""
        if is_headless():
            self.draw()
        else:
            self._clicked()

    def _clicked(self, _button=None) -> None:
        self.output.outputs = ()
        self.runner.start(lambda: _say_errors(self.output, self._draw_and_say))

    def _draw_and_say(self) -> Path:
        try:
            return self._draw()
        except KeyboardInterrupt:  # (Stop, the kernel's interrupt)
            stopped = ActionStopped("Drawing stopped; the images rendered so far are kept (cached), so Draw goes "
                                    "on from there.")
        except DreamboothError as err:
            self.status.value = _failure_html(err)
            self.fallback.update(status=self.status.value)
            raise
        self.status.value = _failure_html(stopped)
        self.fallback.update(status=self.status.value)
        raise stopped

    def _draw(self) -> Path:
        from IPython.display import HTML, Image

        rows, cols = grid_axes(self.columns.value)
        spec = self.spec()
        runs = self.runs_for()
        sampler = f"{spec.scheduler.upper()}, {spec.num_inference_steps} steps, guidance {spec.guidance_scale:g}"
        self.output.outputs = ()
        if self.grid is not None:  # the last grid stays visible, said to be the last one, until the new one is ready
            _replace_outputs(self.view, HTML("<i>Drawing a new grid; below, the previous one.</i>"),
                             Image(filename=str(self.grid)))
        self.status.value = f"Drawing {len(runs)} run(s) with {html.escape(sampler)}…"
        with _into(self.output):
            print(f"{len(runs)} run(s): {', '.join(runs)}; {sampler}, seeds {spec.seeds}. Rendered "
                  "images are cached: redrawing with the same settings is instant.")
            title = f"{self.title} · {sampler}" if self.title else sampler
            self.grid = compare(runs, spec, rows=rows, cols=cols, out=self.out_dir, title=title)
            print(f"Saved {self.grid} (+ {self.grid.with_suffix('.json').name})")
            report, plot = quality.read(self.grid)
            print(quality.summary(report))
        images = [self.grid, *([plot] if plot else [])]
        _replace_outputs(self.view, *(Image(filename=str(path)) for path in images))
        self.progress.description, self.progress.value = "Done", self.progress.max
        self.status.value = f"Done: {html.escape(self.grid.name)} ({len(runs)} run(s), {html.escape(sampler)})."
        self.fallback.update(status=self.status.value, images=images)
        return self.grid


class SweepPanel:
    """Learning-rate and step lists, a Run button and a Stop button over `sweep`; `run()` is what the button
    does, here and now; `start()` runs it as the button does (in the background; headless, here and now).
    The loss plot shows every rate of the sweep; the panel shows the latest sweep's grid, each sweep keeping
    its own file (`sweep.grid_path`)."""

    def __init__(self, config: TrainConfig, *, lrs, save_at, spec=None, sweep_dir_for=None):
        import ipywidgets as widgets

        self.base, self.spec, self.sweep_dir_for = config, spec, sweep_dir_for
        style, layout = {"description_width": "150px"}, widgets.Layout(width="520px")
        self.lrs = widgets.Text(value=", ".join(f"{lr:g}" for lr in parse_float_list(lrs)),
                                description="Learning rates", style=style, layout=layout)
        self.save_at = widgets.Text(value=", ".join(str(s) for s in parse_int_list(save_at, name="SAVE_AT")),
                                    description="Compare at steps", style=style, layout=layout)
        self.button = widgets.Button(description="Run sweep", button_style="primary", icon="play")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="Progress", style=style,
                                            layout=layout)
        self.status = widgets.HTML(value="Ready: press Run sweep (Stop, or the kernel's ■, stops at the next step "
                                         "or image; Run sweep again goes on).")
        self.plot = widgets.Output()
        self.output = widgets.Output()  # this sweep's log, cleared at each run
        self.view = widgets.Output()  # the latest sweep's grid and metrics plot
        self.button.on_click(self._clicked)
        self.runner = Runner(button=self.button, progress=self.progress, status=self.status)
        self.fallback = Fallback("sweep panel")
        self.box = widgets.VBox([self.lrs, self.save_at, widgets.HBox([self.button, self.runner.stop_button]),
                                 self.progress, self.status, self.plot, self.output, self.view,
                                 self.fallback.hider()])
        self.result = None

    def values(self) -> tuple[list[float], list[int]]:
        return (parse_float_list(self.lrs.value, name="learning rates"),
                parse_int_list(self.save_at.value, name="steps"))

    def show(self) -> "SweepPanel":
        from IPython.display import display

        display(self.box)
        self.fallback.show()
        return self

    def run(self, *, output=None):
        """Run the sweep here and now (a cell, a headless run); the kernel's interrupt stops it at the next step
        or image (trained steps are kept as states; running it again goes on)."""
        return self.runner.run(lambda: self._run_and_say(output=output))

    def start(self) -> None:
        """Run as the button does: in the background, so that Stop works; headless, here and now."""
        if is_headless():
            self.run()
        else:
            self._clicked()

    def _clicked(self, _button=None) -> None:
        self.output.outputs = ()
        self.runner.start(lambda: _say_errors(self.output, lambda: self._run_and_say(output=self.output)))

    def _run_and_say(self, *, output=None):
        try:
            return self._run(output=output)
        except KeyboardInterrupt:  # (Stop, the kernel's interrupt)
            stopped = ActionStopped("Sweep stopped; every run keeps its last saved state and the images rendered "
                                    "so far (cached), so Run sweep goes on from there.")
        except DreamboothError as err:
            self.status.value = _failure_html(err)
            self.fallback.update(status=self.status.value)
            raise
        self.status.value = _failure_html(stopped)
        self.fallback.update(status=self.status.value)
        raise stopped

    def _run(self, *, output=None):
        from IPython.display import Image

        lrs, save_at = self.values()
        config = self.base
        if self.sweep_dir_for is not None:
            config = config.replace(output_dir=str(self.sweep_dir_for(config)))
        total = max(save_at)
        live = _RunsLoss(total=total, progress=self.progress, status=self.status, plot=self.plot,
                         plot_every=max(1, total // 10),
                         finished=_finished_losses({f"lr {lr:.1e}": run_folder(config.output_dir, lr) for lr in lrs}))
        with _into(output):
            print(f"Sweep: learning rates {lrs} × snapshots at steps {save_at} into {config.output_dir}")
            self.result = sweep(config, lrs=lrs, save_at=save_at, spec=self.spec, on_step=live)
            print(f"Saved {self.result.grid}")
            report, plot = quality.read(self.result.grid)
            print(quality.summary(report))
        live.redraw()
        images = [self.result.grid, *([plot] if plot else [])]
        _replace_outputs(self.view, *(Image(filename=str(path)) for path in images))
        self.progress.description, self.progress.value = "Done", self.progress.max
        self.status.value = (f"Done: {len(lrs)} learning rate(s) × {len(save_at)} step(s); grid "
                             f"{html.escape(self.result.grid.name)}.")
        self.fallback.update(status=self.status.value, images=[*images], plots=live.png())
        return self.result


def _finished_losses(runs: dict) -> dict:
    """{label: (steps, losses)} of the runs that finished before (their history.json), for the sweep's plot."""
    import json

    found = {}
    for label, folder in runs.items():
        history = Path(folder) / "history.json"
        try:
            if history.is_file() and list_snapshots(folder):
                saved = json.loads(history.read_text())
                found[label] = (list(saved.get("steps", [])), list(saved.get("losses", [])))
        except (OSError, ValueError):
            continue
    return found


class _RunsLoss(LiveLoss):
    """LiveLoss over several runs in a row (a sweep): a step lower than the last one starts a new curve, and
    the runs before stay in the plot, each as its moving average (`finished`: runs done before this session)."""

    def __init__(self, *, finished: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.finished = dict(finished or {})

    def __call__(self, step: int, loss: float, lr: float) -> None:
        label = f"lr {lr:.1e}"
        if self.steps and (step <= self.steps[-1] or label != self.title):
            self.finished[self.title] = (self.steps, self.losses)
            self.steps, self.losses, self.validation = [], [], []
            self._t0 = None
        self.finished.pop(label, None)  # (a run resumed: its curve is the live one now)
        self.title = label
        super().__call__(step, loss, lr)

    def png(self) -> bytes:
        return loss_plot_png(self.steps, self.losses, total=self.total, title=self.title, validation=self.validation,
                             others=[(label, *curve) for label, curve in self.finished.items()])

    def redraw(self) -> None:
        if self.plot is None or not (self.steps or self.finished):
            return
        from IPython.display import Image

        _replace_outputs(self.plot, Image(data=self.png()))
