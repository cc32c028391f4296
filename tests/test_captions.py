"""Drafted captions: the captioners load through the real path (tiny random checkpoints), the subject becomes
`[trigger]`, and only photos without a caption get one — an existing caption is never touched."""

import pytest
from safetensors.torch import load_file, save_file
from tiny_captioner import build_tiny_blip, build_tiny_florence2
from transformers import BertConfig

from dreambooth_nb.dataset.captions import Captioner, _clean, draft_captions, subject_to_trigger
from dreambooth_nb.errors import ConfigError
from dreambooth_nb.toy.world import subject_images


@pytest.fixture(scope="module", params=["florence2", "blip"])
def tiny_captioner(request, tmp_path_factory):
    build = build_tiny_florence2 if request.param == "florence2" else build_tiny_blip
    with Captioner.load(build(tmp_path_factory.mktemp(request.param))) as captioner:
        yield captioner


def test_tiny_captioners_load_and_caption_deterministically(tiny_captioner):
    images = subject_images(2)
    captions = tiny_captioner.caption(images)
    assert tiny_captioner.kind in ("florence2", "blip")
    assert tiny_captioner.model.dtype == tiny_captioner.dtype
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert tiny_captioner.caption(images) == captions
    assert tiny_captioner.caption([]) == []


def test_closed_captioner_refuses(tmp_path):
    captioner = Captioner.load(build_tiny_blip(tmp_path))
    captioner.close()
    assert captioner.model is None
    with pytest.raises(RuntimeError, match="closed"):
        captioner.caption(subject_images(1))


@pytest.mark.parametrize("name", ["florence-community/Florence-2-base-not-here", "/nonexistent/captioner"])
def test_load_failure_is_one_clear_error(name):
    with pytest.raises(ConfigError, match="Captioning model .* could not be loaded .*folder"):
        Captioner.load(name)


def test_load_failure_of_a_microsoft_florence_names_the_native_conversion():
    with pytest.raises(ConfigError, match="florence-community/Florence-2-base"):
        Captioner.load("microsoft/Florence-2-base")


def test_weights_of_another_layout_are_refused(tmp_path):
    """What loading a checkpoint made for custom code looks like: the names do not fit, weights stay random."""
    folder = build_tiny_blip(tmp_path)
    weights = load_file(folder / "model.safetensors")
    save_file({f"custom.{key}": value for key, value in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="weights do not fit transformers' blip model.*trust_remote_code"):
        Captioner.load(folder)


def test_other_model_types_are_refused(tmp_path):
    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path)
    with pytest.raises(ConfigError, match="'bert' model; drafting captions needs Florence-2"):
        Captioner.load(tmp_path)


@pytest.mark.parametrize("caption, expected", [
    ("a small brown dog sitting on a beach", "[trigger] sitting on a beach"),
    ("The Dog on the sofa", "[trigger] on the sofa"),
    ("two dogs playing in the snow", "two [trigger] playing in the snow"),
    ("a man holding his fluffy white dog", "a man holding [trigger]"),
    ("a man holding small dog", "a man holding small [trigger]"),
    ("brown dog lying on grass", "[trigger] lying on grass"),
    ("a dog's red collar", "[trigger]'s red collar"),
    ("a puppy on a bed", "[trigger] on a bed"),
    ("a dog next to another dog", "[trigger] next to another dog"),
    ("a very very big old dog", "a very very big old [trigger]"),
])
def test_subject_to_trigger(caption, expected):
    assert subject_to_trigger(caption, "dog") == (expected, True)


def test_subject_to_trigger_whole_words_and_not_found():
    assert subject_to_trigger("a catalog on a table", "cat") == ("[trigger], a catalog on a table", False)
    assert subject_to_trigger("a hot-dog stand", "dog") == ("[trigger], a hot-dog stand", False)
    assert subject_to_trigger("two puppies and a bunny", "bunny") == ("two puppies and [trigger]", True)
    assert subject_to_trigger("three bunnies", "bunny") == ("three [trigger]", True)
    assert subject_to_trigger("a woman smiling", "person") == ("[trigger] smiling", True)
    assert subject_to_trigger("", "dog") == ("[trigger]", False)
    assert subject_to_trigger("a brown Teddy  Bear on a shelf", "teddy bear") == ("[trigger] on a shelf", True)


