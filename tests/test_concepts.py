"""Several subjects in one run, and a caption per photo, at tiny size.

The rule under test (`data.py`): sample k of the run belongs to subject k mod n and is that subject's
sample k // n; a photo's prompt is its caption (`[trigger]` → the instance prompt) or the instance prompt.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from dreambooth_nb import Concept, TrainConfig, preset, train
from dreambooth_nb.model import snapshots
from dreambooth_nb.config import changed_settings
from dreambooth_nb.training.data import TrainingData
from dreambooth_nb.errors import ConfigError, DataError
from dreambooth_nb.model.families import Family
from dreambooth_nb.dataset.images import scan_images
from dreambooth_nb.model.loading import load_components
from dreambooth_nb.model.objectives import Diffusion
from dreambooth_nb.training.prompts import tokenize
from photos import write_photos

# The tiny models' draw: a DDPM schedule of 1000 timesteps (what `train` passes as `draw`)
uniform_timestep = functools.partial(Diffusion().draw, scheduler=DDPMScheduler())


@pytest.fixture
def two_subjects(make_config, photos, tmp_path):
    """`two(**overrides)`: a config with the dog (4 photos) and a cat (3 photos, other pixels)."""
    cats = write_photos(tmp_path / "cats", n=3, seed=1)

    def two(**overrides):
        concepts = [Concept(instance_data_dir=str(photos), instance_prompt="a photo of sks dog",
                            class_data_dir=str(tmp_path / "class-dog"), class_prompt="a photo of a dog",
                            num_class_images=2),
                    Concept(instance_data_dir=str(cats), instance_prompt="a photo of sks cat",
                            class_data_dir=str(tmp_path / "class-cat"), class_prompt="a photo of a cat",
                            num_class_images=3)]
        return make_config(concepts=concepts, **overrides)

    return two


def _encoded(config: TrainConfig) -> TrainingData:
    parts = load_components(config, device=torch.device("cpu"), precision="no")
    data = TrainingData.load(config)
    data.encode(vae=parts.vae, config=config, device=torch.device("cpu"), dtype=torch.float32)
    return data


# --- The config ---------------------------------------------------------------------------------------------
def test_concepts_round_trip_through_json_and_one_subject_is_the_shorthand(two_subjects, make_config, photos,
                                                                          tmp_path):
    config = two_subjects()
    config.to_json(tmp_path / "c.json")
    again = TrainConfig.from_json(tmp_path / "c.json")
    assert again.concepts == config.concepts and all(isinstance(c, Concept) for c in again.concepts)
    # preset's single-subject settings are one concept, and only that: the same config as the list of one
    single = make_config(class_prompt="a photo of a dog", class_data_dir="cls", num_class_images=7)
    one = Concept(instance_data_dir=str(photos), instance_prompt="a photo of sks dog", class_data_dir="cls",
                  class_prompt="a photo of a dog", num_class_images=7)
    assert single.concepts == [one] and make_config(concepts=[one]) == single
    assert changed_settings(single.to_dict(), single) == []
    assert changed_settings(config.to_dict(), config.replace(concepts=config.concepts[:1])) == ["concepts"]


def test_preset_counts_class_images_as_said_and_refuses_two_descriptions(two_subjects):
    concepts = two_subjects().concepts
    assert preset("face", instance_data_dir="p", instance_prompt="x").concepts[0].num_class_images == 200
    assert [c.num_class_images for c in preset("face", concepts=concepts).concepts] == [2, 3]  # their own
    assert [c.num_class_images for c in preset("face", concepts=concepts, num_class_images=9).concepts] == [9, 9]
    with pytest.raises(ConfigError, match="instance_prompt and concepts both describe subjects"):
        preset(concepts=concepts, instance_prompt="a photo of sks dog")


@pytest.mark.parametrize("change,message", [
    (lambda c: [c[0], Concept(c[1].instance_data_dir, "  ")], r"subject 2\) instance_prompt: is empty"),
    (lambda c: [c[0], Concept("/no/such/folder", "a photo of sks cat")], r"subject 2\) instance_data_dir: folder \'/no/such/folder\' does not"),
    (lambda c: [c[0], replace(c[1], instance_prompt=c[0].instance_prompt)], "share an instance_prompt"),
    (lambda c: [c[0], Concept(c[1].instance_data_dir, "a photo of sks cat")], r"subject 2\) class_prompt: is needed with prior preservation"),
    (lambda c: [c[0], Concept(c[1].instance_data_dir, "a photo of sks cat", c[0].class_data_dir, "a cat")],
     "different class prompts share the class folder"),
    (lambda c: [c[0], Concept(c[1].instance_data_dir, "x", c[1].class_data_dir, "a cat", 0)], r"subject 2\) num_class_images: must be a positive"),
])
def test_bad_concepts_are_named(two_subjects, change, message):
    config = two_subjects(with_prior_preservation=True)
    with pytest.raises(ConfigError, match=f"concepts.*{message}"):
        config.replace(concepts=change(config.concepts)).validate()


def test_a_concept_in_json_needs_its_folder_and_prompt(tmp_path):
    with pytest.raises(ConfigError, match="a subject needs instance_data_dir and instance_prompt"):
        TrainConfig.from_dict({"concepts": [{"instance_prompt": "a photo of sks dog"}]})
    with pytest.raises(ConfigError, match="concepts must be a list of subjects"):
        TrainConfig.from_dict({"concepts": "dog"})


# --- Captions -----------------------------------------------------------------------------------------------
def test_captions_are_read_and_every_bad_caption_is_named(photos):
    (photos / "photo-0.txt").write_text("[trigger] wearing a red hat\n on the beach ", encoding="utf-8")
    (photos / "photo-1.txt").write_bytes("\ufeff[Trigger] in the snow".encode("utf-8"))  # Notepad's BOM
    (photos / "photo-2.txt").write_bytes(b"caf\xe9 latte")  # Latin-1, not UTF-8
    (photos / "photo-3.txt").write_text("  \n")
    (photos / "notes.txt").write_text("shot on a Pixel")
    report = scan_images(photos, resolution=32, instance_prompt="a photo of sks dog")
    assert [p.name for p in report.usable] == [f"photo-{i}.png" for i in range(4)]  # no .txt is a photo
    assert report.prompts("a photo of sks dog") == [
        "a photo of sks dog wearing a red hat on the beach", "a photo of sks dog in the snow",
        "a photo of sks dog", "a photo of sks dog"]
    warnings = "\n".join(report.warnings)
    assert "photo-2.txt is not UTF-8 text (byte 0xe9 at position 3)" in warnings
    assert "photo-3.txt is empty" in warnings
    assert "notes.txt is ignored: there is no photo named notes.jpg" in warnings
    summary = report.summary()
    assert "photo-0.png: a photo of sks dog wearing a red hat on the beach" in summary
    assert "photo-2.png: a photo of sks dog  (instance prompt)" in summary


def test_a_caption_of_a_skipped_photo_and_a_folder_of_captions_only(tmp_path, photos):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "broken.txt").write_text("sks dog")
    report = scan_images(photos, resolution=32)
    assert any("broken.txt is ignored: its photo broken.* was skipped" in w for w in report.warnings)
    only = tmp_path / "only-captions"
    only.mkdir()
    (only / "dog.txt").write_text("sks dog")
    with pytest.raises(DataError, match="dog.txt: a caption, with no photo of its name"):
        scan_images(only, resolution=32)


def test_a_caption_longer_than_the_text_encoder_reads_is_named(make_config, photos, tiny_model):
    """The tiny tokenizer reads 16 tokens (CLIP: 77): a longer caption is cut, and the warning says where."""
    (photos / "photo-1.txt").write_text("[trigger] " + "in the snow " * 6)
    config = make_config()
    data = TrainingData.load(config)
    parts = load_components(config, device=torch.device("cpu"), precision="no")
    [warning] = data.long_prompts(parts.tokenizers, limits=[16])
    assert str(photos / "photo-1.txt") in warning and "tokens, the text encoder reads 16" in warning
    assert "is cut off" in warning


def test_captions_reach_the_text_encoder(make_config, photos, monkeypatch):
    """With the text encoder training (so it runs on every batch), the ids it gets for the captioned photo
    are the caption's and differ from the instance prompt's; the other photo gets the instance prompt's."""
    from dreambooth_nb.training.prompts import Prompts

    for extra in photos.glob("photo-[12].png"):
        extra.unlink()  # two photos: photo-0 captioned, photo-3 not
    (photos / "photo-0.txt").write_text("[trigger] on the beach")
    config = make_config(train_text_encoder=True, train_batch_size=2, max_train_steps=3)
    training_rows, current = [], {}
    real_conditioning, real_encode = Prompts.conditioning, Family.encode

    def conditioning(self, batch, **kwargs):
        current["batch"] = batch
        try:
            return real_conditioning(self, batch, **kwargs)
        finally:
            current.clear()

    def encode(self, encoders, token_ids):
        if "image" in current.get("batch", {}):  # a training batch (not the validation's)
            training_rows.extend(zip(current["batch"]["image"].tolist(), token_ids[0]))
        return real_encode(self, encoders, token_ids)

    monkeypatch.setattr(Prompts, "conditioning", conditioning)
    monkeypatch.setattr(Family, "encode", encode)
    train(config)
    tokenizer = load_components(config, device=torch.device("cpu"), precision="no").tokenizers[0]
    caption, plain = tokenize(["a photo of sks dog on the beach", "a photo of sks dog"], tokenizer=tokenizer)
    assert not torch.equal(caption, plain)
    assert len(training_rows) == 3 * 2
    names = ["photo-0.png", "photo-3.png"]  # the folder's usable photos, by index
    for image, ids in training_rows:
        assert torch.equal(ids, caption if names[image] == "photo-0.png" else plain), names[image]


