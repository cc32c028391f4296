"""Reading the user's photos safely, and reporting on a photo folder before training starts.

People upload whatever their phone, camera or file manager produced: `.DS_Store` files, half-copied
JPEGs, 16-bit PNGs, CMYK scans, transparent stickers, animated GIFs, rotated photos, 48-megapixel
originals. Training must never crash an hour in on one of those, so everything goes through
`load_image`, which returns a plain, fully loaded 8-bit RGB image or raises `ImageError` with a message
that names the file, says what is wrong with it and what to do.

`scan_images` runs that once over the whole folder before training, so the user sees every problem at
once (skipped files with reasons, tiny or duplicate photos, too few photos) instead of one at a time.
It also reads captions: `dog1.txt` beside `dog1.jpg` describes that photo ("[trigger] wearing a red
hat"), and `[trigger]` stands for the subject's instance prompt (`caption_prompt`). Masks are paired the same
way: `dog1.mask.png` beside `dog1.jpg` marks the subject in that photo (white = subject); it is not a photo
itself, so it is neither trained on nor skipped, and one with no photo of its name is named in a warning.
`dataset.audit` looks closer at the usable photos (near-duplicates, small or cut-off subjects).

Decisions:

* Damaged files are refused, never half-loaded: `ImageFile.LOAD_TRUNCATED_IMAGES` stays off, because a
  photo whose lower half is grey would be learned as part of the subject.
* Transparency is composited on white (not black, which is what a bare `convert("RGB")` gives), so cut-out
  subjects look like product shots.
* 16-bit images are scaled (65535 -> 255), not clipped (which turns nearly every pixel white).
* Very large photos: with `max_side`, JPEGs are decoded directly at 1/2, 1/4 or 1/8 scale (`Image.draft`),
  so a 48 MP photo costs a few MB instead of ~150 MB. Pillow's decompression-bomb guard stays on (over
  ~179 MP is refused, with advice to resize); a JPEG over that limit is still accepted when `max_side`
  lets it be decoded at reduced scale to below the limit, since its memory cost is then small.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from dreambooth_nb.errors import ConfigError, DataError

__all__ = ["ImageError", "ScanReport", "caption_prompt", "load_image", "scan_images", "thumbnail_grid"]

_TOO_BIG = "Resize it (for example to 2000 px on the long side) before uploading."
_FIX = "Re-copy or re-export the photo (for example save it again as JPEG), or delete it from the folder."

# Leading bytes of formats people upload, to say *what* is broken when Pillow cannot open a file.
_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif")
CAPTION_SUFFIX = ".txt"
MASK_SUFFIX = ".mask.png"
"""`photo.mask.png` beside `photo.jpg` is that photo's subject mask (white = subject), for `masked_loss`."""
SMALL_PHOTO_FRACTION = 0.5
"""A photo whose shorter side is under this fraction of the training resolution is warned about by `scan_images`
(scaled up more than 2x, it looks blurry); `dataset.audit` grades the ones between this and the resolution."""
TRIGGER = "[trigger]"
"""Written in a caption, it stands for the subject's instance prompt: "[trigger] on a beach"."""
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
"""Names that look like images, for counts that do not open the files (`scan_images` opens every file)."""