def test_clean_removes_captioner_artefacts():
    assert _clean("arafed dog sitting on the grass") == "dog sitting on the grass"
    assert _clean("there is a dog that is sitting on a couch ") == "a dog that is sitting on a couch"
    assert _clean("  A photo of a Dog  on a beach. ") == "a Dog on a beach"
    assert _clean("The image shows a cat.") == "a cat"
    assert _clean("TV on a wall") == "TV on a wall"


class FakeCaptioner:
    def __init__(self, text="A small brown dog sitting on a beach."):
        self.text, self.seen, self.closed = text, [], False

    def caption(self, images):
        self.seen += [image.size for image in images]
        return [_clean(self.text) for _ in images]

    def close(self):
        self.closed = True


def _folder(tmp_path, n=4):
    for i, image in enumerate(subject_images(n)):
        image.save(tmp_path / f"photo{i}.png")
    return sorted(tmp_path.glob("*.png"))


def test_draft_writes_only_missing_or_empty_captions(tmp_path):
    photos = _folder(tmp_path)
    mine = "[trigger] wearing a hat, café\n".encode() + b"\xe9"  # not even UTF-8: still someone's caption
    (tmp_path / "photo0.txt").write_bytes(mine)
    (tmp_path / "photo1.txt").write_text("  \n")
    fake = FakeCaptioner()
    drafts = draft_captions(photos, class_noun="dog", captioner=fake, batch_size=2)
    assert (tmp_path / "photo0.txt").read_bytes() == mine
    assert [d.photo for d in drafts] == photos
    assert [d.written for d in drafts] == [False, True, True, True]
    assert drafts[0].existing.startswith("[trigger] wearing a hat") and drafts[0].found_subject
    assert len(fake.seen) == 3 and not fake.closed  # a captioner passed in is its owner's to close
    for draft in drafts[1:]:
        assert draft.text == "[trigger] sitting on a beach" and draft.found_subject and draft.existing is None
        assert draft.photo.with_suffix(".txt").read_text(encoding="utf-8") == "[trigger] sitting on a beach\n"
    assert not list(tmp_path.glob(".*"))  # nothing half-written left behind


def test_draft_loads_no_model_when_every_photo_has_a_caption(tmp_path):
    photos = _folder(tmp_path, n=2)
    for photo in photos:
        photo.with_suffix(".txt").write_text("[trigger] on a table")

    def factory():
        raise AssertionError("the captioner was loaded")

    drafts = draft_captions(photos, class_noun="dog", captioner=factory)
    assert [(d.text, d.written, d.found_subject) for d in drafts] == [("[trigger] on a table", False, True)] * 2


def test_draft_with_a_factory_closes_what_it_loaded_and_flags_a_missing_subject(tmp_path):
    photos = _folder(tmp_path, n=2)
    made = []

    def factory():
        made.append(FakeCaptioner("A red ball on the grass."))
        return made[-1]

    drafts = draft_captions(photos, class_noun="dog", captioner=factory)
    assert len(made) == 1 and made[0].closed
    assert [(d.text, d.found_subject) for d in drafts] == [("[trigger], a red ball on the grass", False)] * 2


def test_two_photos_of_one_name_share_one_draft(tmp_path):
    subject_images(1)[0].save(tmp_path / "dog.png")
    subject_images(1)[0].save(tmp_path / "dog.jpg")
    drafts = draft_captions([tmp_path / "dog.jpg", tmp_path / "dog.png"], class_noun="dog",
                            captioner=FakeCaptioner())
    assert [d.written for d in drafts] == [True, False]
    assert drafts[1].existing == drafts[0].text


def test_draft_with_a_tiny_captioner_end_to_end(tmp_path, tiny_captioner):
    photos = _folder(tmp_path, n=3)
    drafts = draft_captions(photos, class_noun="dog", captioner=tiny_captioner)
    assert all(d.written and "[trigger]" in d.photo.with_suffix(".txt").read_text(encoding="utf-8") for d in drafts)
