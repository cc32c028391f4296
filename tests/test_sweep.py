"""The LR × steps sweep on the tiny model: runs, snapshots, one grid in row-major order, free reruns; compare()."""

import json
import shutil
import sys

import pytest

from dreambooth_nb import EvalSpec, compare, sweep
from dreambooth_nb.model import loading as models, snapshots
from dreambooth_nb.training import priors
from dreambooth_nb import storage
from dreambooth_nb.errors import ConfigError
from dreambooth_nb.results.sweep import run_folder


def refuse(*args, **kwargs):
    raise AssertionError("a model was loaded on a rerun that had nothing left to do")


def test_sweep_trains_renders_draws_and_reruns_for_free(make_config, monkeypatch, tmp_path):
    config = make_config(output_dir=str(tmp_path / "project"), seed=1)
    spec = EvalSpec(prompts=["a photo of sks dog"], seeds=[0], num_inference_steps=2)
    steps_seen = []
    result = sweep(config, lrs=(5e-4, 1e-4), save_at=(4, 2), spec=spec,
                   on_step=lambda step, loss, lr: steps_seen.append((step, lr)))

    assert result.runs == [run_folder(config.output_dir, 5e-4), run_folder(config.output_dir, 1e-4)]
    assert result.runs[0].name == "lr5e-4" and result.lrs == [5e-4, 1e-4]  # named as training runs are
    assert [s for s, _ in steps_seen] == [1, 2, 3, 4, 1, 2, 3, 4]
    for lr, run in zip(result.lrs, result.runs):
        assert [s for s, _ in storage.list_snapshots(run)] == [2, 4]
        assert json.loads((run / "config.json").read_text())["learning_rate"] == lr

    assert result.grid == tmp_path / "project" / "sweep-grid-lr5e-4_1e-4-steps2_4.png" and result.grid.is_file()
    assert result.sidecar == result.grid.with_suffix(".json")
    side = json.loads(result.sidecar.read_text())
    # The base model's column, then each rate's steps side by side; a row per prompt and seed.
    assert side["rows"] == ["prompt", "seed"] and side["cols"] == ["run", "step"]
    assert side["row_labels"] == [["a photo of sks dog", 0]]
    assert side["col_labels"] == [["base model", 0], ["LR 5e-4", 2], ["LR 5e-4", 4], ["LR 1e-4", 2], ["LR 1e-4", 4]]
    cells = [(c["row"], c["col"], c["labels"]["lr"], c["labels"]["step"]) for c in side["cells"]]
    assert cells == [(0, 0, None, 0), (0, 1, 5e-4, 2), (0, 2, 5e-4, 4), (0, 3, 1e-4, 2), (0, 4, 1e-4, 4)]
    images = [c["image"] for c in side["cells"]]
    assert len(set(images)) == 5 and all(str(result.runs[(i - 1) // 2]) in images[i] for i in range(1, 5))
    assert str(tmp_path / "project" / "sweep" / "base-renders") in images[0]
    assert "quality" in side  # None here: DINOv2 and CLIP cannot be fetched offline (tests/test_quality.py)

    # Rerun: every run is finished and every image rendered, so no model of any kind is loaded.
    mtimes = {p: p.stat().st_mtime_ns for run in result.runs for _, p in storage.list_snapshots(run)}
    monkeypatch.setattr(models, "load_components", refuse)
    monkeypatch.setattr(snapshots, "load_pipeline", refuse)
    again = sweep(config, lrs=(5e-4, 1e-4), save_at=(2, 4), spec=spec)
    assert json.loads(again.sidecar.read_text()) == side
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    # compare() over the same two runs: runs as given, the cached renders (the base model's too) reused.
    grid = compare(result.runs, spec, title="two runs")
    assert grid.parent == tmp_path / "project" / "sweep" / "grids"
    side = json.loads(grid.with_suffix(".json").read_text())
    assert side["col_labels"] == [["base model", 0], ["lr5e-4", 2], ["lr5e-4", 4], ["lr1e-4", 2], ["lr1e-4", 4]]
    assert [c["image"] for c in side["cells"]] == images

    # Steps filter, runs down and steps across, an explicit snapshot folder, a step one run lacks (empty cell).
    explicit = storage.snapshot_path(result.runs[1], 2)
    grid = compare({"fast": result.runs[0], "slow@2": explicit}, spec, rows="run", cols="step", steps=[4, 2],
                   out=tmp_path / "mine.png", base=False)
    side = json.loads(grid.with_suffix(".json").read_text())
    assert grid == tmp_path / "mine.png"
    assert [(c["row"], c["col"], c["labels"]["run"]) for c in side["cells"]] == [(0, 0, "fast"), (0, 1, "fast"),
                                                                                 (1, 0, "slow@2")]

    # Several prompts and seeds: none dropped; prompts across, runs × steps × seeds down.
    monkeypatch.undo()
    wide = EvalSpec(prompts=["a photo of sks dog", "a photo of a cat"], seeds=[0, 1], num_inference_steps=2)
    grid = compare(result.runs, wide, rows=("run", "step"), cols="prompt", steps=[4])
    side = json.loads(grid.with_suffix(".json").read_text())
    assert side["rows"] == ["run", "step", "seed"] and side["shape"] == [6, 2] and len(side["cells"]) == 12
    assert side["row_labels"][:3] == [["base model", 0, 0], ["base model", 0, 1], ["lr5e-4", 4, 0]]


def test_sweep_argument_errors(make_config):
    config = make_config()
    with pytest.raises(ConfigError, match="lrs"):
        sweep(config, lrs=())
    with pytest.raises(ConfigError, match="same learning rate twice"):
        sweep(config, lrs=(2e-6, 2e-6))
    with pytest.raises(ConfigError, match="lrs"):
        sweep(config, lrs=(0.5,))
    with pytest.raises(ConfigError, match="save_at"):
        sweep(config, save_at=(0, 4))


def test_sweep_passes_each_run_to_train_and_makes_class_images_first(make_config, tiny_model, monkeypatch, tmp_path):
    """With prior preservation the class images exist before the first run; each run gets its overrides."""
    module = sys.modules["dreambooth_nb.results.sweep"]  # `dreambooth_nb.results.sweep` the attribute is the function
    events = []
    real_generate = priors.generate_class_images

    def generate(config, **kwargs):
        events.append(("class images", config.concepts[0].class_data_dir))
        return real_generate(config, **kwargs)

    def fake_train(config, *, on_step=None):  # stands in for train(): writes the snapshots it would
        events.append(("train", config.learning_rate, config.max_train_steps, config.snapshot_steps,
                       config.output_dir, sorted(p.name for p in (tmp_path / "class").glob("*.png"))))
        for step in config.snapshot_steps:
            shutil.copytree(tiny_model, storage.snapshot_path(config.output_dir, step))
        config.to_json(f"{config.output_dir}/config.json")
        return storage.snapshot_path(config.output_dir, config.max_train_steps)

    monkeypatch.setattr(priors, "generate_class_images", generate)
    monkeypatch.setattr(module, "train", fake_train)
    config = make_config(output_dir=str(tmp_path / "p"), with_prior_preservation=True, class_prompt="a photo of a dog",
                         class_data_dir=str(tmp_path / "class"), num_class_images=2, sample_batch_size=2,
                         snapshot_steps=[1], max_train_steps=3)
    spec = EvalSpec(prompts=["a photo of sks dog"], seeds=[0], num_inference_steps=2)
    result = sweep(config, lrs=(2e-6, 1e-6), save_at=(6, 3), spec=spec)
    images = ["class-00000.png", "class-00001.png"]
    assert events == [("class images", str(tmp_path / "class")),
                      ("train", 2e-6, 6, [3, 6], str(tmp_path / "p" / "sweep" / "lr2e-6"), images),
                      ("train", 1e-6, 6, [3, 6], str(tmp_path / "p" / "sweep" / "lr1e-6"), images)]
    side = json.loads(result.sidecar.read_text())
    assert [(c["labels"]["lr"], c["labels"]["step"]) for c in side["cells"]] == [(None, 0), (2e-6, 3), (2e-6, 6),
                                                                                  (1e-6, 3), (1e-6, 6)]


def test_sweep_runs_share_one_latent_cache(make_config, tmp_path):
    config = make_config(output_dir=str(tmp_path / "project"), cache_latents=True)
    spec = EvalSpec(prompts=["a photo of sks dog"], seeds=[0], num_inference_steps=2)
    sweep(config, lrs=(5e-4, 1e-4), save_at=(2,), spec=spec)
    cache = tmp_path / "project" / "latent-cache"
    assert len(list(cache.glob("*.safetensors"))) == 4  # four photos encoded once, not once per run
    for lr in (5e-4, 1e-4):
        saved = json.loads((run_folder(config.output_dir, lr) / "config.json").read_text())
        assert saved["latent_cache_dir"] == str(cache)


def test_each_sweep_keeps_its_grid_and_an_earlier_sweep_goes_on_in_its_folder(tmp_path):
    """Other rates or steps: another grid file; a sweep begun by an earlier version (`lr-5e-6`) keeps its folder."""
    from dreambooth_nb.results.sweep import grid_path

    first = grid_path(tmp_path, lrs=[5e-6, 2e-6], save_at=[400, 800])
    assert first.name == "sweep-grid-lr5e-6_2e-6-steps400_800.png"
    assert grid_path(tmp_path, lrs=[1e-6], save_at=[400, 800]) != first
    assert run_folder(tmp_path, 5e-6) == tmp_path / "sweep" / "lr5e-6"
    (tmp_path / "sweep" / "lr-5e-6").mkdir(parents=True)
    assert run_folder(tmp_path, 5e-6) == tmp_path / "sweep" / "lr-5e-6"
