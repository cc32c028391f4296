"""Notebook 1's photo table (`ui.PhotoTable`): thumbnails with masks and the training crop, captions to edit and
to draft, the audit's findings beside their photos — on the toy world's photo set with planted problems."""

from __future__ import annotations

import pytest

from dreambooth_nb import ConfigError, preset
from dreambooth_nb.dataset.images import mask_file
from dreambooth_nb.notebook import ui
from dreambooth_nb.toy import world
from dreambooth_nb.training.data import mask_cache_dir
from tiny_captioner import build_tiny_blip
from tiny_segmenter import build_tiny_clipseg


@pytest.fixture
def table(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (name, (photo, mask)) in enumerate(world.photo_set_with_problems().items()):
        photo.save(photos / name)
        if i % 2 == 0:  # half of them bring their own mask; "Make masks" makes the others
            mask.save(mask_file(photos / name))
    (photos / "photo-1.txt").write_text("[trigger] on a table")
    config = preset(pretrained_model_name_or_path=str(world.TOY_MODEL_DIR), instance_data_dir=str(photos),
                    instance_prompt=world.SUBJECT_INSTANCE_PROMPT, class_prompt=world.SUBJECT_CLASS_PROMPT,
                    resolution=32, masked_loss=True, mask_segmenter=str(build_tiny_clipseg(tmp_path / "clipseg")),
                    output_dir=str(tmp_path / "runs" / "run"))
    return ui.PhotoTable(config, captioner=str(build_tiny_blip(tmp_path / "blip")))


def row(table, name):
    return next(i for i, photo in enumerate(table.photos) if photo.name == name)


def test_the_table_shows_every_photo_with_its_caption_and_the_audit_beside_it(table):
    names = [p.name for p in table.photos]
    assert names == sorted(world.photo_set_with_problems())  # masks are not photos
    assert table.captions[row(table, "photo-1.png")].value == "[trigger] on a table"
    assert all(bytes(thumbnail.value).startswith(b"\x89PNG") for thumbnail in table.thumbnails)
    # the planted problems, each beside its photo (those with a mask file are measured now)
    assert "near-duplicate" in table.notes[row(table, "burst-1.png")].value
    assert "near-duplicate" in table.notes[row(table, "burst-2.png")].value
    with_masks = {name for name in names if mask_file(table.photos[row(table, name)]).exists()}
    for name, kind in (("tiny.png", "small subject"), ("edge.png", "cut off")):
        assert (kind in table.notes[row(table, name)].value) == (name in with_masks)
    for name in ("photo-1.png", "photo-2.png", "photo-3.png"):  # the good ones: only where their mask comes from
        assert table.notes[row(table, name)].value == ("Mask: its own file." if name in with_masks else
                                                        "No mask yet: Make masks (or put a photo.mask.png beside it).")
    assert f"{len(with_masks)} with a mask" in table.summary.value


def test_draft_fills_only_the_missing_captions_and_edits_are_saved(table):
    before = (table.photos[row(table, "photo-1.png")].with_suffix(".txt")).read_bytes()
    drafts = table.draft()
    assert all(d.written for photo, d in drafts.items() if photo.name != "photo-1.png")
    assert not drafts[table.photos[row(table, "photo-1.png")]].written
    assert table.photos[row(table, "photo-1.png")].with_suffix(".txt").read_bytes() == before  # never overwritten
    for photo, box in zip(table.photos, table.captions):
        assert box.value == photo.with_suffix(".txt").read_text().strip()  # the boxes show what was written
        assert "[trigger]" in box.value
    assert "Drafted" in table.status.value

    edited = table.captions[row(table, "photo-2.png")]
    edited.value = "[trigger]   on the grass "
    assert table.photos[row(table, "photo-2.png")].with_suffix(".txt").read_text() == "[trigger] on the grass\n"
    edited.value = ""
    assert not table.photos[row(table, "photo-2.png")].with_suffix(".txt").exists()
    assert "trains with the instance prompt" in table.status.value


def test_make_masks_masks_the_rest_as_training_will_and_the_audit_then_measures_them(table):
    missing = [p for p in table.photos if not mask_file(p).exists()]
    table.make_masks()
    assert len(list(mask_cache_dir(table.config).glob("*.png"))) == len(missing)
    assert all(mask is not None for mask in table.masks())
    assert all("Mask: made automatically" in table.notes[table.photos.index(p)].value for p in missing)


def test_near_duplicates_by_dinov2_embed_each_photo_once(table, monkeypatch):
    """NEAR_DUPLICATES="DINOv2": the comparison's image model (here its tiny random stand-in) embeds every photo
    once; the audit then compares those embeddings at every redraw, an edit included, without embedding again."""
    from dreambooth_nb.results import quality

    judge = quality.EmbeddingJudge.tiny()
    calls = []
    real = judge.image_embeddings
    monkeypatch.setattr(judge, "image_embeddings", lambda images: calls.append(len(images)) or real(images))
    monkeypatch.setattr(quality.EmbeddingJudge, "standard", classmethod(lambda cls: judge))
    dinov2 = ui.PhotoTable(table.config, duplicates_by="DINOv2")
    dinov2.captions[0].value = "[trigger] on a chair"
    assert calls == [len(dinov2.photos)]
    assert all(finding.kind for finding in dinov2.findings)  # (what a random model finds alike means nothing)
    with pytest.raises(ConfigError, match="NEAR_DUPLICATES: 'pixels' is unknown"):
        ui.PhotoTable(table.config, duplicates_by="pixels")


def test_stop_ends_make_masks_at_its_next_batch_with_one_message(table, monkeypatch):
    """Stop (or the kernel's ■) while the segmenter works: the action ends at its next batch of photos, says so
    in the status line, and leaves no mask half-written; Make masks again makes them all."""
    from dreambooth_nb.dataset import masks
    from dreambooth_nb.errors import ActionStopped

    real = masks.report

    def stop_first(phase, done, total):
        table.runner.stop()  # as the Stop button does, from the panel
        real(phase, done, total)

    monkeypatch.setattr(masks, "report", stop_first)
    with pytest.raises(ActionStopped, match="Masking stopped"):
        table.make_masks()
    assert "Stopped" in table.status.value and not list(mask_cache_dir(table.config).glob("*.png"))
    monkeypatch.setattr(masks, "report", real)
    table.make_masks()
    assert all(mask is not None for mask in table.masks())
