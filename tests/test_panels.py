"""Every panel can be stopped, shows its progress, and says the truth (kernel side; the browser test clicks).

The long actions (Train, Draw, Run sweep) run through `ui.Runner`: started by a button they run in a thread,
so that the kernel stays free for the Stop button; run from a cell they run there, and the kernel's
interrupt (SIGINT) stops them the same way — at the next image or step, with one message.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from dreambooth_nb import progress
from dreambooth_nb.notebook import views, ui
from dreambooth_nb.config import PRESETS
from dreambooth_nb.errors import ActionStopped, TrainingStopped
from dreambooth_nb.results.evaluate import EvalSpec

pytestmark = pytest.mark.timeout(600)


# --- The mechanism -------------------------------------------------------------------------------------------
def test_a_report_outside_a_task_does_nothing_and_inside_one_moves_its_bar_and_stops_it():
    progress.report("rendering", 1, 2)  # no task: nothing happens
    seen = []
    task = progress.Task(on_progress=lambda *args: seen.append(args))
    with progress.running(task):
        progress.report("rendering step-000200", 0, 4)
        assert progress.in_task()
        task.stop()
        with pytest.raises(progress.Stopped):
            progress.report("rendering step-000200", 1, 4)
    assert seen == [("rendering step-000200", 0, 4)] and not progress.in_task()
    assert issubclass(progress.Stopped, KeyboardInterrupt)  # what cleans up after an interrupt cleans up after it


def _runner():
    import ipywidgets as widgets

    return ui.Runner(button=widgets.Button(), progress=widgets.IntProgress(), status=widgets.HTML())


def test_a_started_action_runs_in_a_thread_the_stop_button_ends_it_at_its_next_report():
    runner = _runner()
    reached, ended = threading.Event(), []

    def work():
        try:
            for i in range(10_000):
                progress.report("rendering step-000100", i, 10_000)
                reached.set()
                time.sleep(0.01)
        except progress.Stopped:
            ended.append(i)
            raise

    runner.start(work)
    assert reached.wait(30) and runner.busy
    assert runner.button.disabled and not runner.stop_button.disabled
    assert runner.progress.description == "Rendering" and runner.progress.max == 10_000
    assert "Rendering step-000100:" in runner.status.value
    started = time.monotonic()
    runner.stop_button.click()  # what a click on Stop does
    runner.join(10)
    assert not runner.busy and time.monotonic() - started < 10 and ended and ended[0] < 10_000
    assert not runner.button.disabled and runner.stop_button.disabled


def test_the_kernels_interrupt_stops_an_action_run_in_a_cell_at_its_next_report():
    """In a cell, SIGINT (the kernel's ■) would raise anywhere — also in a weakref callback of torch, where Python
    prints "Exception ignored" and goes on. While an action runs it only asks for the stop instead."""
    runner = _runner()
    steps = []

    def work():
        for i in range(1000):
            if i == 3:
                os.kill(os.getpid(), signal.SIGINT)  # the kernel's interrupt, mid-work
            time.sleep(0.005)
            progress.report("training", i, 1000)
            steps.append(i)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(progress.Stopped):
        runner.run(work)
    assert 3 <= len(steps) <= 5  # stopped at the next report after the interrupt, not at step 1000
    assert signal.getsignal(signal.SIGINT) is before  # and the kernel's own handler is back


def test_an_idle_kernels_interrupt_stops_the_running_actions(monkeypatch):
    """ipykernel ignores SIGINT while it waits for messages (a Draw running in its thread): the handler it puts
    back after every message becomes one that stops the running tasks, else does what the one before did."""
    import IPython

    calls = []
    kernel = type("Kernel", (), {"saved_sigint_handler": lambda self, *a: calls.append(a)})()
    kernel.saved_sigint_handler = lambda signum, frame: calls.append(signum)
    monkeypatch.setattr(IPython, "get_ipython", lambda: type("Shell", (), {"kernel": kernel})())
    assert progress.stop_tasks_on_interrupt() and progress.stop_tasks_on_interrupt()  # (once)
    task = progress.Task()
    with progress.running(task):
        kernel.saved_sigint_handler(signal.SIGINT, None)
    assert task.stopping and calls == []
    kernel.saved_sigint_handler(signal.SIGINT, None)  # no action running: the earlier handler's turn
    assert calls == [signal.SIGINT]


# --- The panels ----------------------------------------------------------------------------------------------
@pytest.fixture
def trained_run(make_config, tmp_path):
    """A project-like folder with one trained run (two snapshots) of the tiny model."""
    from dreambooth_nb import train

    config = make_config(max_train_steps=2, snapshot_steps=[1], output_dir=str(tmp_path / "runs" / "lr1e-4"))
    train(config)
    return config


def _spec():
    return EvalSpec(prompts=["a photo of sks dog", "a photo of a dog"], seeds=[0, 1, 2], num_inference_steps=2)


def test_stop_during_draw_ends_it_with_one_message_and_draw_goes_on_from_the_kept_images(trained_run, tmp_path,
                                                                                        monkeypatch):
    import dreambooth_nb.results.evaluate as evaluate

    runs = {"lr1e-4": Path(trained_run.output_dir)}
    panel = ui.ComparePanel(lambda: runs, _spec(), out_dir=tmp_path / "comparisons")
    real_report, seen = evaluate.report, []

    def slow_report(phase, done, total):  # (each tiny image takes milliseconds: give Stop time to land)
        seen.append((phase, done))
        time.sleep(0.2)
        real_report(phase, done, total)

    monkeypatch.setattr(evaluate, "report", slow_report)
    panel._clicked()
    deadline = time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert panel.progress.description == "Rendering" and panel.progress.value >= 0
    panel.runner.stop()
    panel.runner.join(30)
    assert not panel.runner.busy
    assert "Stopped:" in panel.status.value and "Draw goes on from there" in panel.status.value
    log = "".join(o.get("text", "") for o in panel.output.outputs)
    assert "ActionStopped: Drawing stopped" in log and "Traceback" not in log
    kept = [p for p in Path(trained_run.output_dir).rglob("*.png") if "renders" in p.parts]
    assert kept and panel.grid is None  # images kept, no grid drawn
    monkeypatch.setattr(evaluate, "report", real_report)
    grid = panel.draw()  # again, in a cell: it finishes from where it stopped
    assert grid.is_file() and panel.status.value.startswith("Done:")
    assert panel.progress.value == panel.progress.max


def test_the_compare_panel_asks_for_its_runs_at_every_draw_and_has_every_control(trained_run, tmp_path):
    runs = {}
    panel = ui.ComparePanel(lambda: dict(runs), _spec().replace(seeds=[0]), out_dir=tmp_path / "comparisons")
    runs["lr1e-4"] = Path(trained_run.output_dir)  # trained after the panel was made
    panel.guidance.value = 3.0
    grid = panel.draw()
    side = json.loads(grid.with_suffix(".json").read_text())
    assert "lr1e-4" in json.dumps(side["col_labels"]) and "guidance 3" in side["title"]
    assert panel.scheduler.layout.width == "520px"  # room for "DDIM (recommended)" beside its label


def test_a_stopped_training_says_where_and_the_fallback_keeps_the_last_state(make_config, monkeypatch):
    import importlib

    train_module = importlib.import_module("dreambooth_nb.training.train")
    config = make_config(max_train_steps=50, checkpointing_steps=2)
    panel = ui.TrainingPanel(config, fit=False)
    real, calls = train_module.compute_loss, []

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            panel.runner.stop()  # Stop pressed during step 4
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "compute_loss", counting)
    panel._clicked()
    panel.runner.join(120)
    assert "Training stopped at step 4; the last saved state is state-000004" in panel.status.value
    assert len(calls) == 4
    html = panel.fallback.html()
    assert "rerun this cell to get the controls back" in html and "Training stopped at step 4" in html
    assert "data:image/png;base64," in html  # the loss plot, as an image that needs no kernel


def test_a_setting_to_fix_is_an_error_not_a_stop():
    from dreambooth_nb.errors import ConfigError, DataError

    assert ui._failure_html(ConfigError("learning_rate: too high")).startswith("<b style='color:#c00'>Error:</b>")
    assert ui._failure_html(DataError("photos: none")).startswith("<b style='color:#c00'>Error:</b>")
    for stop in (TrainingStopped("x"), ActionStopped("y")):
        assert ui._failure_html(stop).startswith("<b style='color:#c00'>Stopped:</b>")


def test_the_eta_waits_for_a_few_steps():
    import ipywidgets as widgets

    status = widgets.HTML()
    live = views.LiveLoss(total=100, status=status)
    for step in (1, 2, 3):
        live(step, 0.5, 1e-4)
        assert "estimating the time left" in status.value
    live(4, 0.5, 1e-4)
    assert "min left" in status.value


# --- The truth in the texts -------------------------------------------------------------------------------------
def test_switching_method_sets_the_presets_rate_and_says_where_it_comes_from(make_config):
    full = make_config(learning_rate=1e-4)  # a toy model's rate, set in notebook 1
    panel = ui.TrainingPanel(full, fit=False)
    panel.fields["method"].value = "lora"
    assert "the LoRA preset's rate" in panel.note.value
    panel.fields["method"].value = "full"
    assert panel.fields["learning_rate"].value == pytest.approx(1e-4)
    assert "back to the rate notebook 1 set for full fine-tuning" in panel.note.value
    assert "usual rate" not in panel.note.value
    lora = ui.TrainingPanel(make_config(method="lora", learning_rate=1e-4), fit=False)
    lora.fields["method"].value = "full"
    assert lora.fields["learning_rate"].value == pytest.approx(PRESETS["object"]["learning_rate"])
    assert "the object preset's rate for full fine-tuning" in lora.note.value


def test_the_sweep_plot_keeps_every_rate():
    import ipywidgets as widgets

    live = views.RunsLoss(total=4, plot=widgets.Output(), finished={"lr 1.0e-03": ([1, 2], [0.3, 0.2])})
    for lr in (5e-4, 1e-4):
        for step in range(1, 5):
            live(step, 0.5, lr)
    assert list(live.finished) == ["lr 1.0e-03", "lr 5.0e-04"] and live.title == "lr 1.0e-04"
    assert live.png().startswith(b"\x89PNG")


def test_a_bad_run_name_in_notebook_6_names_its_run_setting(trained_run, tmp_path):
    from dreambooth_nb import ConfigError
    from dreambooth_nb.results.export import snapshot_in_project
    from dreambooth_nb.notebook.project import Project

    project = Project(tmp_path)
    with pytest.raises(ConfigError, match=r"^RUN: lr9e-9 not found; the runs with snapshots are: lr1e-4"):
        snapshot_in_project(project, "lr9e-9")
    with pytest.raises(ConfigError, match=r"0: the one notebook 4 suggested, else the last"):
        snapshot_in_project(project, "lr1e-4", step=7)


def test_generated_notebooks_carry_no_jupytext_pairing():
    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    for path in sorted(notebooks.glob("*.ipynb")):
        assert "jupytext" not in json.loads(path.read_text())["metadata"], path.name


def test_a_cell_run_while_a_panel_works_prints_into_its_own_output(capsys):
    """The panel's action writes into its log from its thread; a cell run meanwhile keeps its own prints."""
    import ipywidgets as widgets

    log, inside, release = widgets.Output(), threading.Event(), threading.Event()

    def work():
        with views.writing_into(log):
            print("from the panel's work")
            inside.set()
            release.wait(10)
            print("still the panel's")

    thread = threading.Thread(target=work)
    thread.start()
    assert inside.wait(10)
    print("from a cell")  # (the main thread, while the panel's work runs)
    release.set()
    thread.join(10)
    texts = "".join(o.get("text", "") for o in log.outputs)
    assert texts == "from the panel's work\nstill the panel's\n"
    assert capsys.readouterr().out == "from a cell\n"
