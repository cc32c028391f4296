"""Class images: the count asked for, deterministic per index, only the missing ones generated."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth_nb import generate_class_images
from dreambooth_nb.dataset import classes
from dreambooth_nb.model import snapshots
from dreambooth_nb.errors import DataError
from subjects import with_subject


def class_images_of(config):
    """The class images of the config's one subject."""
    return classes.class_images(config.concepts[0], resolution=config.resolution)


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def no_pipeline(*args, **kwargs):
    raise AssertionError("the pipeline was loaded although no class image was missing")


@pytest.fixture
def class_config(make_config, tmp_path):
    def make(**overrides):
        return make_config(**{"with_prior_preservation": True, "class_prompt": "a photo of a dog",
                              "class_data_dir": str(tmp_path / "class"), "num_class_images": 3,
                              "sample_batch_size": 2, **overrides})
    return make


def test_generates_the_count_then_nothing_more(class_config, monkeypatch):
    config = class_config()
    [folder] = generate_class_images(config)
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert all(pixels(folder / f).shape == (32, 32, 3) for f in files)
    mtimes = {f: (folder / f).stat().st_mtime_ns for f in files}

    monkeypatch.setattr(snapshots, "load_pipeline", no_pipeline)
    assert generate_class_images(config) == [folder]  # complete: no pipeline, nothing written
    assert {f: (folder / f).stat().st_mtime_ns for f in files} == mtimes
    assert class_images_of(config).to_generate == []
    assert class_images_of(with_subject(config, num_class_images=5)).to_generate == [3, 4]


def test_partial_folder_resumes_with_identical_images(class_config, monkeypatch):
    config = class_config()
    [folder] = generate_class_images(config)
    before = {i: pixels(classes.class_image_path(folder, i)) for i in range(3)}
    assert not np.array_equal(before[0], before[1])  # each index has its own seed
    mtime_0 = classes.class_image_path(folder, 0).stat().st_mtime_ns

    # A disconnect lost image 1 (generated in a batch with image 0); alone now, it comes back pixel-identical.
    classes.class_image_path(folder, 1).unlink()
    loads = []
    real = snapshots.load_pipeline
    monkeypatch.setattr(snapshots, "load_pipeline", lambda *a, **k: loads.append(a) or real(*a, **k))
    generate_class_images(config)
    assert len(loads) == 1
    assert np.array_equal(pixels(classes.class_image_path(folder, 1)), before[1])
    assert classes.class_image_path(folder, 0).stat().st_mtime_ns == mtime_0  # untouched

    # Asking for more images writes only the new indices; the first three stay as they were.
    generate_class_images(with_subject(config, num_class_images=4))
    assert sorted(p.name for p in folder.glob("class-*.png"))[-1] == "class-00003.png"
    assert classes.class_image_path(folder, 0).stat().st_mtime_ns == mtime_0


def test_needs_prompt_and_folder(make_config):
    with pytest.raises(DataError, match="class_prompt"):
        generate_class_images(make_config())


# --- Bring your own class images (a regularization set in the class folder counts) -----------------------
def write_own(folder, names, *, size=40, seed=1):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for name in names:
        Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8")).save(folder / name)
    return [folder / name for name in names]


def test_your_images_alone_need_no_generation_and_no_model(class_config, monkeypatch, capsys):
    config = class_config()
    own = write_own(Path(config.concepts[0].class_data_dir), ["dog1.jpg", "dog2.png", "dog3.png"])
    monkeypatch.setattr(snapshots, "load_pipeline", no_pipeline)
    generate_class_images(config)
    assert "3 class images wanted — 3 of yours, 0 generated earlier, 0 to generate" in capsys.readouterr().out
    assert class_images_of(config).selected == sorted(own)
    assert not list(Path(config.concepts[0].class_data_dir).glob("class-*.png"))