# --- Several subjects ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,world", [(2, 1), (1, 1), (3, 1), (1, 2)])
def test_each_batch_holds_the_subjects_in_turn(two_subjects, batch, world):
    config = two_subjects(train_batch_size=batch, cache_latents=True)
    data = _encoded(config)
    assert data.texts == ["a photo of sks dog", "a photo of sks cat"]
    seen = []
    for micro in range(6):
        for rank in range(world):
            rows = data.batch(micro, config=config, draw=uniform_timestep, rank=rank, world=world)
            assert rows["prompt"].tolist() == rows["subject"].tolist()  # each subject its own prompt
            seen += rows["subject"].tolist()
    assert seen == [k % 2 for k in range(6 * batch * world)]  # sample k is subject k mod 2
    if batch == 2:  # so a batch of two holds one photo of each
        assert all(seen[i:i + 2] == [0, 1] for i in range(0, len(seen), 2))


def test_each_subject_walks_all_its_photos_every_epoch(two_subjects):
    """The dog (4 photos) and the cat (3) each go through all their photos per epoch, on their own."""
    config = two_subjects(train_batch_size=2, cache_latents=True)
    data = _encoded(config)
    shown = {0: [], 1: []}
    for micro in range(12):
        rows = data.batch(micro, config=config, draw=uniform_timestep)
        for subject, image in zip(rows["subject"].tolist(), rows["image"].tolist()):
            shown[subject].append(image)
    for subject, count in ((0, 4), (1, 3)):
        epochs = [shown[subject][i:i + count] for i in range(0, 12 - 12 % count, count)]
        assert all(sorted(epoch) == list(range(count)) for epoch in epochs), shown


