"""Pure functions behind the notebooks: config from widget values, platform detection, the token, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from dreambooth_nb import environment
from dreambooth_nb.notebook import views, platform, project as projects, settings, ui
from dreambooth_nb.config import TrainConfig, preset
from dreambooth_nb.errors import ConfigError, DataError
from subjects import with_subject

FAKE_TOKEN = "hf_FAKEdoNotLeak0123456789abcdefghijklmn"


@pytest.fixture
def base(tmp_path):
    return preset("object", instance_data_dir=str(tmp_path), instance_prompt="a photo of sks mug",
                  class_prompt="a photo of a mug", class_data_dir=str(tmp_path / "class"),
                  output_dir=str(tmp_path / "runs" / "run"))


# --- Config from widget values ---------------------------------------------------------------------------
def test_widget_values_round_trip_to_the_same_config(base):
    assert settings.config_from_widgets(settings.widget_values(base), base) == base


def test_config_from_widgets_applies_every_panel_field(base):
    values = {"learning_rate": 1e-6, "max_train_steps": 1200, "train_batch_size": 2,
              "gradient_accumulation_steps": 3, "with_prior_preservation": True, "prior_loss_weight": 0.5,
              "train_text_encoder": True, "use_8bit_adam": True, "gradient_checkpointing": True,
              "mixed_precision": "bf16", "snapshot_steps": "800, 400 400 1200 2000"}
    config = settings.config_from_widgets(values, base)
    for name, value in values.items():
        if name != "snapshot_steps":
            assert getattr(config, name) == value, name
    assert config.snapshot_steps == [400, 800]  # sorted, repeats gone, the last step and beyond dropped
    assert config.concepts == base.concepts  # untouched fields kept


def test_config_from_widgets_rounds_the_log_slider_to_its_readout(base):
    assert settings.config_from_widgets({"learning_rate": 1.9952623149688787e-06}, base).learning_rate == 2e-6
    assert settings.config_from_widgets({"learning_rate": 2.5e-6}, base).learning_rate == 2.5e-6


def test_a_config_json_of_an_earlier_version_is_refused_with_what_to_do(base, tmp_path):
    """Versions before the format number wrote none (and settings that are gone): no guessing at what they meant."""
    from dreambooth_nb.storage import FORMAT

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**base.to_dict(), "pre_compute_text_embeddings": True}))
    with pytest.raises(ConfigError, match=rf"written by an earlier version of dreambooth-nb \(format 1; this one reads "
                                          rf"format {FORMAT}\)\. Run notebook 1 again"):
        TrainConfig.from_json(path)
    base.to_json(path)
    assert json.loads(path.read_text())["format"] == FORMAT and TrainConfig.from_json(path) == base


@pytest.mark.parametrize("values, message", [
    ({"learning_rate": 0.5}, "learning_rate"),
    ({"snapshot_steps": "200, abc"}, "snapshot steps"),
    ({"no_such_field": 1}, "no_such_field"),
    ({"with_prior_preservation": True, "prior_loss_weight": -1.0}, "prior_loss_weight"),
])
def test_config_from_widgets_rejects_bad_values_with_the_field_name(base, values, message):
    with pytest.raises(ConfigError, match=message):
        settings.config_from_widgets(values, base)


def test_apply_parameters_keeps_setup_values_for_zero_and_empty(base):
    assert settings.apply_parameters(base, learning_rate=0.0, max_train_steps=0, snapshot_steps="") == \
        base.replace(snapshot_steps=settings.default_snapshot_steps(base.max_train_steps))
    changed = settings.apply_parameters(base, learning_rate=1e-6, max_train_steps=800, snapshot_steps="")
    assert (changed.learning_rate, changed.max_train_steps, changed.snapshot_steps) == (1e-6, 800, [400])
    explicit = settings.apply_parameters(base, max_train_steps=600, snapshot_steps="200, 600, 900")
    assert explicit.snapshot_steps == [200]
    # Early stop confirms a suggestion at a later snapshot: its default is every quarter, and it follows Steps.
    watched = settings.apply_parameters(base.replace(stop_when="suggested"), max_train_steps=800, snapshot_steps="")
    assert watched.snapshot_steps == [200, 400, 600]
    assert settings.adjust_snapshot_steps("200, 400, 600", old_steps=800, new_steps=1200) == ("300, 600, 900", "")
    assert settings.adjust_snapshot_steps("400", old_steps=800, new_steps=1200) == ("600", "")


def test_parse_lists():
    assert settings.parse_int_list("400, 800 1200,") == [400, 800, 1200]
    assert settings.parse_int_list("1, 0", allow_zero=True) == [0, 1]
    assert settings.parse_float_list("5e-6, 2e-6, 5e-6") == [5e-6, 2e-6]
    with pytest.raises(ConfigError, match="positive"):
        settings.parse_int_list("0")
    with pytest.raises(ConfigError, match="empty"):
        settings.parse_float_list(" ")
    with pytest.raises(ConfigError, match="'-1e-6'"):
        settings.parse_float_list("-1e-6")


def test_grid_axes():
    assert settings.grid_axes("step") == (("prompt", "seed"), ("run", "step"))
    assert settings.grid_axes("prompt") == (("run", "step"), "prompt")
    with pytest.raises(ConfigError):
        settings.grid_axes("seed")


# --- The panel (widgets built, no frontend needed) --------------------------------------------------------
def test_training_panel_builds_the_config_the_button_uses(base, tmp_path):
    project = projects.Project(tmp_path / "project")
    panel = ui.TrainingPanel(base.replace(learning_rate=1e-3, max_train_steps=4), run_dir_for=project.run_dir_for)
    assert panel.fields["learning_rate"].value == pytest.approx(1e-3)  # the slider range widened to hold it
    assert panel.fields["max_train_steps"].value == 4
    panel.fields["learning_rate"].value = 2e-6
    panel.fields["max_train_steps"].value = 400
    panel.fields["train_text_encoder"].value = True
    panel.fields["snapshot_steps"].value = "200"
    config = panel.config()
    assert (config.learning_rate, config.max_train_steps, config.snapshot_steps) == (2e-6, 400, [200])
    assert config.output_dir == str(project.runs_dir / "lr2e-6-te")
    assert set(settings.PANEL_FIELDS) == set(panel.values())


def test_the_panel_shows_the_memory_plan_of_its_settings(base, tiny_model, monkeypatch):
    panel = ui.TrainingPanel(base.replace(pretrained_model_name_or_path=str(tiny_model), resolution=32))
    assert "Memory plan:" in panel.memory.value and "on T4: fits" in panel.memory.value  # no GPU here: a T4
    seen = []
    monkeypatch.setattr(ui, "memory_line", lambda p: seen.append(p.values()["gradient_checkpointing"]) or "x")
    panel.fields["gradient_checkpointing"].value = not panel.fields["gradient_checkpointing"].value
    assert seen == [panel.fields["gradient_checkpointing"].value] and panel.memory.value == "x"


def test_the_panel_fits_the_savers_and_a_person_can_override_them(base, tiny_model):
    profile = preset("object", "16gb", pretrained_model_name_or_path=str(tiny_model), resolution=32,
                     concepts=base.concepts, output_dir=base.output_dir, fit_to_gpu=True)
    panel = ui.TrainingPanel(profile, gpu="T4")  # (the fit as the config says: notebook 1's choice)
    savers = ("gradient_checkpointing", "train_batch_size", "gradient_accumulation_steps", "use_8bit_adam")
    assert panel.fit_box.value and [panel.values()[k] for k in savers] == [False, 4, 1, False]
    assert "Fitted to T4: gradient checkpointing off, batch 4 × 1, Adam 32-bit" in panel.fit_note.value
    assert "0.93 → 1.14 it/s" in panel.fit_note.value  # why, with the source's numbers
    assert panel.config().cache_latents
    panel.fields["use_8bit_adam"].value = True  # a person's choice: the fit lets go
    assert not panel.fit_box.value and "Fit off" in panel.fit_note.value
    assert panel.config().use_8bit_adam and not panel.config().gradient_checkpointing
    panel.fields["train_text_encoder"].value = True  # other settings change: the savers stay as set
    assert panel.values()["use_8bit_adam"] is True
    panel.fit_box.value = True  # and back to the fit, which says what it changed since the config it opened with
    assert panel.values()["use_8bit_adam"] is False and "Fitted to T4" in panel.fit_note.value
    assert "batch: 1 × 4 → 4 × 1" in panel.fit_note.value and "Adam: 8-bit → 32-bit" in panel.fit_note.value
    kept = ui.TrainingPanel(profile, fit=False)
    assert [kept.values()[k] for k in savers] == [True, 1, 4, True] and not kept.fit_box.value


def test_the_train_button_shows_a_dreambooth_error_as_a_message(base, tmp_path, capsys):
    panel = ui.TrainingPanel(with_subject(base, instance_data_dir=str(tmp_path / "no-photos")).replace(max_train_steps=4))
    panel._clicked()  # what a click runs; the error must not escape into the kernel log
    panel.runner.join()
    assert "Error:" in panel.status.value and "instance_data_dir" in panel.status.value
    assert panel.button.disabled is False


def test_live_loss_moves_the_progress_bar_and_plots(base):
    import ipywidgets as widgets

    progress, status = widgets.IntProgress(max=10), widgets.HTML()
    live = views.LiveLoss(total=10, progress=progress, status=status, plot=None, history={"steps": [1], "losses": [0.5]})
    live(2, 0.25, 1e-6)
    assert progress.value == 2 and "step 2/10" in status.value and live.steps == [1, 2]
    png = views.loss_plot_png(live.steps, live.losses, total=10)
    assert png.startswith(b"\x89PNG")


def test_apply_parameters_takes_false_as_a_value(base):
    """`TRAIN_TEXT_ENCODER=False` turns it off; only None, empty text and a number 0 mean "keep"."""
    on = base.replace(train_text_encoder=True, with_prior_preservation=True)
    off = settings.apply_parameters(on, train_text_encoder=False, with_prior_preservation=False, learning_rate=0.0)
    assert (off.train_text_encoder, off.with_prior_preservation, off.learning_rate) == (False, False, base.learning_rate)
    assert settings.apply_parameters(on, train_text_encoder=None).train_text_encoder is True


@pytest.mark.parametrize("text,old,new,expected,note", [
    ("200", 400, 100, "50", ""),  # the default (halfway) follows the steps
    ("100, 300", 400, 200, "100", "Snapshot step(s) 300 dropped: past the new 200 steps"),
    ("100, 300", 400, 800, "100, 300", ""),
    ("", 400, 100, "", ""),
    ("abc", 400, 100, "abc", ""),  # left for Train to report
])
def test_snapshot_steps_follow_the_steps_slider(text, old, new, expected, note):
    assert settings.adjust_snapshot_steps(text, old_steps=old, new_steps=new) == (expected, note + (
        " (the last step is always saved)." if note else ""))


def test_the_panel_keeps_snapshot_steps_consistent_and_says_what_it_dropped(base):
    panel = ui.TrainingPanel(base.replace(max_train_steps=400, snapshot_steps=[100, 300]))
    panel.fields["max_train_steps"].value = 200
    assert panel.fields["snapshot_steps"].value == "100" and "300 dropped" in panel.note.value
    assert panel.config().snapshot_steps == [100]


def test_the_learning_rate_slider_spans_1e_7_to_1e_3_from_any_value(base):
    for lr in (1e-6, 1e-4, 1e-3):
        slider = ui.TrainingPanel(base.replace(learning_rate=lr)).fields["learning_rate"]
        assert (slider.min, slider.max) == (-7.0, -3.0) and slider.value == pytest.approx(lr)


def test_run_folders_name_the_exact_learning_rate(base, tmp_path):
    for lr, name in ((3.8e-5, "lr3.8e-5"), (1e-4, "lr1e-4"), (2e-6, "lr2e-6"), (1.25e-6, "lr1.25e-6")):
        assert projects.run_name(base.replace(learning_rate=lr)) == name
    assert projects.run_name(base.replace(method="lora", learning_rate=1e-4)) == "lr1e-4-lora"


def test_choosing_lora_in_the_panel_moves_the_learning_rate_to_what_lora_needs(base):
    panel = ui.TrainingPanel(base)
    panel.fields["method"].value = "lora"
    assert panel.fields["learning_rate"].value == pytest.approx(1e-4) and "1e-04" in panel.note.value
    config = panel.config()
    assert (config.method, config.learning_rate) == ("lora", 1e-4)
    panel.fields["method"].value = "full"
    assert panel.fields["learning_rate"].value == pytest.approx(base.learning_rate)


def test_setup_with_lora_uses_the_lora_preset(tmp_path):
    project = projects.Project(tmp_path)
    (tmp_path / "instance").mkdir()
    config = projects.setup_config(project, kind="face", method="lora", model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                                   instance_prompt="a photo of sks person", class_prompt="a photo of a person")
    assert (config.method, config.learning_rate, config.max_train_steps) == ("lora", 1e-4, 1200)
    with pytest.raises(ConfigError, match="METHOD"):
        projects.setup_config(project, method="dora", model="stable-diffusion-v1-5/stable-diffusion-v1-5", instance_prompt="x")


def test_the_live_plot_draws_the_validation_losses_of_each_snapshot(base, monkeypatch):
    import ipywidgets

    labels = []

    def capture(fig):
        labels.append([line.get_label() for line in fig.axes[0].get_lines()])
        return b"png"

    monkeypatch.setattr(views, "figure_png", capture)
    live = views.LiveLoss(total=10, plot=ipywidgets.Output(), history={"steps": [1, 2], "losses": [0.5, 0.4]})
    live.validation_point(2, {"fit": 0.2, "prior": 0.1})
    assert labels[-1] == ["loss per step", "validation: your photos", "validation: the class"]
    assert live.plot.outputs  # drawn at once, not at the next plot step


def test_the_loss_plot_marks_few_points_and_averages_only_many():
    from matplotlib.figure import Figure

    drawn = {}

    def capture(fig):
        ax = fig.axes[0]
        drawn["labels"] = [line.get_label() for line in ax.get_lines()]
        drawn["marker"] = ax.get_lines()[0].get_marker()
        return b"png"

    original = views.figure_png
    try:
        views.figure_png = capture
        views.loss_plot_png([1], [0.5], total=400)
        assert drawn["labels"] == ["loss per step"] and drawn["marker"] == "o"  # one point, visible
        views.loss_plot_png(list(range(1, 41)), [0.1] * 40, total=400)
        assert drawn["labels"] == ["loss per step", "average of 2 steps"] and drawn["marker"] == "None"
    finally:
        views.figure_png = original
    assert Figure  # (matplotlib present)


def test_stopping_the_kernel_while_training_says_where_and_how_to_resume(base, tmp_path, monkeypatch):
    """Colab's Stop button raises KeyboardInterrupt in the training loop: the panel shows one line — the
    step reached, the last state, 'press Train to resume' — not a traceback, and the rerun resumes."""
    import importlib

    from dreambooth_nb.toy.tiny import build_tiny_pipeline
    from photos import write_photos

    train_module = importlib.import_module("dreambooth_nb.training.train")
    model = build_tiny_pipeline(tmp_path / "model")
    config = with_subject(base, instance_data_dir=str(write_photos(tmp_path / "p"))).replace(
        pretrained_model_name_or_path=str(model), resolution=32, max_train_steps=6, checkpointing_steps=2,
        learning_rate=1e-4, train_batch_size=1)
    panel = ui.TrainingPanel(config)
    real = train_module.compute_loss
    calls = []

    def interrupt_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "compute_loss", interrupt_at_step_5)
    panel._clicked()  # what the Train button runs
    panel.runner.join()
    log = "".join(o.get("text", "") for o in panel.log.outputs)
    assert "Training stopped at step 4; the last saved state is state-000004 (step 4). Press Train to resume." \
        in panel.status.value
    assert "TrainingStopped: Training stopped at step 4" in log and "Traceback" not in log
    assert panel.button.disabled is False


# --- Project folder ---------------------------------------------------------------------------------------
def test_setup_config_applies_presets_and_choices(tmp_path):
    project = projects.Project(tmp_path)
    project.instance_dir.mkdir()
    face, report = projects.setup_config(project, kind="face", model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                                         instance_prompt="a photo of sks person", class_prompt="a photo of a person",
                                         resolution=512, gpu="T4", with_report=True)
    assert face.with_prior_preservation and face.learning_rate == 1e-6 and face.max_train_steps == 1200
    # Fit to the GPU (the default): from the 16 GB profile (1 × 2 accumulated, every saver on) to what fits a T4.
    assert (report.original.train_batch_size, report.original.gradient_accumulation_steps) == (1, 2)
    assert (face.train_batch_size, face.gradient_accumulation_steps) == (2, 1)
    assert face.use_8bit_adam and not face.gradient_checkpointing and face.cache_latents
    fixed = projects.setup_config(project, kind="face", fit_to_gpu=False, model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                                  instance_prompt="a photo of sks person", class_prompt="a photo of a person",
                                  resolution=512)
    # The fixed 16 GB profile (batch via accumulation, every saver on), and the choice saved for the panel.
    assert fixed == report.original.replace(fit_to_gpu=False) and face.fit_to_gpu and not fixed.fit_to_gpu
    assert ui.TrainingPanel(face).fit_box.value and not ui.TrainingPanel(fixed).fit_box.value
    assert face.snapshot_steps == [600]  # halfway, as notebook 3's panel starts: the summary says what happens
    assert "snapshots at [600]" in settings.config_summary(face)
    # Early stop: a snapshot every quarter, and what measuring each costs against the training between them.
    watched = projects.setup_config(project, kind="face", model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                                    instance_prompt="a photo of sks person", class_prompt="a photo of a person",
                                    resolution=512, gpu="T4", stop_when="suggested")
    assert watched.snapshot_steps == [300, 600, 900]
    assert re.search(r"stops by itself at the suggested snapshot: measuring a snapshot \(8 images × 50 sampling "
                     r"steps\) costs ≈ \d+% of the 300 training steps", settings.config_summary(watched))
    [subject] = face.concepts
    assert subject.class_data_dir == str(project.class_dir) and subject.instance_data_dir == str(project.instance_dir)
    obj = projects.setup_config(project, kind="object", fit_to_gpu=False, model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                                instance_prompt="a photo of sks mug", prior_preservation="on",
                                class_prompt="a photo of a mug", num_class_images=50, learning_rate=5e-6,
                                max_steps=800)
    assert obj.with_prior_preservation and obj.concepts[0].num_class_images == 50 and obj.effective_batch == 4
    assert (obj.learning_rate, obj.max_train_steps) == (5e-6, 800)
    with pytest.raises(ConfigError, match="PRESET"):
        projects.setup_config(project, kind="pet", model="stable-diffusion-v1-5/stable-diffusion-v1-5", instance_prompt="x")


def test_run_dir_for_resumes_the_same_settings_and_never_mixes_others(base, tmp_path):
    project = projects.Project(tmp_path / "p")
    first = project.run_dir_for(base)
    assert first.name == "lr2e-6"
    first.mkdir(parents=True)
    base.replace(output_dir=str(first)).to_json(first / "config.json")
    assert project.run_dir_for(base.replace(max_train_steps=800)) == first  # resumable change: same run
    other = project.run_dir_for(base.replace(seed=1))
    assert other.name == "lr2e-6-2"


def test_runs_lists_runs_with_snapshots(tmp_path):
    project = projects.Project(tmp_path)
    for folder in (project.runs_dir / "lr2e-6", project.sweeps_dir / "sweep" / "lr-5e-6"):
        (folder / "snapshots" / "step-000400").mkdir(parents=True)
        (folder / "snapshots" / "step-000400" / "model_index.json").write_text("{}")
        (folder / "config.json").write_text("{}")
    (project.runs_dir / "empty").mkdir()
    (project.runs_dir / "empty" / "config.json").write_text("{}")
    assert list(project.runs()) == ["lr2e-6", "sweeps/lr-5e-6"]
    assert list(project.select_runs("sweeps/lr-5e-6")) == ["sweeps/lr-5e-6"]
    with pytest.raises(ConfigError, match="nope"):
        project.select_runs("nope")
    with pytest.raises(DataError, match="Train first"):
        projects.Project(tmp_path / "fresh").select_runs()


def test_load_config_without_setup_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="Run notebook 01"):
        projects.Project(tmp_path).load_config()
    with pytest.raises(ConfigError, match="Run notebook 01"):
        projects.open_project(tmp_path / "missing", create=False)


# --- Platform -----------------------------------------------------------------------------------------------
def test_detect_platform(tmp_path):
    none = tmp_path / "no-kaggle"
    assert environment.detect_platform(modules={"google.colab": object()}, environ={}, kaggle_dir=none) == "colab"
    assert environment.detect_platform(modules={}, environ={"KAGGLE_KERNEL_RUN_TYPE": "Interactive"},
                                    kaggle_dir=none) == "kaggle"
    assert environment.detect_platform(modules={}, environ={}, kaggle_dir=tmp_path) == "kaggle"
    assert environment.detect_platform(modules={}, environ={}, kaggle_dir=none) == "local"


def test_project_dir_defaults_per_platform():
    assert platform.resolve_project_dir("", platform="colab") == Path("/content/drive/MyDrive/dreambooth")
    assert platform.resolve_project_dir(None, platform="kaggle") == Path("/kaggle/working/dreambooth")
    assert platform.resolve_project_dir("", platform="local") == Path("dreambooth-project")
    assert platform.resolve_project_dir("/data/x", platform="colab") == Path("/data/x")
    with pytest.raises(ConfigError, match="read-only"):
        platform.resolve_project_dir("/kaggle/input/photos", platform="kaggle")


def test_mount_drive_only_on_colab_for_drive_paths(tmp_path):
    assert platform.mount_drive_if_needed(Path("/content/drive/MyDrive/x"), platform="local") is False
    assert platform.mount_drive_if_needed(tmp_path, platform="colab") is False


def test_headless_detection():
    assert environment.is_headless(environ={}, kernel=SimpleNamespace(_allow_stdin=False)) is True
    assert environment.is_headless(environ={}, kernel=SimpleNamespace(_allow_stdin=True)) is False
    assert environment.is_headless(environ={"DREAMBOOTH_NB_HEADLESS": "1"}, kernel=SimpleNamespace(_allow_stdin=True))
    assert not environment.is_headless(environ={"DREAMBOOTH_NB_HEADLESS": "0"}, kernel=SimpleNamespace(_allow_stdin=False))
    assert environment.is_headless(environ={}) is True  # plain Python: no kernel, nobody to click


def test_environment_report_on_cpu():
    env = platform.check_environment(probe=False)
    assert env.platform in ("local", "colab", "kaggle")
    text = env.summary()
    assert "8-bit Adam" in text and "xformers" in text


def test_upload_elsewhere_than_colab_only_says_where(tmp_path, capsys):
    assert platform.upload_photos(tmp_path / "photos", platform="local") == []
    assert "Put your photos into" in capsys.readouterr().out
    (tmp_path / "photos" / "a.png").write_bytes(b"x")
    assert platform.upload_photos(tmp_path / "photos", platform="local") == []
    assert capsys.readouterr().out == ""  # a folder with photos is left alone


# --- The Hugging Face token never shows -----------------------------------------------------------------------
def test_hf_login_from_env_never_prints_or_saves_the_token(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(platform, "_whoami", lambda token: "someone")
    env = {"HF_TOKEN": FAKE_TOKEN}
    assert platform.hf_login(environ=env) is True
    out = capsys.readouterr()
    assert "someone" in out.out and FAKE_TOKEN not in out.out + out.err and "hf_FAKE" not in out.out + out.err
    assert not any(FAKE_TOKEN.encode() in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_hf_login_from_the_prompt_sets_the_session_only(monkeypatch, capsys):
    monkeypatch.setattr(platform, "_whoami", lambda token: None)
    monkeypatch.setattr(environment, "_colab_secret", lambda name: None)
    monkeypatch.setattr(environment, "_kaggle_secret", lambda name: None)
    env: dict = {}
    assert platform.hf_login(environ=env, ask=lambda prompt: f" {FAKE_TOKEN} \n") is True
    assert env["HF_TOKEN"] == FAKE_TOKEN
    assert "hf_FAKE" not in capsys.readouterr().out


def test_hf_login_offline_verification_never_echoes_the_token(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert platform.hf_login(environ={"HF_TOKEN": FAKE_TOKEN}) is True  # whoami fails offline: no user shown
    out = capsys.readouterr()
    assert "hf_FAKE" not in out.out + out.err


def test_hf_login_headless_without_a_token_skips(monkeypatch, capsys):
    monkeypatch.setattr(environment, "_colab_secret", lambda name: None)
    monkeypatch.setattr(environment, "_kaggle_secret", lambda name: None)
    assert platform.hf_login(environ={"DREAMBOOTH_NB_HEADLESS": "1"}) is False
    assert "No Hugging Face token" in capsys.readouterr().out


# --- Errors: the message, not a stack trace -------------------------------------------------------------------
def test_dreambooth_errors_show_as_their_message_and_still_fail(capsys):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        assert views.show_errors_as_messages(shell) is True
        result = shell.run_cell("from dreambooth_nb.errors import ConfigError\n"
                                "def deep():\n    raise ConfigError('learning_rate: 1.0 is out of range')\ndeep()")
        assert not result.success and isinstance(result.error_in_exec, ConfigError)
        out = capsys.readouterr().out
        assert "ConfigError: learning_rate: 1.0 is out of range" in out
        assert "Traceback" not in out and "deep()" not in out
        result = shell.run_cell("1 / 0")  # a bug keeps its full traceback
        assert not result.success
        assert "ZeroDivisionError" in capsys.readouterr().out
    finally:
        shell.set_custom_exc((), None)
        InteractiveShell.clear_instance()


def test_show_errors_outside_ipython_is_harmless():
    assert views.show_errors_as_messages(None) in (True, False)


def test_the_gpus_choice_trains_data_parallel_and_shows_the_effective_batch(make_config):
    """With several GPUs (here 2 CPU processes, gloo) the panel offers them all by default, keeps the preset's
    images per step (split among the GPUs), shows batch × accumulation × GPUs, and Train launches that many
    processes; with one GPU there is nothing to choose."""
    config = make_config(max_train_steps=2, train_batch_size=2, snapshot_steps=[])
    single = ui.TrainingPanel(config, fit=False, processes=1)
    assert single.fields["num_processes"].layout.display == "none" and single.config().num_processes == 1
    assert "Effective batch: 2 × 1 accumulated = 2 photos per step" in single.batch_note.value
    panel = ui.TrainingPanel(config, fit=False, processes=2, sample_seeds=(0,), sample_steps=2)
    assert panel.fields["num_processes"].options == (1, 2) and panel.fields["num_processes"].value == 2
    assert panel.fields["num_processes"].layout.display != "none"
    # Two GPUs by default, with the config's 2 images per step: 1 on each, not 2 on each.
    assert "1 × 1 accumulated × 2 GPUs = 2 photos per step" in panel.batch_note.value
    assert panel.config().effective_batch == config.effective_batch == 2
    assert ui.TrainingPanel(make_config(train_batch_size=1, gradient_accumulation_steps=4), fit=False,
                            processes=2).config().effective_batch == 4  # the 16gb profile: 1 × 2 on each GPU
    panel.fields["num_processes"].value = 1  # one GPU again: the same images per step (accumulated; the fit,
    assert "1 × 2 accumulated = 2 photos per step" in panel.batch_note.value  # when on, makes it a batch)
    panel.fields["num_processes"].value = 2
    assert "1 × 1 accumulated × 2 GPUs = 2 photos per step" in panel.batch_note.value
    panel.fields["train_batch_size"].value = 2  # a person's choice: 2 per GPU
    assert "2 × 1 accumulated × 2 GPUs = 4 photos per step" in panel.batch_note.value
    panel.fields["gradient_accumulation_steps"].value = 3
    assert "2 × 3 accumulated × 2 GPUs = 12" in panel.batch_note.value
    panel.fields["gradient_accumulation_steps"].value = 1
    assert panel.config().num_processes == 2 and panel.config().train_batch_size == 2  # the batch is per GPU
    panel._clicked()
    panel.runner.join()
    log = "".join(o.get("text", "") for o in panel.log.outputs)
    assert "Training in 2 processes (effective batch 4)." in log
    saved = json.loads((Path(config.output_dir) / "config.json").read_text())
    assert (saved["num_processes"], saved["train_batch_size"]) == (2, 2) and panel.final is not None
