"""Subject masks (`dataset.masks`): mask files, the automatic CLIPSeg masks (a tiny random one), their cache,
and the helpers the notebook and the data-set audit use."""

import numpy as np
import pytest
from PIL import Image
from tiny_segmenter import build_tiny_clipseg

from dreambooth_nb.dataset.images import ImageError, load_image
from dreambooth_nb.dataset.masks import (Mask, Segmenter, _soft_mask, is_mask_file, load_mask, mask_file,
                                         overlay, subject_masks)
from dreambooth_nb.errors import ConfigError
from dreambooth_nb.toy.world import render, subject_images

ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def tiny_clipseg(tmp_path_factory):
    return build_tiny_clipseg(tmp_path_factory.mktemp("tiny-clipseg"))


class CountingLoader:
    """A segmenter factory that counts its calls, named like `Segmenter.loader`'s for the cache."""

    def __init__(self, path):
        self.name = str(path)
        self.loaded = []

    def __call__(self):
        self.loaded.append(Segmenter.load(self.name, device="cpu"))
        return self.loaded[-1]


def _half_white(size, *, mode="L"):
    """A mask whose left half is the subject."""
    w, h = size
    a = np.zeros((h, w), np.uint8)
    a[:, : w // 2] = 255
    return Image.fromarray(a, "L").convert(mode)


def _photo(path, size=(60, 40)):
    render("red", "circle").resize(size).save(path)
    return path


def test_mask_file_is_beside_its_photo(tmp_path):
    assert mask_file(tmp_path / "dog1.jpg") == tmp_path / "dog1.mask.png"
    assert is_mask_file(tmp_path / "dog1.mask.png") and is_mask_file("DOG1.MASK.PNG")
    assert not is_mask_file(tmp_path / "dog1.jpg") and not is_mask_file(tmp_path / "mask.png")


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "RGBA-alpha", "RGBA-opaque"])
def test_a_mask_file_loads_at_the_photo_size_as_loaded(tmp_path, mode):
    photo = load_image(_photo(tmp_path / "dog1.png"), max_side=20)  # 60x40 → 30x20
    if mode == "RGBA-alpha":  # a cut-out: the colours say nothing (white everywhere), the alpha is the mask
        mask = Image.new("RGBA", (60, 40), (255, 255, 255, 0))
        mask.putalpha(_half_white((60, 40)))
    elif mode == "RGBA-opaque":  # no transparency: its brightness is the mask
        mask = _half_white((60, 40), mode="RGBA")
    else:
        mask = _half_white((60, 40), mode=mode)
    mask.save(tmp_path / "dog1.mask.png")
    out = load_mask(tmp_path / "dog1.mask.png", size=photo.size)
    assert out.mode == "L" and out.size == photo.size == (30, 20)
    a = np.asarray(out)
    assert (a[:, :13] == 255).all() and (a[:, 17:] == 0).all()  # the edge (columns 13-16) may be soft


def test_exif_rotated_photos_and_masks_are_upright(tmp_path):
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # "rotate 90° clockwise to display": how phones store portrait photos
    Image.new("RGB", (60, 40), "red").save(tmp_path / "dog1.jpg", exif=exif, quality=95)
    photo = load_image(tmp_path / "dog1.jpg")
    assert photo.size == (40, 60)
    # A mask painted over the photo as shown: upright, no tag.
    _half_white((40, 60)).save(tmp_path / "dog1.mask.png")
    assert load_mask(tmp_path / "dog1.mask.png", size=photo.size).size == (40, 60)
    # A mask stored like the photo, sideways with the same tag: its top half becomes the right half.
    stored = _half_white((40, 60)).rotate(-90, expand=True)  # 60x40, the subject on top
    assert stored.size == (60, 40) and np.asarray(stored)[:10].min() == 255
    stored.save(tmp_path / "dog1.mask.png", exif=exif)
    a = np.asarray(load_mask(tmp_path / "dog1.mask.png", size=photo.size))
    assert a.shape == (60, 40) and (a[:, 22:] == 255).all() and (a[:, :18] == 0).all()
    # Stored sideways without the tag: refused, and told why.
    stored.save(tmp_path / "dog1.mask.png")
    with pytest.raises(ImageError, match="sideways") as err:
        load_mask(tmp_path / "dog1.mask.png", size=photo.size, photo=tmp_path / "dog1.jpg")
    assert "dog1.mask.png" in str(err.value) and "dog1.jpg" in str(err.value)


