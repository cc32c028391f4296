"""Photos never break training: every awkward file a phone or file manager produces, built at test time."""

from __future__ import annotations

import shutil
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from dreambooth_nb.errors import ConfigError, DataError, DreamboothError
from dreambooth_nb.dataset.images import ImageError, ScanReport, load_image, scan_images, thumbnail_grid

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def photo(path, size=(600, 520), color=None, fmt=None, **save):
    """A photo-like picture (smooth gradient, so duplicates are not accidental) or a solid colour."""
    if color is None:
        w, h = size
        a = np.empty((h, w, 3), np.uint8)
        a[..., 0] = np.linspace(0, 255, w, dtype=np.float32)[None, :]
        a[..., 1] = np.linspace(0, 255, h, dtype=np.float32)[:, None]
        a[..., 2] = zlib.crc32(path.name.encode()) % 256
        im = Image.fromarray(a, "RGB")
    else:
        im = Image.new("RGB", size, color)
    im.save(path, fmt, **save)
    return path


def close(a, b, tol=6):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def reason_of(report: ScanReport, name: str) -> str:
    return dict((p.name, r) for p, r in report.skipped)[name]


# --- load_image: files that must be refused ---------------------------------------------------------


def test_zero_byte_file_is_refused_as_empty(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "a.jpg")
    assert "empty" in e.value.reason
    assert str(tmp_path / "a.jpg") in str(e.value)
    assert isinstance(e.value, DataError) and isinstance(e.value, DreamboothError)


def test_text_file_named_jpg_is_refused(tmp_path):
    (tmp_path / "notes.jpg").write_text("my dog photos are in google drive\n")
    with pytest.raises(ImageError, match="notes.jpg") as e:
        load_image(tmp_path / "notes.jpg")
    assert "text file" in e.value.reason
    assert "Delete" in str(e.value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("max_side", [None, 64])  # 64: JPEG decoded at reduced scale must still notice
def test_truncated_file_is_refused_not_half_loaded(tmp_path, fmt, max_side):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # importing the package must not flip it
    full = photo(tmp_path / "full", fmt=fmt).read_bytes()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageError, match=f"cut.{fmt.lower()}") as e:
        load_image(cut, max_side=max_side)
    assert "truncat" in e.value.reason


def test_header_cut_short_is_called_damaged(tmp_path):
    full = photo(tmp_path / "full", fmt="PNG").read_bytes()
    (tmp_path / "b.png").write_bytes(full[:20])
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "b.png")
    assert "damaged PNG" in e.value.reason


def test_binary_non_image_like_ds_store_is_refused(tmp_path):
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1\x00\x00\x10\x00" + bytes(range(256)) * 4)
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / ".DS_Store")
    assert "not a picture" in e.value.reason


def test_heic_without_plugin_gets_export_advice(tmp_path):
    try:
        import pillow_heif  # noqa: F401
        pytest.skip("pillow-heif is installed, HEIC would open")
    except ImportError:
        pass
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(100))
    with pytest.raises(ImageError, match="IMG_0001.HEIC") as e:
        load_image(tmp_path / "IMG_0001.HEIC")
    assert "HEIC" in e.value.reason and "JPEG" in str(e.value)


def test_bad_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError):
        load_image(photo(tmp_path / "a.jpg"), max_side=0)
    with pytest.raises(ConfigError):
        scan_images(tmp_path, resolution=0)


def test_missing_file_and_folder_are_refused(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)


# --- load_image: awkward but usable files ------------------------------------------------------------


def test_result_is_plain_loaded_rgb(tmp_path):
    im = load_image(photo(tmp_path / "a.jpg"))
    assert type(im) is Image.Image and im.mode == "RGB" and im.size == (600, 520)


def test_grayscale_becomes_rgb(tmp_path):
    Image.new("L", (32, 32), 100).save(tmp_path / "g.png")
    im = load_image(tmp_path / "g.png")
    assert im.mode == "RGB" and im.getpixel((5, 5)) == (100, 100, 100)