def test_yours_and_generated_only_the_shortfall_is_made_and_a_rerun_makes_nothing(class_config, monkeypatch, capsys):
    config = class_config(num_class_images=4)
    folder = Path(config.concepts[0].class_data_dir)
    own = write_own(folder, ["a.png"])
    generate_class_images(config)
    assert sorted(p.name for p in folder.glob("class-*.png")) == ["class-00000.png", "class-00001.png",
                                                                   "class-00002.png"]
    assert class_images_of(config).selected == own + [classes.class_image_path(folder, i) for i in range(3)]
    capsys.readouterr()
    monkeypatch.setattr(snapshots, "load_pipeline", no_pipeline)
    generate_class_images(config)
    assert "1 of yours, 3 generated earlier, 0 to generate" in capsys.readouterr().out


def test_more_of_yours_than_wanted_generates_nothing_and_picks_the_same_subset(class_config, monkeypatch):
    config = class_config(num_class_images=3)
    own = write_own(Path(config.concepts[0].class_data_dir), [f"reg-{i:03d}.jpg" for i in range(7)])
    monkeypatch.setattr(snapshots, "load_pipeline", no_pipeline)
    generate_class_images(config)
    first = class_images_of(config).selected
    assert first == own[:3] and class_images_of(config).selected == first
    assert "3 of yours (of 7 found)" in class_images_of(config).summary()


def test_unusable_files_in_the_class_folder_are_named_and_not_counted(class_config, capsys):
    config = class_config(num_class_images=3)
    folder = Path(config.concepts[0].class_data_dir)
    write_own(folder, ["good.png"])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("regularization set v2")
    generate_class_images(config)
    out = capsys.readouterr().out
    assert "Skipped broken.jpg" in out and "notes.txt is ignored" in out
    found = class_images_of(config)
    assert [p.name for p in found.yours] == ["good.png"] and len(found.selected) == 3


def test_training_uses_exactly_num_class_images_yours_first(class_config, monkeypatch):
    """The class half of every batch draws from the selected images only: 10 of yours in the folder and
    num_class_images=2 train on the first two, and nothing is generated."""
    from dreambooth_nb import train
    from dreambooth_nb.training.data import ImageFolder

    config = class_config(num_class_images=2, max_train_steps=1)
    own = write_own(Path(config.concepts[0].class_data_dir), [f"reg-{i:02d}.png" for i in range(10)])
    loaded = []
    real = ImageFolder.from_paths

    def spy(paths, **kwargs):
        loaded.append(list(paths))
        return real(paths, **kwargs)

    monkeypatch.setattr(ImageFolder, "from_paths", spy)
    monkeypatch.setattr(snapshots, "load_pipeline", no_pipeline)
    train(config)
    assert loaded[-1] == own[:2]


def test_class_images_from_captions_see_the_photos_scenes_and_train_with_them(class_config, monkeypatch):
    """Class image i comes from photo (i mod n)'s caption with the class prompt for `[trigger]` (a photo without
    a caption: the class prompt alone), keeps that prompt beside it, and trains with it."""
    from dreambooth_nb.training.data import TrainingData

    config = class_config(class_images_from_captions=True, num_class_images=5)
    photos = Path(config.concepts[0].instance_data_dir)
    (photos / "photo-0.txt").write_text("[trigger] on a beach")
    (photos / "photo-2.txt").write_text("[trigger] in the snow")
    asked = []
    real = snapshots.load_pipeline

    def recording(*args, **kwargs):
        pipe = real(*args, **kwargs)

        def call(prompts, **kw):
            asked.extend(prompts)
            return pipe(prompts, **kw)
        return call

    monkeypatch.setattr(snapshots, "load_pipeline", recording)
    [folder] = generate_class_images(config)
    scenes = ["a photo of a dog on a beach", "a photo of a dog", "a photo of a dog in the snow", "a photo of a dog"]
    assert asked == [scenes[i % 4] for i in range(5)]
    assert sorted(p.name for p in folder.glob("*.txt")) == ["class-00000.txt", "class-00002.txt", "class-00004.txt"]
    assert (folder / "class-00002.txt").read_text() == "a photo of a dog in the snow"
    data = TrainingData.load(config)
    assert data.classes[0].prompts == [scenes[i % 4] for i in range(5)]

    # Plain class images again (captions off): an image made anew under a number drops the caption it had.
    classes.class_image_path(folder, 0).unlink()
    generate_class_images(with_subject(config, num_class_images=5).replace(class_images_from_captions=False))
    assert not (folder / "class-00000.txt").exists() and (folder / "class-00002.txt").exists()