def test_class_images_per_subject_with_one_pipeline(two_subjects, monkeypatch):
    """Each subject gets its own count in its own folder, the pipeline loads once, and the class half of
    each batch comes from that subject's class images with its class prompt."""
    from dreambooth_nb import generate_class_images

    loads = []
    real = snapshots.load_pipeline
    monkeypatch.setattr(snapshots, "load_pipeline", lambda *a, **k: loads.append(a) or real(*a, **k))
    config = two_subjects(with_prior_preservation=True, sample_batch_size=3, train_batch_size=2)
    folders = generate_class_images(config)
    assert [len(list(f.glob("class-*.png"))) for f in folders] == [2, 3] and len(loads) == 1
    generate_class_images(config)
    assert len(loads) == 1  # nothing missing: no pipeline

    data = _encoded(config)
    assert [len(c) for c in data.classes] == [2, 3]
    assert data.texts == ["a photo of sks dog", "a photo of sks cat", "a photo of a dog", "a photo of a cat"]
    rows = data.batch(0, config=config, draw=uniform_timestep)
    assert rows["subject"].tolist() == [0, 1, 0, 1] and rows["is_prior"].tolist() == [False, False, True, True]
    assert rows["prompt"].tolist() == [0, 1, 2, 3]


def test_subjects_of_one_class_may_share_its_folder(two_subjects, tmp_path):
    from dreambooth_nb import generate_class_images
    from dreambooth_nb.planning import memory

    config = two_subjects(with_prior_preservation=True, sample_batch_size=3)
    shared = config.replace(concepts=[Concept(c.instance_data_dir, c.instance_prompt, str(tmp_path / "dogs"),
                                              "a photo of a dog", 3) for c in config.concepts])
    sizes = memory.RunSizes(total=3, trained=1)
    assert memory.disk_plan(shared, sizes=sizes).items[0][0] == f"3 class images (in {tmp_path / 'dogs'})"
    assert memory.disk_plan(config, sizes=sizes).items[0][0].startswith("5 class images")  # 2 + 3
    generate_class_images(shared)
    assert len(list((tmp_path / "dogs").glob("class-*.png"))) == 3  # made once, used by both


