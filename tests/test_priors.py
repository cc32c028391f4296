"""Class images: the count asked for, deterministic per index, only the missing ones generated."""

import numpy as np
import pytest
from PIL import Image

from dreambooth_nb import generate_class_images, priors, snapshots
from dreambooth_nb.errors import DataError


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def no_pipeline(*args, **kwargs):
    raise AssertionError("the pipeline was loaded although no class image was missing")


@pytest.fixture
def class_config(make_config, tmp_path):
    def make(**overrides):
        return make_config(with_prior_preservation=True, class_prompt="a photo of a dog",
                           class_data_dir=str(tmp_path / "class"), num_class_images=3, sample_batch_size=2,
                           **overrides)
    return make


def test_generates_the_count_then_nothing_more(class_config, monkeypatch):
    config = class_config()
    folder = generate_class_images(config)
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert all(pixels(folder / f).shape == (32, 32, 3) for f in files)
    mtimes = {f: (folder / f).stat().st_mtime_ns for f in files}

    monkeypatch.setattr(snapshots, "load_pipeline", no_pipeline)
    assert generate_class_images(config) == folder  # complete: no pipeline, nothing written
    assert {f: (folder / f).stat().st_mtime_ns for f in files} == mtimes
    assert priors.missing_class_images(folder, 3) == []
    assert priors.missing_class_images(folder, 5) == [3, 4]


def test_partial_folder_resumes_with_identical_images(class_config, monkeypatch):
    config = class_config()
    folder = generate_class_images(config)
    before = {i: pixels(priors.class_image_path(folder, i)) for i in range(3)}
    assert not np.array_equal(before[0], before[1])  # each index has its own seed
    mtime_0 = priors.class_image_path(folder, 0).stat().st_mtime_ns

    # A disconnect lost image 1 (generated in a batch with image 0); alone now, it comes back pixel-identical.
    priors.class_image_path(folder, 1).unlink()
    loads = []
    real = snapshots.load_pipeline
    monkeypatch.setattr(snapshots, "load_pipeline", lambda *a, **k: loads.append(a) or real(*a, **k))
    generate_class_images(config)
    assert len(loads) == 1
    assert np.array_equal(pixels(priors.class_image_path(folder, 1)), before[1])
    assert priors.class_image_path(folder, 0).stat().st_mtime_ns == mtime_0  # untouched

    # Asking for more images writes only the new indices; the first three stay as they were.
    generate_class_images(config.replace(num_class_images=4))
    assert sorted(p.name for p in folder.glob("class-*.png"))[-1] == "class-00003.png"
    assert priors.class_image_path(folder, 0).stat().st_mtime_ns == mtime_0


def test_needs_prompt_and_folder(make_config):
    with pytest.raises(DataError, match="class_prompt"):
        generate_class_images(make_config())