def test_masks_of_another_shape_or_all_black_or_unreadable_are_refused(tmp_path):
    _half_white((60, 60)).save(tmp_path / "dog1.mask.png")
    with pytest.raises(ImageError, match="not that of its photo") as err:
        load_mask(tmp_path / "dog1.mask.png", size=(60, 40), photo=tmp_path / "dog1.jpg")
    assert "dog1.mask.png" in str(err.value) and "dog1.jpg" in str(err.value) and err.value.path.name == "dog1.mask.png"
    _half_white((61, 40)).save(tmp_path / "dog1.mask.png")  # 1.7 % wider: rounding, accepted
    assert load_mask(tmp_path / "dog1.mask.png", size=(60, 40)).size == (60, 40)

    Image.new("L", (60, 40), 3).save(tmp_path / "dog2.mask.png")
    with pytest.raises(ImageError, match="entirely black") as err:
        load_mask(tmp_path / "dog2.mask.png", size=(30, 20))
    assert "dog2.mask.png" in str(err.value) and "dog2.*" in str(err.value)

    (tmp_path / "dog3.mask.png").write_text("not a picture")
    with pytest.raises(ImageError, match="cannot be read") as err:
        load_mask(tmp_path / "dog3.mask.png", size=(30, 20), photo=tmp_path / "dog3.jpg")
    assert "dog3.mask.png" in str(err.value) and "dog3.jpg" in str(err.value)


def test_the_segmenter_masks_each_image_at_its_own_size(tiny_clipseg):
    images = [render("red", "circle").resize((40, 30)), subject_images(1)[0].resize((24, 56))]
    with Segmenter.load(tiny_clipseg, device="cpu") as segmenter:
        masks = segmenter(images, "dog")
        assert segmenter([images[1]], "dog")[0].tobytes() == masks[1].tobytes()  # a batch of one: same mask
    assert segmenter.model is None  # closed by the `with` block
    assert [m.size for m in masks] == [(40, 30), (24, 56)] and {m.mode for m in masks} == {"L"}
    for m in masks:
        lo, hi = m.getextrema()
        assert 0 <= lo <= hi == 255  # the likeliest region always counts as subject (the ramp follows a weak peak)


def test_clipseg_probabilities_become_a_clear_soft_mask():
    """A clear subject (CLIPSeg's ~0.8) → 255, the background (~0.02) → 0, grown by ~1 % of the shorter side; a
    weak detection (peak 0.2) still marks its likeliest region as subject."""
    p = np.full((32, 32), 0.02, np.float32)
    p[8:24, 8:24] = 0.8
    a = np.asarray(_soft_mask(p, (200, 100)))
    assert a.shape == (100, 200)
    assert (a[30:70, 60:140] == 255).all() and (a[:15] == 0).all() and (a[:, :40] == 0).all()
    grown = np.asarray(_soft_mask(p, (200, 100)))[50] > 127  # the subject's row, dilated by 1 px (1 % of 100)
    assert 100 < grown.sum() < 110  # half the width, plus the soft edge and the dilation
    weak = np.asarray(_soft_mask(p * 0.25, (32, 32)))
    assert weak[16, 16] == 255 and weak[0, 0] == 0


def test_a_segmenter_that_cannot_load_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="photo.mask.png") as err:
        Segmenter.load(str(tmp_path / "no-such-model"))
    assert "no-such-model" in str(err.value)


