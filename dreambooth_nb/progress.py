"""Long work a panel can follow and stop: training steps, generated and rendered images, measured snapshots.

The package's long loops say where they are with `report(phase, done, total)`. A panel runs each action as a
`Task` (`with running(task): ...`): every report moves the task's one progress bar (`on_progress`), and a
stop asked for — the panel's Stop button, or the kernel's interrupt (`stop_tasks_on_interrupt`) — ends the
action at its next report with `Stopped`: between two images or two steps, never inside a library call.
(A kernel interrupt raised anywhere else can land in a weakref callback of torch or diffusers, where Python
prints "Exception ignored in: …" and carries on: Draw went on for a minute after three interrupts.)

Outside a task `report` does nothing: scripts, tests and headless runs behave as they always did.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


class Stopped(KeyboardInterrupt):
    """A stop asked for by the person (Stop button or the kernel's interrupt), raised at the next report. A
    KeyboardInterrupt: everything that cleans up after an interrupt (training frees its models, several
    processes are stopped together) cleans up after it too."""


@dataclass(eq=False)
class Task:
    """One panel action. `on_progress(phase, done, total)` is called at every report, in the action's thread."""

    on_progress: Callable[[str, int, int], None] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        """Ask the action to end at its next report (safe from any thread, and from a signal handler)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def check(self) -> None:
        if self._stop.is_set():
            raise Stopped("stopped")


_CURRENT: contextvars.ContextVar[Task | None] = contextvars.ContextVar("dreambooth_nb_task", default=None)
_RUNNING: set[Task] = set()
_LOCK = threading.Lock()


@contextlib.contextmanager
def running(task: Task):
    """Inside the block (in this thread), reports go to `task` and a stop of `task` ends the work."""
    token = _CURRENT.set(task)
    with _LOCK:
        _RUNNING.add(task)
    try:
        yield task
    finally:
        with _LOCK:
            _RUNNING.discard(task)
        _CURRENT.reset(token)


def report(phase: str, done: int, total: int) -> None:
    """Where the current work is: `done` of `total` in `phase` ("training", "rendering step 200", …). Raises
    `Stopped` when the task was asked to stop; does nothing outside a task."""
    task = _CURRENT.get()
    if task is None:
        return
    task.check()
    if task.on_progress is not None:
        task.on_progress(phase, done, total)


def in_task() -> bool:
    """Whether a panel follows the current work (then its library progress bars stay out of the notebook)."""
    return _CURRENT.get() is not None


def stop_running_tasks() -> int:
    """Ask every running task to stop; how many there were."""
    with _LOCK:
        tasks = list(_RUNNING)
    for task in tasks:
        task.stop()
    return len(tasks)


def stop_tasks_on_interrupt() -> bool:
    """Make the kernel's interrupt (JupyterLab's ■, Colab's stop) stop the panels' running actions.

    A panel's action runs in a thread of its own, so that the kernel stays free to receive the Stop button's
    click; the kernel's interrupt then arrives while the kernel waits for messages, when ipykernel ignores it.
    ipykernel puts back, after each message it handles, the handler it found before (`saved_sigint_handler`):
    this installs one that stops the running tasks as that handler, and otherwise does what the one before
    did. Call it from a widget callback or a cell (the main thread, inside a kernel); True if installed.
    """
    try:
        from IPython import get_ipython

        kernel = getattr(get_ipython(), "kernel", None)
    except ImportError:
        kernel = None
    if kernel is None or not hasattr(kernel, "saved_sigint_handler"):
        return False
    previous = kernel.saved_sigint_handler
    if getattr(previous, "_dreambooth_nb", False):
        return True

    def on_interrupt(signum, frame):
        if not stop_running_tasks() and callable(previous):  # (SIG_IGN, what an idle kernel has, is not)
            previous(signum, frame)

    on_interrupt._dreambooth_nb = True
    kernel.saved_sigint_handler = on_interrupt
    return True