def test_palette_and_palette_with_transparency(tmp_path):
    p = Image.new("P", (20, 20), 0)
    p.putpalette([0, 128, 0] + [255, 0, 0] + [0] * 762)
    p.paste(1, (10, 0, 20, 20))
    p.save(tmp_path / "p.png")
    p.save(tmp_path / "pt.png", transparency=0)  # index 0 (green) is transparent
    im = load_image(tmp_path / "p.png")
    assert im.mode == "RGB" and im.getpixel((2, 2)) == (0, 128, 0) and im.getpixel((15, 2)) == RED
    im = load_image(tmp_path / "pt.png")
    assert im.getpixel((2, 2)) == WHITE and im.getpixel((15, 2)) == RED


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white(tmp_path, mode):
    im = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # transparent black: bare convert("RGB") gives black
    im.paste((255, 0, 0, 255), (0, 0, 10, 20))
    im.paste((255, 0, 0, 128), (10, 0, 15, 20))
    im.convert(mode).save(tmp_path / "t.png")
    out = load_image(tmp_path / "t.png")
    assert out.mode == "RGB"
    assert out.getpixel((17, 5)) == WHITE
    if mode == "RGBA":
        assert out.getpixel((2, 5)) == RED
        assert close(out.getpixel((12, 5)), (255, 127, 127), tol=2)  # half-transparent red on white


def test_cmyk_jpeg_loads_as_rgb_with_plausible_colour(tmp_path):
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # full magenta + yellow = red
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    im = load_image(tmp_path / "c.jpg")
    r, g, b = im.getpixel((16, 16))
    assert im.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[65535, 32768, 0, 1000]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    im = load_image(tmp_path / "d.png")
    assert im.mode == "RGB"
    assert [im.getpixel((x, 0))[0] for x in range(4)] == [255, 128, 0, 4]


def test_32bit_int_image_with_16bit_values_is_scaled(tmp_path):
    Image.fromarray(np.array([[65535, 0]], dtype=np.int32), "I").save(tmp_path / "i.tif")
    im = load_image(tmp_path / "i.tif")
    assert im.getpixel((0, 0)) == WHITE and im.getpixel((1, 0)) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_image_gives_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (24, 24), c) for c in (RED, BLUE, (0, 255, 0))]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    assert getattr(Image.open(path), "n_frames", 1) == 3
    im = load_image(path)
    assert im.mode == "RGB" and close(im.getpixel((12, 12)), RED)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones store portrait photos
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (20, 40)
    assert close(out.getpixel((10, 5)), RED, tol=30) and close(out.getpixel((10, 35)), BLUE, tol=30)


def test_max_side_bounds_shorter_side_and_never_upscales(tmp_path):
    photo(tmp_path / "land.png", size=(1000, 400))
    photo(tmp_path / "port.png", size=(300, 900))
    assert load_image(tmp_path / "land.png", max_side=200).size == (500, 200)
    assert load_image(tmp_path / "port.png", max_side=200).size == (200, 600)
    assert load_image(tmp_path / "port.png", max_side=512).size == (300, 900)  # smaller: untouched


def test_huge_jpeg_is_decoded_at_reduced_scale(tmp_path, monkeypatch):
    Image.new("RGB", (8000, 6000), (30, 90, 150)).save(tmp_path / "big.jpg", quality=80)
    decoded = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def spy_load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy_load)
    im = load_image(tmp_path / "big.jpg", max_side=512)
    assert im.size == (683, 512) and min(im.size) == 512
    # Decoded at 1/8 scale: 1000x750 (2.2 MB) instead of 8000x6000 (144 MB).
    assert decoded and decoded[0] == (1000, 750)
    assert close(im.getpixel((300, 300)), (30, 90, 150))


def test_decompression_bomb_is_refused_with_advice_unless_reduced_decode_fits(tmp_path, monkeypatch):
    photo(tmp_path / "huge.png", size=(300, 300))
    photo(tmp_path / "huge.jpg", size=(400, 400))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 2x = 20,000 pixels: both files are "bombs"
    with pytest.raises(ImageError, match="huge.png") as e:
        load_image(tmp_path / "huge.png", max_side=64)
    assert "too large" in e.value.reason and "Resize" in str(e.value)
    with pytest.raises(ImageError, match="too large"):
        load_image(tmp_path / "huge.jpg")  # no max_side: would be decoded in full
    assert load_image(tmp_path / "huge.jpg", max_side=50).size == (50, 50)  # decoded at 1/8: 50x50