def test_two_subjects_train_and_validate_on_both(two_subjects):
    config = two_subjects(with_prior_preservation=True, sample_batch_size=3, max_train_steps=2, train_batch_size=2)
    assert snapshots.is_snapshot(train(config))
    history = json.loads((Path(config.output_dir) / "history.json").read_text())
    assert set(history["validation"][-1]) == {"step", "fit", "prior"}
    pairs = _encoded(config).validation_pairs(count=8)
    # photo 0 of the dog, photo 0 of the cat, photo 1 of the dog, ...: the subjects in turn, each its prompt
    assert [p for _, p in pairs["fit"]] == [0, 1, 0, 1, 0, 1, 0]
    assert [p for _, p in pairs["prior"]] == [2, 3, 2, 3, 3]


def test_exports_and_model_cards_name_every_subject(two_subjects, make_config):
    from dreambooth_nb.results.export import how_to_use, subject_prompts

    saved = two_subjects().to_dict()
    assert subject_prompts(saved) == "a photo of sks dog; a photo of sks cat"
    assert subject_prompts(saved, "class_prompt") == "a photo of a dog; a photo of a cat"
    assert subject_prompts(make_config().to_dict()) == "a photo of sks dog"
    assert subject_prompts({}) is None
    assert 'pipe("a photo of sks dog, in the snow")' in how_to_use(prompt=subject_prompts(saved), repo_id="me/x")


def test_the_memory_plan_holds_every_subjects_images(two_subjects, make_config):
    """Photos and class images of both subjects are held in RAM (and as cached latents) during training."""
    from dreambooth_nb.planning import planner

    one = make_config(with_prior_preservation=True, class_prompt="a photo of a dog", class_data_dir="c",
                      num_class_images=2)
    assert planner._image_counts(one) == (4, 2)
    assert planner._image_counts(two_subjects(with_prior_preservation=True)) == (4 + 3, 2 + 3)
    assert planner._image_counts(two_subjects()) == (7, 0)


