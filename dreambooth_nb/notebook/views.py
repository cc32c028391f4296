"""What the notebooks show: errors as one message, plots and images, prints routed into a panel's Output widget,
the live loss plot, and the static copy a saved notebook keeps of a panel. Only ipywidgets API common to 7.7
(Colab) and 8 is used."""

from __future__ import annotations

import contextvars
import io
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from dreambooth_nb.dataset.masks import overlay
from dreambooth_nb.environment import COLAB, detect_platform
from dreambooth_nb.errors import DreamboothError
from dreambooth_nb.results.grids import draw_grid


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


def photo_thumbnail(image, *, mask=None, crop=None, size: int = 160) -> bytes:
    """PNG of a photo as training sees it, scaled to fit `size`: the background tinted where `mask` says
    (`masks.overlay`: what stays clear is what training learns) and `crop` — (left, top, right, bottom), the
    square training keeps of a photo that is not square — outlined."""
    from PIL import ImageDraw

    shown = overlay(image, mask) if mask is not None else image.convert("RGB")
    scale = size / max(shown.size)
    shown = shown.resize((max(1, round(shown.width * scale)), max(1, round(shown.height * scale))))
    if crop is not None and tuple(crop) != (0, 0, *image.size):
        left, top, right, bottom = (round(v * scale) for v in crop)
        ImageDraw.Draw(shown).rectangle((left, top, right - 1, bottom - 1), outline=(255, 215, 0), width=2)
    buffer = io.BytesIO()
    shown.save(buffer, format="PNG")
    return buffer.getvalue()


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
def writing_into(output):
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


def replace_outputs(output, *objs) -> None:
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

        replace_outputs(self.plot, Image(data=self.png()))

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


class RunsLoss(LiveLoss):
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

        replace_outputs(self.plot, Image(data=self.png()))