# --- scan_images --------------------------------------------------------------------------------------


def test_scan_reports_usable_and_skipped_with_reasons(tmp_path):
    for name in ("b.jpg", "a.png", "c.webp"):
        photo(tmp_path / name)
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "empty.jpg").write_bytes(b"")
    full = photo(tmp_path / "x.jpg").read_bytes()
    (tmp_path / "x.jpg").write_bytes(full[: len(full) // 2])
    (tmp_path / "sub").mkdir()
    report = scan_images(tmp_path)
    assert [p.name for p in report.usable] == ["a.png", "b.jpg", "c.webp"]
    assert reason_of(report, ".DS_Store").startswith("hidden")
    assert "empty" in reason_of(report, "empty.jpg")
    assert "truncat" in reason_of(report, "x.jpg")
    assert "subfolder" in reason_of(report, "sub")
    assert report.warnings == []
    text = report.summary()
    assert "3 usable, 4 skipped" in text and "empty.jpg: empty" in text and "x.jpg: truncated" in text


def test_scan_warns_about_duplicates_naming_both_files(tmp_path):
    photo(tmp_path / "a.jpg")
    shutil.copy(tmp_path / "a.jpg", tmp_path / "a copy.jpg")  # same bytes
    photo(tmp_path / "p.png", color=(10, 200, 30))
    photo(tmp_path / "p.bmp", color=(10, 200, 30))  # same pixels, different file format
    photo(tmp_path / "z.jpg")
    report = scan_images(tmp_path)
    dups = [w for w in report.warnings if "same picture" in w]
    assert len(dups) == 2
    assert any("a copy.jpg" in w and "a.jpg" in w for w in dups)
    assert any("p.bmp" in w and "p.png" in w for w in dups)


def test_scan_warns_about_small_images_with_sizes(tmp_path):
    photo(tmp_path / "tiny.jpg", size=(200, 150))
    photo(tmp_path / "ok1.jpg", size=(400, 300))  # under 512 but not under 256: no warning
    photo(tmp_path / "ok2.jpg")
    report = scan_images(tmp_path, resolution=512)
    assert len(report.warnings) == 1
    warning = report.warnings[0]
    assert "tiny.jpg" in warning and "200x150" in warning and "512" in warning


def test_scan_warns_about_too_few_images(tmp_path):
    photo(tmp_path / "a.jpg")
    photo(tmp_path / "b.jpg")
    report = scan_images(tmp_path)
    assert any("Only 2 usable" in w and "3-5" in w for w in report.warnings)
    assert not scan_images(tmp_path, min_images=2).warnings


def test_missing_folder_raises_naming_it(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        scan_images(tmp_path / "my_photos")
    assert str(tmp_path / "my_photos") in str(e.value) and "Upload" in str(e.value)


def test_empty_folder_raises_naming_it(tmp_path):
    with pytest.raises(DataError, match="is empty") as e:
        scan_images(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_folder_with_no_usable_photo_raises_listing_reasons(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("hello")
    (tmp_path / "photos").mkdir()
    with pytest.raises(DataError) as e:
        scan_images(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "a.jpg: empty" in msg and "b.jpg: a text file" in msg
    assert "subfolder photos" in msg


# --- thumbnail_grid -----------------------------------------------------------------------------------


def test_thumbnail_grid_tiles_photos_and_survives_bad_files(tmp_path):
    paths = [photo(tmp_path / f"{i}.jpg", size=(300 + 50 * i, 200)) for i in range(3)]
    (tmp_path / "bad.jpg").write_bytes(b"")
    grid = thumbnail_grid(paths + [tmp_path / "bad.jpg"], size=32, columns=3)
    assert grid.mode == "RGB" and grid.size == (3 * 34 + 2, 2 * 34 + 2)
    assert grid.getpixel((2 + 16, 36 + 4)) == (200, 200, 200)  # the bad file's grey cell (off the cross)
    assert grid.getpixel((36 + 16, 2 + 16)) != (200, 200, 200)  # a photo
    with pytest.raises(DataError):
        thumbnail_grid([])