def test_the_setup_notebooks_concepts_rows(tiny_model, photos, tmp_path):
    """Notebook 1's CONCEPTS: a row per further subject; a new class prompt gets its own class folder, a class
    prompt seen before shares that folder; each subject gets the preset's class-image count; bad rows named."""
    from dreambooth_nb.notebook import project as projects

    project = projects.Project(tmp_path / "project")
    cats = write_photos(tmp_path / "cats", n=3, seed=1)
    puppies = write_photos(tmp_path / "puppies", n=3, seed=2)
    config = projects.setup_config(
        project, kind="face", fit_to_gpu=False, model=str(tiny_model), instance_dir=photos,
        instance_prompt="a photo of sks dog", class_prompt="a photo of a dog", num_class_images=5,
        concepts=[(str(cats), "a photo of sks cat", "a photo of a cat"), (str(puppies), "a photo of zwx dog",
                                                                          "a photo of a dog")])
    assert [(c.instance_data_dir, c.instance_prompt, c.class_prompt, c.class_data_dir, c.num_class_images)
            for c in config.concepts] == [
        (str(photos), "a photo of sks dog", "a photo of a dog", str(project.class_dir), 5),
        (str(cats), "a photo of sks cat", "a photo of a cat", str(project.root / "class_images-2"), 5),
        (str(puppies), "a photo of zwx dog", "a photo of a dog", str(project.class_dir), 5)]
    for bad in (["a photo of sks cat"], [(str(cats),)], [(str(cats), "")], [(str(cats), "a", "b", "c")]):
        with pytest.raises(ConfigError, match="CONCEPTS: row 1"):
            projects.setup_config(project, model=str(tiny_model), instance_dir=photos, fit_to_gpu=False,
                                  instance_prompt="a photo of sks dog", concepts=bad)


# --- Comparing: one row block per subject, metrics per subject -----------------------------------------------
def test_the_evaluation_has_one_block_of_prompts_per_subject(two_subjects):
    from dreambooth_nb import EvalSpec

    spec = EvalSpec.for_config(two_subjects(with_prior_preservation=True), contexts=["in the snow"])
    assert spec.prompts == ["a photo of sks dog", "a photo of a dog", "a photo of sks dog in the snow",
                            "a photo of sks cat", "a photo of a cat", "a photo of sks cat in the snow"]
    shared = two_subjects().replace(concepts=[replace(c, class_prompt="a photo of a pet")
                                              for c in two_subjects().concepts])
    assert EvalSpec.for_config(shared, contexts=[]).prompts == ["a photo of sks dog", "a photo of a pet",
                                                               "a photo of sks cat"]  # a shared class once


def test_the_settings_summary_lists_every_subject(two_subjects, make_config):
    from dreambooth_nb.notebook import settings

    text = settings.config_summary(two_subjects(with_prior_preservation=True))
    assert "Subjects:           2, taking turns in every batch" in text
    assert "  2. 'a photo of sks cat' from" in text and "3 class images of 'a photo of a cat'" in text
    assert "Prior preservation: on: class images per subject (above), weight 1" in text
    single = settings.config_summary(make_config())
    assert "Instance prompt:    a photo of sks dog" in single and "Subjects" not in single


def test_each_subject_is_measured_against_its_own_photos_and_prompts():
    """Two toy subjects (the striped circle and the same paint on a square): each subject's renders are judged
    against its own photos and shape; the run's metric is their mean."""
    import numpy as np

    from dreambooth_nb.results import quality
    from dreambooth_nb.toy import world as toyworld

    judge = quality.ToyJudge()
    circle, square = (toyworld.subject_images(shape=s) for s in ("circle", "square"))
    prompts = ["a photo of sks circle", "a photo of a circle", "a photo of sks square"]
    subjects = [(quality.Roles.of(prompts, instance_prompt="a photo of sks circle", class_prompt="a photo of a circle"),
                 circle),
                (quality.Roles.of(prompts, instance_prompt="a photo of sks square", class_prompt=None), square)]
    plain = [toyworld.render("red", "circle", rng=np.random.default_rng(s)) for s in range(4)]
    both = {prompts[0]: toyworld.subject_images(n=4, seed=1), prompts[1]: plain,
            prompts[2]: toyworld.subject_images(n=4, seed=1, shape="square")}
    one = {**both, prompts[2]: toyworld.subject_images(n=4, seed=1)}  # the square's prompt draws the circle
    learned, half = (quality.measure(judge, images, subjects=subjects, base_images={prompts[1]: plain})
                     for images in (both, one))
    circle_alone = quality.measure(judge, both, subjects=subjects[:1], base_images={prompts[1]: plain})
    assert learned["subject_fidelity"] > 0.6 and learned["prior_preservation"] == 1.0
    assert half["subject_fidelity"] == pytest.approx(circle_alone["subject_fidelity"] / 2, abs=1e-4)  # square: 0
