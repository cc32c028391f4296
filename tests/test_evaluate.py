"""EvalSpec validation and JSON form; render(): cached, deterministic, lazy, any of the three samplers."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from dreambooth_nb.model import snapshots
from dreambooth_nb.errors import ConfigError, DataError
from dreambooth_nb.results.evaluate import EvalSpec, render, render_dir
from dreambooth_nb.model.snapshots import native_resolution


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture
def snapshot(tiny_model, tmp_path):
    """The tiny pipeline copied into a run's snapshot layout: run/snapshots/step-000004."""
    folder = tmp_path / "run" / "snapshots" / "step-000004"
    shutil.copytree(tiny_model, folder)
    return folder


@pytest.fixture
def count_loads(monkeypatch):
    loads = []
    real = snapshots.load_pipeline

    def counting(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(snapshots, "load_pipeline", counting)
    return loads


@pytest.mark.parametrize("field, value, message", [
    ("prompts", [], "EvalSpec.prompts"),
    ("prompts", ["ok", " "], "EvalSpec.prompts"),
    ("prompts", ["a", "a"], "same prompt twice"),
    ("seeds", [], "EvalSpec.seeds"),
    ("seeds", [0, -1], "EvalSpec.seeds"),
    ("seeds", [1, 1], "same seed twice"),
    ("scheduler", "heun", "EvalSpec.scheduler.*ddim"),
    ("num_inference_steps", 0, "EvalSpec.num_inference_steps"),
    ("guidance_scale", -1, "EvalSpec.guidance_scale"),
    ("resolution", 500, "EvalSpec.resolution"),
])
def test_spec_validation_names_the_field(field, value, message):
    values = {"prompts": ["a photo of sks dog"], field: value}
    with pytest.raises(ConfigError, match=message):
        EvalSpec(**values)


def test_spec_json_round_trip_and_keys():
    spec = EvalSpec(prompts=("a", "b"), seeds=(3,), scheduler="dpm", num_inference_steps=20)
    assert spec.prompts == ["a", "b"] and spec.seeds == [3]
    data = json.loads(json.dumps(spec.to_dict()))
    assert EvalSpec.from_dict(data) == spec and EvalSpec.from_dict(data).key() == spec.key()
    assert spec.replace(seeds=[4]).key() != spec.key()
    # the cache folder depends only on what changes pixels, and None resolution == the native one
    assert spec.replace(prompts=["c"]).settings_key(resolution=32) == spec.settings_key(resolution=32)
    assert spec.replace(resolution=32).settings_key(resolution=32) == spec.settings_key(resolution=32)
    assert spec.replace(guidance_scale=3).settings_key(resolution=32) != spec.settings_key(resolution=32)
    with pytest.raises(ConfigError, match="unknown setting"):
        EvalSpec.from_dict({"prompts": ["a"], "sampler": "ddim"})


def test_for_config_prompts(make_config):
    config = make_config(class_prompt="a photo of a dog")
    spec = EvalSpec.for_config(config, seeds=[7])
    assert spec.prompts == ["a photo of sks dog", "a photo of a dog", "a photo of sks dog in the snow",
                            "a photo of sks dog as an oil painting"]
    assert spec.seeds == [7] and spec.scheduler == "ddim"
    assert EvalSpec.for_config(make_config(), contexts=["on the beach"]).prompts == \
        ["a photo of sks dog", "a photo of sks dog on the beach"]


def test_render_is_cached_and_deterministic(snapshot, count_loads):
    spec = EvalSpec(prompts=["a photo of sks dog", "a photo of a cat"], seeds=[0, 1], num_inference_steps=2)
    first = render(snapshot, spec, device="cpu")
    assert len(count_loads) == 1
    assert [(r.prompt, r.seed, r.step) for r in first] == [
        ("a photo of sks dog", 0, 4), ("a photo of sks dog", 1, 4), ("a photo of a cat", 0, 4),
        ("a photo of a cat", 1, 4)]
    root = render_dir(snapshot)
    assert root == snapshot.parent.parent / "renders" / "step-000004"
    assert all(r.image.is_file() and root in r.image.parents for r in first)
    assert pixels(first[0].image).shape == (32, 32, 3) == (native_resolution(snapshot),) * 2 + (3,)
    mtimes = [r.image.stat().st_mtime_ns for r in first]

    again = render(snapshot, spec, device="cpu")  # cache hit: no pipeline loaded, nothing rewritten
    assert len(count_loads) == 1
    assert [r.image for r in again] == [r.image for r in first]
    assert [r.image.stat().st_mtime_ns for r in again] == mtimes

    before = pixels(first[0].image)
    first[0].image.unlink()  # really rendered again: the very same pixels
    render(snapshot, spec, device="cpu")
    assert len(count_loads) == 2
    assert np.array_equal(pixels(first[0].image), before)
    assert not np.array_equal(pixels(first[0].image), pixels(first[1].image))  # seed 0 vs seed 1

    more = render(snapshot, spec.replace(seeds=[0, 1, 2]), device="cpu")  # only the new seed is rendered
    assert len(count_loads) == 3 and more[0].image == first[0].image
    assert [r.image.stat().st_mtime_ns for r in more if r.seed == 1] == [mtimes[1], mtimes[3]]


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "dpm"])
def test_each_scheduler_renders(snapshot, scheduler, monkeypatch):
    used = []
    from dreambooth_nb.model.objectives import Diffusion

    real = Diffusion.sampler
    monkeypatch.setattr(Diffusion, "sampler", lambda self, name, cfg: used.append(real(self, name, cfg)) or used[-1])
    spec = EvalSpec(prompts=["a photo of sks dog"], seeds=[0], scheduler=scheduler, num_inference_steps=3)
    (item,) = render(snapshot, spec, device="cpu")
    expected = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "dpm": "DPMSolverMultistepScheduler"}
    assert type(used[0]).__name__ == expected[scheduler]
    assert np.isfinite(pixels(item.image)).all() and pixels(item.image).std() > 0


def test_replaced_snapshot_invalidates_its_renders(snapshot, tiny_model, count_loads):
    spec = EvalSpec(prompts=["a photo of sks dog"], seeds=[0], num_inference_steps=2)
    (old,) = render(snapshot, spec, device="cpu")
    shutil.rmtree(snapshot)
    shutil.copytree(tiny_model, snapshot, copy_function=shutil.copy)  # a new save in the same place: new files
    (new,) = render(snapshot, spec, device="cpu")
    assert len(count_loads) == 2 and new.image.is_file()


def test_render_rejects_a_folder_without_pipeline(tmp_path):
    with pytest.raises(DataError, match="model_index.json"):
        render(tmp_path, EvalSpec(prompts=["a"]))
    with pytest.raises(ConfigError, match="EvalSpec"):
        render(tmp_path, {"prompts": ["a"]})