def png_bytes(image: Image.Image, *, text: dict | None = None) -> bytes:
    """The image as PNG, with `text` (JSON) in a `dreambooth_nb` chunk when given (what made it)."""
    import json

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if text is not None:
        info.add_text("dreambooth_nb", json.dumps(text, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


class ImageError(DataError):
    """One file cannot be used as a training photo.

    `path` is the file and `reason` a short phrase ("empty file (0 bytes)") that `scan_images` lists
    next to the file name; the full message adds what to do.
    """

    def __init__(self, path, reason: str, advice: str = _FIX):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"Cannot use {self.path}: {reason}. {advice}")


def load_image(path, *, max_side: int | None = None) -> Image.Image:
    """Open one photo as a fully loaded 8-bit RGB image, upright, or raise `ImageError`.

    `max_side` bounds the *shorter* side: if the photo's shorter side is longer than `max_side`, it is
    scaled down (aspect ratio kept, Lanczos) so that the shorter side is exactly `max_side`; smaller
    photos are never scaled up. Pass the training resolution: a square crop of that size still fits,
    nothing training needs is thrown away, and huge JPEGs are decoded at reduced scale.

    Handles: grayscale / 1-bit / palette images, transparency (put on white), CMYK (through its ICC
    profile when it has one), 16-bit and 32-bit images (scaled to 8 bits), animated GIF/WebP (first
    frame), EXIF orientation (phone photos are stored sideways with a "rotate me" tag).
    Refuses, with the reason: missing files, folders, empty files, files that are not pictures
    (text, `.DS_Store`), HEIC without `pillow-heif`, truncated or damaged files, decompression bombs.
    """
    path = Path(path)
    if max_side is not None and max_side < 1:
        raise ConfigError(f"max_side must be a positive number of pixels, got {max_side!r}")
    if not path.exists():
        raise ImageError(path, "file not found", "Check the file name, or upload the photo again.")
    if path.is_dir():
        raise ImageError(path, "this is a folder, not a photo",
                         "Put the photos themselves in the photo folder.")
    try:
        if path.stat().st_size == 0:
            raise ImageError(path, "empty file (0 bytes)",
                             "The upload or copy was probably interrupted: upload the photo again, "
                             "or delete the empty file.")
        with open(path, "rb") as f:
            head = f.read(64)
    except PermissionError:
        raise ImageError(path, "the file cannot be read (permission denied)",
                         "Fix the file's permissions, or copy it somewhere you own.") from None
    except OSError as e:
        raise ImageError(path, f"the file cannot be read ({e.strerror or e})",
                         "Copy the photo to local disk again.") from None

    im = _open(path, head, max_side)
    try:
        try:
            im.load()
        except OSError as e:
            if "truncated" in str(e):
                raise ImageError(path, "truncated file: the end of the picture is missing",
                                 "The upload or copy was probably interrupted: copy the photo again, "
                                 "or delete it from the folder.") from None
            raise ImageError(path, f"damaged {im.format or 'image'} file ({e})") from None
        except (SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
            raise ImageError(path, f"damaged {im.format or 'image'} file ({e})") from None
        except MemoryError:
            raise ImageError(path, f"too large to decode ({im.size[0]}x{im.size[1]} px)",
                             _TOO_BIG) from None
        out = _upright(im)
        out = _to_rgb_or_rgba(out, path)
        original_size = out.size
        if max_side is not None and min(out.size) > max_side:
            out = out.resize(_fit_shorter_side(out.size, max_side), Image.Resampling.LANCZOS,
                             reducing_gap=3.0)
        if out.mode == "RGBA":
            white = Image.new("RGB", out.size, (255, 255, 255))
            white.paste(out, mask=out.getchannel("A"))
            out = white
        out = out.copy() if out is im else out
        out.info["original_size"] = original_size  # (width, height) upright, before scaling: SDXL's conditioning
        return out
    finally:
        im.close()


def _open(path: Path, head: bytes, max_side: int | None, *, heif_retry: bool = True) -> Image.Image:
    """`Image.open` with reasons for the failures, and reduced-scale JPEG decoding (see module doc)."""
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:
        im = _open_huge_jpeg(path, head, max_side)
        if im is None:
            raise ImageError(path, f"the picture is too large to load safely ({e})",
                             _TOO_BIG) from None
        return im
    except UnidentifiedImageError:
        if heif_retry and _is_heif(head) and _register_heif():
            return _open(path, head, max_side, heif_retry=False)
        raise ImageError(path, *_why_unreadable(head)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise ImageError(path, f"damaged {_format_of(head) or 'image'} file ({e})") from None
    if max_side is not None and min(im.size) > max_side:
        im.draft(None, _fit_shorter_side(im.size, max_side, rounding=math.ceil))
    return im


def _open_huge_jpeg(path: Path, head: bytes, max_side: int | None) -> Image.Image | None:
    """A JPEG over Pillow's pixel limit, opened at a reduced decode scale that is under it; else None."""
    if max_side is None or _format_of(head) != "JPEG":
        return None
    from PIL import JpegImagePlugin

    try:
        im = JpegImagePlugin.JpegImageFile(str(path))  # the plugin class itself skips the size check
    except Exception:
        return None
    im.draft(None, _fit_shorter_side(im.size, max_side, rounding=math.ceil))
    if Image.MAX_IMAGE_PIXELS and im.size[0] * im.size[1] > Image.MAX_IMAGE_PIXELS:
        im.close()
        return None
    return im


def _fit_shorter_side(size: tuple[int, int], side: int, rounding=round) -> tuple[int, int]:
    w, h = size
    if w <= h:
        return side, max(side, rounding(h * side / w))
    return max(side, rounding(w * side / h)), side


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a broken EXIF block leaves the picture as stored."""
    try:
        if im.getexif().get(0x0112, 1) == 1:  # upright already: no copy of a possibly huge image
            return im
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


def _to_rgb_or_rgba(im: Image.Image, path: Path) -> Image.Image:
    """Any mode -> 8-bit "RGB", or "RGBA" when the picture has transparency (composited later)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_8bit(np.asarray(im)), "L").convert("RGB")
    try:
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
            return im.convert("RGBA")
        if mode == "CMYK":
            return _cmyk_to_rgb(im)
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(path, f"unsupported colour mode {mode} ({e})",
                         "Save the photo again as an ordinary RGB JPEG or PNG.") from None


def _to_8bit(a: np.ndarray) -> np.ndarray:
    """Scale 16-bit (or 32-bit int / float) pixel values into 0..255 instead of clipping them."""
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if a.dtype.kind == "f" and lo >= 0 and hi <= 1:  # float images are usually 0..1
        a = a * 255
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535:  # 16-bit values stored in 32-bit "I" mode
        a = a * (255 / 65535)
    else:  # anything else: stretch the range it uses
        a = (a - lo) * (255 / (hi - lo))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """CMYK through its embedded ICC profile when there is one (accurate colours), else Pillow's formula."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:
            pass
    return im.convert("RGB")


def _format_of(head: bytes) -> str | None:
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if _is_heif(head):
        return "HEIC"
    return None


def _is_heif(head: bytes) -> bool:
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


def _register_heif() -> bool:
    """Let Pillow open iPhone HEIC photos when the optional `pillow-heif` package is installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _why_unreadable(head: bytes) -> tuple[str, str]:
    """(reason, advice) for a file that Pillow does not recognise as a picture."""
    fmt = _format_of(head)
    if fmt == "HEIC":
        return ("HEIC/HEIF photo (the iPhone format), which cannot be read here",
                "Export it as JPEG (iPhone: Settings > Camera > Formats > Most Compatible), "
                "or run `pip install pillow-heif` and restart.")
    if fmt:
        return f"damaged {fmt} file (its header is broken or cut short)", _FIX
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c.isspace() for c in text):
        return "a text file, not a picture", "Delete it from the photo folder, or upload the real photo."
    return ("not a picture (unknown file format)",
            "Use JPEG, PNG or WebP photos; delete other files from the folder.")


def pixel_digest(image: Image.Image) -> str:
    """A digest of the picture itself (its mode, size and pixels): equal for the same picture in any file, so
    a copy saved under another name or format is found (the scan's "same picture"; the audit takes such copies
    as one photo)."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(repr((image.mode, image.size)).encode())
    return digest.hexdigest()


def mask_file(photo) -> Path:
    """The mask file of `photo`: `dog1.jpg` → `dog1.mask.png` in the same folder."""
    photo = Path(photo)
    return photo.with_name(photo.stem + MASK_SUFFIX)


def is_mask_file(path) -> bool:
    """Whether `path` is a mask (`*.mask.png`, any case) rather than a photo, so folder scans can tell them apart."""
    return Path(path).name.lower().endswith(MASK_SUFFIX)


def caption_prompt(caption: str, instance_prompt: str) -> str:
    """The prompt a photo trains with: its caption with `[trigger]` (any case) replaced by the instance prompt."""
    return re.sub(re.escape(TRIGGER), lambda _: instance_prompt, caption, flags=re.IGNORECASE)


@dataclass
class ScanReport:
    """What `scan_images` found in a photo folder. `usable` is sorted; `skipped` holds (file, reason);
    `captions` maps a usable photo to the text of its `.txt` caption and `masks` to its `.mask.png` file
    (photos without one are absent from either)."""

    folder: Path
    usable: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    captions: dict[Path, str] = field(default_factory=dict)
    masks: dict[Path, Path] = field(default_factory=dict)
    instance_prompt: str | None = None

    def prompts(self, instance_prompt: str) -> list[str]:
        """The prompt of each usable photo: its caption (`[trigger]` replaced), else the instance prompt."""
        return [caption_prompt(self.captions[p], instance_prompt) if p in self.captions else instance_prompt
                for p in self.usable]

    def summary(self) -> str:
        """Several lines for the notebook: counts (and how many photos have a mask), then each skipped file with
        its reason, then warnings, then each photo's prompt when some photos have captions."""
        lines = [f"{self.folder}: {len(self.usable)} usable, {len(self.skipped)} skipped"]
        if self.masks:
            lines.append(f"Masks: {len(self.masks)} of {len(self.usable)} photos have one ({MASK_SUFFIX})")
        if self.skipped:
            lines.append("Skipped:")
            lines += [f"  - {p.name}: {reason}" for p, reason in self.skipped]
        if self.warnings:
            lines.append("Warnings:")
            lines += [f"  - {w}" for w in self.warnings]
        if self.captions:
            prompt = self.instance_prompt or TRIGGER
            lines.append(f"Prompts ({len(self.captions)} of {len(self.usable)} photos have a caption; the others "
                         f"use the instance prompt):")
            lines += [f"  - {p.name}: {text}" + ("" if p in self.captions else "  (instance prompt)")
                      for p, text in zip(self.usable, self.prompts(prompt))]
        return "\n".join(lines)


def read_caption(path: Path) -> tuple[str | None, str | None]:
    """(caption, None), or (None, warning) when the file cannot serve as one; the photo then trains with the
    instance prompt. Lines are joined with spaces; a UTF-8 byte-order mark (Notepad writes one) is ignored."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        return None, (f"{path.name} cannot be read ({e.strerror or e}); its photo trains with the instance "
                      "prompt. Copy the caption file again.")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return None, (f"{path.name} is not UTF-8 text (byte 0x{raw[e.start]:02x} at position {e.start}); its photo "
                      "trains with the instance prompt. Save the caption as UTF-8 (in Notepad: Save as > "
                      "Encoding: UTF-8).")
    text = " ".join(text.split())
    if not text:
        return None, f"{path.name} is empty; its photo trains with the instance prompt."
    return text, None


def scan_images(folder, *, resolution: int = 512, min_images: int = 3, allow_empty: bool = False,
                instance_prompt: str | None = None) -> ScanReport:
    """Try every file in `folder` (not its subfolders) and report what training can use, and why not.

    Each file is loaded exactly as training will load it (`load_image(path, max_side=resolution)`), so a
    file that passes here cannot fail later. Hidden files (`.DS_Store`, `.ipynb_checkpoints`) and
    subfolders are skipped with a reason. Warnings: photos whose shorter side is under half the
    training resolution (`SMALL_PHOTO_FRACTION`: they get blurry when scaled up), identical pictures (same
    pixels, so also byte-identical copies), and fewer than `min_images` usable photos. These two facts are
    warned about here only; `dataset.audit` leaves them out (it grades the milder sizes, and finds pictures
    that are alike without being identical).

    Captions: `name.txt` beside the photo `name.jpg` (same name, any image extension) is that photo's
    caption. A `.txt` with no photo of its name, or one that is empty, unreadable or not UTF-8, is named in
    a warning (its photo, if any, trains with the instance prompt). `instance_prompt` only serves the
    summary, which then shows each photo's prompt with `[trigger]` replaced.

    Masks: `name.mask.png` beside the photo `name.jpg` is that photo's subject mask (`report.masks`); it is
    not opened here (it is not a photo: neither usable nor skipped). One with no usable photo of its name is
    named in a warning, like a caption.

    Raises `DataError` when the folder is missing, empty, or holds no usable photo at all — unless
    `allow_empty` (a class-image folder, filled later by generation), which reports that as it is.
    """
    folder = Path(folder)
    if resolution < 1 or min_images < 0:
        raise ConfigError(f"resolution must be >= 1 and min_images >= 0, "
                          f"got {resolution!r} and {min_images!r}")
    if allow_empty and (not folder.is_dir() or not any(folder.iterdir())):
        return ScanReport(folder=folder)
    if not folder.exists():
        raise DataError(f"Photo folder {folder} does not exist. Upload your photos into it, "
                        "or check the folder path in the settings.")
    if not folder.is_dir():
        raise DataError(f"Photo folder {folder} is a file, not a folder. Set the path to the folder "
                        "that holds your photos.")
    entries = sorted(folder.iterdir(), key=lambda p: p.name.lower())
    if not entries:
        raise DataError(f"Photo folder {folder} is empty. Upload 3-5 photos of your subject "
                        "(JPEG or PNG) into it, then run this cell again.")

    report = ScanReport(folder=folder, instance_prompt=instance_prompt)
    sizes: dict[Path, tuple[int, int]] = {}
    by_pixels: dict[str, list[Path]] = {}
    caption_files: list[Path] = []
    mask_files: list[Path] = []
    for path in entries:
        if path.name.startswith("."):
            report.skipped.append((path, "hidden or system file"))
            continue
        if path.is_dir():
            report.skipped.append((path, "a subfolder (subfolders are not searched)"))
            continue
        if path.suffix.lower() == CAPTION_SUFFIX:
            caption_files.append(path)
            continue
        if is_mask_file(path):
            mask_files.append(path)
            continue
        try:
            with load_image(path, max_side=resolution) as im:
                sizes[path] = im.size
                digest = pixel_digest(im)
        except ImageError as e:
            report.skipped.append((path, e.reason))
            continue
        report.usable.append(path)
        by_pixels.setdefault(digest, []).append(path)
    report.usable.sort()
    _match_captions(report, caption_files)
    _match_masks(report, mask_files)

    if not report.usable and not allow_empty:
        why = "\n".join([f"  - {p.name}: {reason}" for p, reason in report.skipped]
                        + [f"  - {p.name}: a caption, with no photo of its name" for p in caption_files]
                        + [f"  - {p.name}: a mask, with no photo of its name" for p in mask_files])
        subfolders = [p.name for p, r in report.skipped if r.startswith("a subfolder")]
        hint = (f" Your photos may be in the subfolder {', '.join(subfolders)}: point the setting at it."
                if subfolders else "")
        raise DataError(f"No usable photo in {folder}.{hint} Upload JPEG or PNG photos of your subject. "
                        f"Every file was skipped:\n{why}")

    for path in report.usable:
        w, h = sizes[path]
        if min(w, h) < resolution * SMALL_PHOTO_FRACTION:
            report.warnings.append(
                f"{path.name} is only {w}x{h} px, much smaller than the training resolution "
                f"{resolution}x{resolution}; it will look blurry. Use a larger original if you have one.")
    for group in by_pixels.values():
        if len(group) > 1:
            names = ", ".join(p.name for p in group[:-1]) + f" and {group[-1].name}"
            report.warnings.append(f"{names} are the same picture; keep one, duplicates only add weight "
                                   "to one view of the subject.")
    if len(report.usable) < min_images:
        report.warnings.append(
            f"Only {len(report.usable)} usable photo(s); Dreambooth works best with 3-5 photos of an "
            "object and 5-10 of a face or pet, from different angles and backgrounds.")
    return report


def _photos_by_stem(report: ScanReport) -> dict[str, list[Path]]:
    """Usable photos by name without extension: `dog1.txt` and `dog1.mask.png` belong to `dog1.jpg`."""
    photos_by_stem: dict[str, list[Path]] = {}
    for photo in report.usable:
        photos_by_stem.setdefault(photo.stem, []).append(photo)
    return photos_by_stem


def _warn_unmatched(report: ScanReport, path: Path, stem: str, *, what: str, example: str) -> None:
    """Warn that the caption or mask `path`, which belongs to the photo named `stem`, has no usable photo."""
    why = (f"its photo {stem}.* was skipped (see above)" if stem in {p.stem for p, _ in report.skipped} else
           f"there is no photo named {stem}.jpg (or .png, ...)")
    report.warnings.append(f"{path.name} is ignored: {why}. A {what} must have its photo's name, e.g. {example}.")


def _match_captions(report: ScanReport, caption_files: list[Path]) -> None:
    """Attach each `.txt` to the usable photos of its name; warn about the ones that fit no photo."""
    photos_by_stem = _photos_by_stem(report)
    for path in caption_files:
        photos = photos_by_stem.get(path.stem)
        if not photos:
            _warn_unmatched(report, path, path.stem, what="caption", example="dog1.jpg + dog1.txt")
            continue
        caption, warning = read_caption(path)
        if warning:
            report.warnings.append(warning)
            continue
        for photo in photos:
            report.captions[photo] = caption


def _match_masks(report: ScanReport, mask_files: list[Path]) -> None:
    """Attach each `name.mask.png` to the usable photos named `name`; warn about the ones that fit no photo."""
    photos_by_stem = _photos_by_stem(report)
    for path in mask_files:
        stem = path.name[: -len(MASK_SUFFIX)]
        photos = photos_by_stem.get(stem)
        if not photos:
            _warn_unmatched(report, path, stem, what="mask", example=f"dog1.jpg + dog1{MASK_SUFFIX}")
            continue
        for photo in photos:
            report.masks[photo] = path


def thumbnail_grid(paths, *, size: int = 96, columns: int = 8) -> Image.Image:
    """One image tiling a `size` x `size` thumbnail of each photo (whole photo, padded with white),
    so the setup notebook can show at a glance what will be trained on. A file that cannot be read
    gets a grey cell with a cross instead of stopping the notebook."""
    paths = list(paths)
    if not paths:
        raise DataError("No photos to show: the list of photos is empty. Run the folder scan first.")
    columns = max(1, min(columns, len(paths)))
    rows = math.ceil(len(paths) / columns)
    gap = 2
    grid = Image.new("RGB", (columns * (size + gap) + gap, rows * (size + gap) + gap), (255, 255, 255))
    for i, path in enumerate(paths):
        x, y = gap + (i % columns) * (size + gap), gap + (i // columns) * (size + gap)
        try:
            cell = ImageOps.pad(load_image(path, max_side=size), (size, size), color=(255, 255, 255))
        except ImageError:
            cell = Image.new("RGB", (size, size), (200, 200, 200))
            draw = ImageDraw.Draw(cell)
            draw.line((0, 0, size, size), fill=(120, 120, 120), width=2)
            draw.line((0, size, size, 0), fill=(120, 120, 120), width=2)
        grid.paste(cell, (x, y))
    return grid