def test_subject_masks_take_the_file_where_there_is_one_and_the_segmenter_elsewhere(tmp_path, tiny_clipseg):
    photos = [_photo(tmp_path / "dog1.png"), _photo(tmp_path / "dog2.png", size=(40, 60))]
    images = [load_image(p, max_side=20) for p in photos]
    _half_white((60, 40)).save(tmp_path / "dog1.mask.png")
    factory = CountingLoader(tiny_clipseg)
    masks = subject_masks(photos, images, word="dog", segmenter=factory)
    assert [m.source for m in masks] == ["file", "auto"] and len(factory.loaded) == 1
    assert factory.loaded[0].model is None  # what subject_masks loaded, it closed
    assert [m.image.size for m in masks] == [im.size for im in images] == [(30, 20), (20, 30)]
    assert masks[0].image.tobytes() == load_mask(tmp_path / "dog1.mask.png", size=(30, 20)).tobytes()

    with Segmenter.load(tiny_clipseg, device="cpu") as segmenter:  # a Segmenter given is the caller's to close
        again = subject_masks(photos, images, word="dog", segmenter=segmenter)
        assert segmenter.model is not None
    assert again[1].image.tobytes() == masks[1].image.tobytes()

    with pytest.raises(ConfigError, match="dog2.png") as err:
        subject_masks(photos, images, word="dog")
    assert "dog1.png" not in str(err.value) and "dog2.mask.png" in str(err.value)


def test_a_fully_masked_folder_never_loads_a_model(tmp_path):
    photos = [_photo(tmp_path / f"dog{i}.png") for i in range(2)]
    for photo in photos:
        _half_white((60, 40)).save(mask_file(photo))

    def factory():
        raise AssertionError("the segmenter was loaded")

    masks = subject_masks(photos, [load_image(p) for p in photos], word="dog", segmenter=factory, cache_dir=tmp_path)
    assert [m.source for m in masks] == ["file", "file"]
    assert all(isinstance(m, Mask) and m.image.size == (60, 40) for m in masks)


def test_automatic_masks_are_cached(tmp_path, tiny_clipseg):
    photos = [tmp_path / "dog1.jpg", tmp_path / "dog2.jpg"]  # never opened: masks come from `images`
    images = subject_images(2)
    cache = tmp_path / "cache"
    first = CountingLoader(tiny_clipseg)
    made = subject_masks(photos, images, word="dog", segmenter=first, cache_dir=cache)
    assert len(first.loaded) == 1 and len(list(cache.glob("*.png"))) == 2
    second = CountingLoader(tiny_clipseg)
    reused = subject_masks(photos, images, word="dog", segmenter=second, cache_dir=cache)
    assert second.loaded == [] and [m.source for m in reused] == ["auto", "auto"]
    assert [m.image.tobytes() for m in reused] == [m.image.tobytes() for m in made]
    # Another word, or other pixels, are other masks.
    subject_masks(photos[:1], images[:1], word="cat", segmenter=second, cache_dir=cache)
    subject_masks(photos[:1], [images[0].rotate(90)], word="dog", segmenter=second, cache_dir=cache)
    assert len(second.loaded) == 2 and len(list(cache.glob("*.png"))) == 4
    # Segmenter.loader names the model like the factory above: its masks are found too.
    loader = Segmenter.loader(tiny_clipseg, device="cpu")
    assert loader.name == str(tiny_clipseg)
    assert [m.image.tobytes() for m in subject_masks(photos, images, word="dog", segmenter=loader,
                                                     cache_dir=cache)] == [m.image.tobytes() for m in made]


def test_overlay_tints_the_background_only():
    image = Image.new("RGB", (20, 10), (128, 128, 128))
    out = overlay(image, _half_white((20, 10)), colour=(255, 64, 64), opacity=0.45)
    assert out.mode == "RGB" and out.size == (20, 10)
    a = np.asarray(out).astype(int)
    assert (a[:, :10] == 128).all()  # the subject, as it is
    expected = np.rint(128 * 0.55 + np.array([255, 64, 64]) * 0.45)  # (185, 99, 99)
    assert np.abs(a[:, 10:] - expected).max() == 0
    thumbnail = overlay(image.resize((10, 5)), _half_white((20, 10)))  # a full-size mask over a thumbnail
    assert thumbnail.size == (10, 5)
