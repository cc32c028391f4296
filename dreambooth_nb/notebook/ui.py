"""The notebooks' panels: training, comparison, sweep and notebook 1's photo table, each with its long action run
stoppably (`Runner`).

The rule: widgets only *collect values*. A plain function (`settings.config_from_widgets`) turns those values
into a `TrainConfig`, and the Train button and a headless run call the very same code path
(`TrainingPanel.train`), so what a test executes is what a user's click executes. What they draw and print
goes through `display`.

Only ipywidgets API common to 7.7 (Colab) and 8 is used.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from dreambooth_nb.units import gib
from dreambooth_nb.config import MIXED_PRECISION, Concept, TrainConfig
from dreambooth_nb.dataset.audit import audit, summary as audit_summary
from dreambooth_nb.dataset.captions import DEFAULT_MODEL as CAPTIONER, Captioner, Draft, draft_captions
from dreambooth_nb.dataset.crop import centre_crop_box
from dreambooth_nb.dataset.images import CAPTION_SUFFIX, ImageError, load_image, scan_images
from dreambooth_nb.dataset.masks import Segmenter, subject_masks
from dreambooth_nb.environment import is_headless
from dreambooth_nb.model.methods import METHODS
from dreambooth_nb.model.objectives import Diffusion
from dreambooth_nb.errors import ActionStopped, ConfigError, DreamboothError, TrainingStopped
from dreambooth_nb.notebook.views import (Fallback, LiveLoss, RunsLoss, loss_plot_png, photo_thumbnail,
                                           replace_outputs, show_png, show_rendered, writing_into)
from dreambooth_nb.notebook.settings import (COLUMN_CHOICES, adjust_snapshot_steps, batch_line,
                                            config_from_widgets, grid_axes, method_learning_rate, parse_float_list,
                                            parse_int_list, widget_values, with_savers_of)
from dreambooth_nb.planning.fitting import fit_report, previous_run
from dreambooth_nb.planning.memory import out_of_memory_record
from dreambooth_nb.planning.planner import plan
from dreambooth_nb.progress import Task, running, stop_tasks_on_interrupt
from dreambooth_nb.results import quality
from dreambooth_nb.results.compare import compare
from dreambooth_nb.results.evaluate import EvalSpec, render, render_dir
from dreambooth_nb.results.sweep import run_folder, sweep
from dreambooth_nb.storage import atomic_write_text, latest_state, list_snapshots
from dreambooth_nb.training.data import mask_cache_dir
from dreambooth_nb.training.distributed import for_processes, visible_gpus
from dreambooth_nb.results.early_stop import train


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


class _Panel:
    """What every panel does alike: it shows itself (with a static copy for a saved notebook, `Fallback`), and
    `start()` does its action (`_act`: train, draw, run) as its button does — in the background, so that Stop
    works; headless, here and now. A panel has `box`, `fallback`, and `_clicked` for its button."""

    def show(self):
        from IPython.display import display

        display(self.box)
        self.fallback.show()
        return self

    def start(self) -> None:
        if is_headless():
            self._act()
        else:
            self._clicked()


class TrainingPanel(_Panel):
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

    def _act(self):
        return self.train()

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
        subjects = config.concepts
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
        with writing_into(output):
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


def _say_errors(log, work) -> None:
    """Run a button's `work` with its prints in `log`: our errors as their message, a bug with its traceback
    there — never in JupyterLab's log console, where nobody looks (a thread's exception would land there)."""
    with writing_into(log):
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


FIT_OFF_NOTE = ("<i>Fit off: the memory savers are yours as set (tick “Fit the memory savers to this GPU” to "
                "let the memory plan choose the fastest that fit).</i>")


def fit_html(report) -> str:
    """The training panel's account of a fit: what it turned on or off and why, the plan before and after."""
    colour = "#2e7d32" if report.fits else "#c62828"
    items = "".join(f"<li>{html.escape(choice.line())}</li>" for choice in report.choices)
    items += "".join(f"<li>{html.escape(line)}</li>" for line in report.resumed + report.notes)
    return (f"<span style='color:{colour}'>{html.escape(report.headline())}</span>"
            f"<ul style='margin:0'>{items}</ul>")


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


class ComparePanel(_Panel):
    """Scheduler, inference steps, guidance and layout widgets, a Draw button and a Stop button over `compare`.

    `runs`: {name: run folder}, or a function giving them (`project.select_runs`), asked again at every Draw so
    that a run trained since is drawn too. `samplers`: (label, name) the scheduler box offers
    (`settings.sampler_choices`: a flow model has its own alone). `draw()` draws here and now (a cell); `start()` draws as the button
    does, in the background, where a person can press Stop (headless: here and now).
    """

    def __init__(self, runs, spec, *, out_dir, columns: str = "step", title: str | None = None,
                 samplers=Diffusion.choices):
        import ipywidgets as widgets

        self.runs_for = runs if callable(runs) else (lambda: runs)
        self.base_spec, self.out_dir, self.title = spec, Path(out_dir), title
        style, layout = {"description_width": "150px"}, widgets.Layout(width="520px")
        # (wide enough for "DDIM (recommended)": the default width cut it to "DDIM (recommende")
        self.scheduler = widgets.Dropdown(options=list(samplers), value=spec.scheduler, description="Scheduler",
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

    def draw(self) -> Path:
        """Draw the grid with the panel's settings into the panel (replacing the last one); return its PNG. The
        kernel's interrupt stops it at the next image (rendered images are kept: drawing again goes on)."""
        return self.runner.run(self._draw_and_say)

    def _act(self):
        return self.draw()

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
            replace_outputs(self.view, HTML("<i>Drawing a new grid; below, the previous one.</i>"),
                             Image(filename=str(self.grid)))
        self.status.value = f"Drawing {len(runs)} run(s) with {html.escape(sampler)}…"
        with writing_into(self.output):
            print(f"{len(runs)} run(s): {', '.join(runs)}; {sampler}, seeds {spec.seeds}. Rendered "
                  "images are cached: redrawing with the same settings is instant.")
            title = f"{self.title} · {sampler}" if self.title else sampler
            self.grid = compare(runs, spec, rows=rows, cols=cols, out=self.out_dir, title=title)
            print(f"Saved {self.grid} (+ {self.grid.with_suffix('.json').name})")
            report, plot = quality.read(self.grid)
            print(quality.summary(report))
        images = [self.grid, *([plot] if plot else [])]
        replace_outputs(self.view, *(Image(filename=str(path)) for path in images))
        self.progress.description, self.progress.value = "Done", self.progress.max
        self.status.value = f"Done: {html.escape(self.grid.name)} ({len(runs)} run(s), {html.escape(sampler)})."
        self.fallback.update(status=self.status.value, images=images)
        return self.grid


class SweepPanel(_Panel):
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

    def run(self, *, output=None):
        """Run the sweep here and now (a cell, a headless run); the kernel's interrupt stops it at the next step
        or image (trained steps are kept as states; running it again goes on)."""
        return self.runner.run(lambda: self._run_and_say(output=output))

    def _act(self):
        return self.run()

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
        live = RunsLoss(total=total, progress=self.progress, status=self.status, plot=self.plot,
                         plot_every=max(1, total // 10),
                         finished=_finished_losses({f"lr {lr:.1e}": run_folder(config.output_dir, lr) for lr in lrs}))
        with writing_into(output):
            print(f"Sweep: learning rates {lrs} × snapshots at steps {save_at} into {config.output_dir}")
            self.result = sweep(config, lrs=lrs, save_at=save_at, spec=self.spec, on_step=live)
            print(f"Saved {self.result.grid}")
            report, plot = quality.read(self.result.grid)
            print(quality.summary(report))
        live.redraw()
        images = [self.result.grid, *([plot] if plot else [])]
        replace_outputs(self.view, *(Image(filename=str(path)) for path in images))
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


# --- Notebook 1's photo table ---------------------------------------------------------------------------------
class PhotoTable(_Panel):
    """A subject's photos, one row each: the photo as training sees it, its caption, and what the audit found.

    The thumbnail tints the background where the photo's mask says (`photo.mask.png`, or an automatic mask that
    "Make masks" made and cached where training reads it, `training.data.mask_cache_dir`) and outlines the square
    training keeps of a photo that is not square. The caption box is the photo's `photo.txt`: edit it and it is
    saved as you leave the box (emptied, the file goes and the photo trains with the instance prompt). The notes
    are `dataset.audit`'s findings for the photo (near-duplicates, a small or cut-off subject, the aspect ratio, a
    low resolution) and what drafting made of it; nothing is ever deleted.

    "Draft captions" (`draft()`) writes a caption for every photo that has none with `captioner` (Florence-2 base:
    `dataset.captions`), the subject's noun phrase as `[trigger]`; a caption already there is never touched.
    "Make masks" (`make_masks()`, shown with `masked_loss`) masks the photos without a mask file with the config's
    `mask_segmenter`, as training would. Both run in the background, where Stop (or the kernel's ■) ends them at
    the next batch of photos, keeping what is done; headless, here and now.
    """

    def __init__(self, config: TrainConfig, *, subject: Concept | None = None, captioner: str = CAPTIONER,
                 duplicates_by: str = "thumbnails", size: int = 160):
        import functools

        import ipywidgets as widgets

        self.config, self.subject = config, subject or config.concepts[0]
        self.captioner, self.size = captioner, size
        report = scan_images(self.subject.instance_data_dir, resolution=config.resolution)
        self.photos = report.usable
        self.images = [load_image(photo, max_side=config.resolution) for photo in self.photos]
        self.embed = self._embeddings(duplicates_by)
        self.drafts: dict[Path, Draft] = {}
        self.findings: list = []
        self._writing = False  # (a box filled by drafting is not an edit to save again)
        no_caption = f"No caption: trains as “{self.subject.instance_prompt}”."
        self.captions = [widgets.Textarea(value=report.captions.get(photo, ""), placeholder=no_caption,
                                          continuous_update=False, layout=widgets.Layout(width="380px", height="70px"))
                         for photo in self.photos]
        for photo, box in zip(self.photos, self.captions):
            box.observe(functools.partial(self._edited, photo), names="value")
        self.thumbnails = [widgets.Image(format="png", width=size) for _ in self.photos]
        self.notes = [widgets.HTML(layout=widgets.Layout(width="420px")) for _ in self.photos]
        self.summary = widgets.HTML()
        self.button = widgets.Button(description="Draft captions", button_style="primary", icon="pencil",
                                     tooltip="Caption every photo that has no caption yet (existing ones stay)")
        self.mask_button = widgets.Button(description="Make masks", icon="paint-brush",
                                          tooltip="Mask the photos without photo.mask.png, as training will",
                                          layout=widgets.Layout(display=None if config.masked_loss else "none"))
        self.button.on_click(self._clicked)
        self.mask_button.on_click(self._mask_clicked)
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="Progress")
        self.status = widgets.HTML(value="Edit a caption and it is saved as you leave its box.")
        self.output = widgets.Output()
        self.runner = Runner(button=self.button, progress=self.progress, status=self.status)
        self.fallback = Fallback("photo table")
        rows = [widgets.HBox([thumbnail, caption, note])
                for thumbnail, caption, note in zip(self.thumbnails, self.captions, self.notes)]
        self.box = widgets.VBox([self.summary, *rows,
                                 widgets.HBox([self.button, self.mask_button, self.runner.stop_button]),
                                 self.progress, self.status, self.output, self.fallback.hider()])
        self.refresh()

    # --- what the table shows
    def _embeddings(self, duplicates_by: str):
        """How the audit compares photos: "thumbnails" (offline, `audit.thumbnail_similarity`), or "DINOv2" — the
        comparison's image model (a download once, `quality.EmbeddingJudge`), each photo embedded once here."""
        if duplicates_by == "thumbnails":
            return None
        if duplicates_by != "DINOv2":
            raise ConfigError(f"NEAR_DUPLICATES: {duplicates_by!r} is unknown; choose 'thumbnails' or 'DINOv2'.")
        vectors = quality.EmbeddingJudge.standard().image_embeddings(self.images)
        row = {id(image): i for i, image in enumerate(self.images)}
        return lambda images: vectors[[row[id(image)] for image in images]]

    def masks(self, *, make: bool = False) -> list:
        """Each photo's mask (`masks.Mask`) or None: the files and cached automatic masks; `make` makes the rest."""
        return subject_masks(self.photos, self.images, word=self.subject.class_noun, make=make,
                             segmenter=Segmenter.loader(self.config.mask_segmenter), cache_dir=mask_cache_dir(self.config))

    def refresh(self) -> None:
        """Thumbnails, notes and the summary from what is on disk now (captions, masks) and the audit."""
        try:
            masks = self.masks()
            mask_error = None
        except ImageError as err:  # a mask file to fix: named, and the table still shows the photos
            masks, mask_error = [None] * len(self.photos), err
        self.findings = audit(self.photos, self.images, resolution=self.config.resolution, embed=self.embed,
                              masks=[mask.image if mask else None for mask in masks])
        for i, (photo, image, mask) in enumerate(zip(self.photos, self.images, masks)):
            crop = centre_crop_box(image.size, self.config.resolution)
            self.thumbnails[i].value = photo_thumbnail(image, mask=mask.image if mask else None, crop=crop,
                                                       size=self.size)
            self.notes[i].value = self._notes(photo, mask)
        self._masked, self._mask_error = sum(m is not None for m in masks), mask_error
        self._summarize()

    def _summarize(self) -> None:
        """The line above the table (and the saved notebook's copy of it): counts and the audit's verdict."""
        captioned = sum(bool(box.value.strip()) for box in self.captions)
        lines = [f"<b>{len(self.photos)} photos</b> of “{html.escape(self.subject.instance_prompt)}”: "
                 f"{captioned} with a caption, {self._masked} with a mask"
                 + (" (the tinted part is background, weighted "
                    f"{self.config.mask_background_weight:g} in the loss)" if self.config.masked_loss else "")
                 + ". Audit: " + (f"{len(self.findings)} thing(s) to look at, beside their photos; nothing was "
                                  "changed or deleted." if self.findings else "nothing to fix.")]
        if self._mask_error is not None:
            lines.append(f"<b style='color:#c00'>Mask:</b> {html.escape(str(self._mask_error))}")
        self.summary.value = "<br>".join(lines)
        self.fallback.update(status=self.summary.value + "<pre>" + html.escape(audit_summary(self.findings)) + "</pre>")

    def _notes(self, photo: Path, mask) -> str:
        notes = [f"<b>{html.escape(f.kind)}</b>: {html.escape(f.message)}" for f in self.findings if photo in f.photos]
        draft = self.drafts.get(photo)
        if draft is not None and draft.written:
            notes.append("Drafted." if draft.found_subject else
                         f"Drafted; “{html.escape(self.subject.class_noun)}” was not in the caption: put [trigger] "
                         "where the subject is named.")
        if self.config.masked_loss:
            notes.append({None: "No mask yet: Make masks (or put a photo.mask.png beside it).",
                          "file": "Mask: its own file.", "auto": "Mask: made automatically (cached)."}[
                              mask.source if mask else None])
        return "<br>".join(notes) or "<span style='color:#2e7d32'>Looks fine.</span>"

    def _edited(self, photo: Path, change) -> None:
        if self._writing:
            return
        text = " ".join(change["new"].split())
        path = photo.with_suffix(CAPTION_SUFFIX)
        if text:
            atomic_write_text(path, text + "\n")  # (as drafted captions are written)
            self.status.value = f"Saved {html.escape(path.name)}."
        else:
            path.unlink(missing_ok=True)
            self.status.value = f"Removed {html.escape(path.name)}: {html.escape(photo.name)} trains with the instance prompt."
        self._summarize()  # (a caption changes no thumbnail and no finding)

    # --- the actions
    def draft(self) -> dict:
        """Draft the missing captions here and now (what the button does, in the background); {photo: Draft}."""
        return self.runner.run(self._draft_and_say)

    def make_masks(self) -> list:
        """Make the missing masks here and now (what "Make masks" does, in the background)."""
        return self.runner.run(self._masks_and_say)

    def _act(self):
        return self.draft()

    def _clicked(self, _button=None) -> None:
        self.output.outputs = ()
        self.runner.start(lambda: _say_errors(self.output, self._draft_and_say))

    def _mask_clicked(self, _button=None) -> None:
        self.output.outputs = ()
        self.runner.start(lambda: _say_errors(self.output, self._masks_and_say))

    def _draft_and_say(self) -> dict:
        return self._said(self._draft, stopped="Drafting stopped; the captions written so far are kept.")

    def _masks_and_say(self) -> list:
        return self._said(lambda: self.masks(make=True), stopped="Masking stopped; nothing was half-written.")

    def _said(self, work, *, stopped: str):
        """`work()`, then the table redrawn and the status set; a stop or an error said in the status line."""
        self.mask_button.disabled = True
        try:
            result = work()
        except KeyboardInterrupt:
            err = ActionStopped(stopped)
        except DreamboothError as error:
            err = error
        else:
            err = None
        finally:
            self.mask_button.disabled = False
            self.refresh()
        if err is not None:
            self.status.value = _failure_html(err)
            raise err
        self.progress.description, self.progress.value = "Done", self.progress.max
        return result

    def _draft(self) -> dict:
        drafts = draft_captions(self.photos, class_noun=self.subject.class_noun,
                                captioner=lambda: Captioner.load(self.captioner))
        self._writing = True
        try:
            for draft in drafts:
                self.drafts[draft.photo] = draft
                if draft.written:
                    self.captions[self.photos.index(draft.photo)].value = draft.text
        finally:
            self._writing = False
        written = [d for d in drafts if d.written]
        self.status.value = (f"Drafted {len(written)} caption(s) ({len(drafts) - len(written)} photo(s) had one): read "
                             f"and edit them; [trigger] stands for “{html.escape(self.subject.instance_prompt)}”."
                             if written else "Every photo has a caption already: nothing drafted.")
        return {draft.photo: draft for draft in drafts}
