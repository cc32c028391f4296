"""Subject masks for `masked_loss`: which pixels of each photo are the subject, so training can weigh them more.

A photo `dog1.jpg` may have a mask `dog1.mask.png` beside it (white = subject, black = background; grey is
partly subject). Photos without one get an automatic mask from CLIPSeg prompted with the class word ("dog"),
made once and cached like latents, so a folder where every photo has its mask never loads a model.

Masks are returned at the size of the photo *as loaded* (`images.load_image(path, max_side=resolution)`);
training then cuts each mask exactly as it cuts its photo (scale, flip, crop) and averages it over the latent
cells (`training.data`), so nothing here depends on the crop.

Decisions:

* A mask file must show the same picture as its photo: an aspect ratio more than ~2 % off means a mask drawn for
  another crop (or turned sideways), and an all-black mask means no subject at all — both would silently train
  on the wrong pixels, so they are refused with the file named instead of being stretched or ignored.
* A mask that has transparency (a cut-out from a photo editor or a background remover) is its alpha channel;
  otherwise its brightness.
* Automatic masks stay soft (0..255) and err on the large side: cutting off the dog's ears is worse than keeping
  a rim of carpet, since the background still trains with `mask_background_weight`.
"""

from __future__ import annotations

import gc
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from dreambooth_nb.dataset.images import MASK_SUFFIX, ImageError, is_mask_file, mask_file, png_bytes
from dreambooth_nb.errors import ConfigError
from dreambooth_nb.progress import report
from dreambooth_nb.storage import atomic_write_bytes

__all__ = ["DEFAULT_SEGMENTER", "Mask", "Segmenter", "SegmenterLoader", "is_mask_file", "load_mask",
           "mask_file", "overlay", "subject_masks"]

DEFAULT_SEGMENTER = "CIDAS/clipseg-rd64-refined"
"""CLIPSeg (ViT-B/16, 352 px, refined decoder), ~600 MB: text-prompted segmentation of any class word."""
ASPECT_TOLERANCE = 0.02
"""How far (relative) a mask's width/height may differ from its photo's before it is taken for another crop."""
_BLACK = 8
"""A mask whose brightest pixel is under this (of 255) marks no subject: black, give or take compression noise."""
_HOW_TO_MASK = "white on the subject, black elsewhere, with the photo's aspect ratio"

# CLIPSeg's sigmoid probabilities are low-contrast: on a clear subject the centre reaches ~0.5-0.95, its edges fall
# through ~0.1-0.3, and the background sits under ~0.05 with a faint halo around objects. Min-max normalising each
# image would turn a photo where nothing was found into a mask of noise, and a fixed hard threshold (0.3-0.5 is
# common) clips edges. So: a soft linear ramp from _LOW (0) to _HIGH (255), generous on purpose (its middle, 0.25,
# is under the usual 0.3), then a dilation of about 1 % of the shorter side. Only when an image's peak is under
# _HIGH (a weak detection) is the ramp scaled down to that peak, so the most likely region still counts as subject
# instead of the whole photo being learned at the background weight.
_LOW, _HIGH = 0.1, 0.4
_DILATION = 0.01
_BATCH = 8
"""Photos per CLIPSeg forward pass (352 px each: a few hundred MB of activations at most)."""


@dataclass(frozen=True)
class Mask:
    """One photo's subject mask: `image` ("L", white = subject) at the photo's loaded size, and where it came
    from — "file" (`photo.mask.png`) or "auto" (the segmenter) — for the notebook's table."""

    image: Image.Image
    source: Literal["file", "auto"]


def load_mask(path, *, size: tuple[int, int], photo=None) -> Image.Image:
    """The mask at `path` as an "L" image of `size` (width, height): the size of its photo as loaded.

    Upright like the photo (its own EXIF orientation applied), resized smoothly (Pillow's bilinear, which
    averages when shrinking). `photo` only names the photo in messages (default: the mask's name without
    `.mask.png`). Raises `ImageError` naming the mask and its photo when the file cannot be read, when its
    aspect ratio is more than `ASPECT_TOLERANCE` off the photo's (a mask for another crop, or sideways), or
    when it is entirely black (no subject).
    """
    path = Path(path)
    photo_name = Path(photo).name if photo is not None else path.name[: -len(MASK_SUFFIX)] + ".*"
    fix = f"Save it again as a PNG mask of {photo_name} ({_HOW_TO_MASK}), or delete it."
    try:
        with Image.open(path) as im:
            im.load()
            mask = _brightness(_upright(im))
    except FileNotFoundError:
        raise ImageError(path, f"mask of {photo_name} not found", "Check its name: photo dog1.jpg, mask "
                         "dog1.mask.png.") from None
    except Image.DecompressionBombError:
        raise ImageError(path, f"the mask of {photo_name} is too large to load safely", fix) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise ImageError(path, f"the mask of {photo_name} cannot be read ({e})", fix) from None

    width, height = size
    w, h = mask.size
    # Rounding the photo's scaled size (and a mask drawn at another size) moves the ratio by up to a pixel.
    slack = ASPECT_TOLERANCE + 1 / min(width, height) + 1 / min(w, h)
    if abs(math.log((w / h) / (width / height))) > math.log1p(slack):
        sideways = abs(math.log((h / w) / (width / height))) <= math.log1p(slack)
        why = ": it is turned sideways, save it upright as the photo is shown" if sideways else \
            ": drawn for another crop?"
        raise ImageError(path, f"its shape ({w}x{h} px, width/height {w / h:.2f}) is not that of its photo "
                         f"{photo_name} ({width}x{height} px as loaded, {width / height:.2f}){why}", fix)
    if mask.getextrema()[1] < _BLACK:
        raise ImageError(path, f"the mask of {photo_name} is entirely black, so it marks no subject",
                         "Paint the subject white, or delete the mask (the photo then gets an automatic one).")
    return mask if mask.size == tuple(size) else mask.resize(tuple(size), Image.Resampling.BILINEAR)


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, as `load_image` does for photos; a broken EXIF block leaves it as stored."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


def _brightness(im: Image.Image) -> Image.Image:
    """The mask in any mode as 8-bit "L": its alpha channel when it has transparency, else its brightness."""
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        alpha = im.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
    if im.mode.startswith("I") or im.mode == "F":  # 16-bit (or 32-bit) grey: scale, do not clip
        a = np.asarray(im, dtype=np.float64)
        a = a * (255 / 65535) if a.max() > 255 else a
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return im.convert("L")


class Segmenter:
    """CLIPSeg through transformers: a soft subject mask of each photo from a class word ("dog").

    `Segmenter.load(name)` reads the model (Hub id or folder); call it on photos; `close()` (or a `with` block)
    frees its GPU memory before training needs it.
    """

    def __init__(self, model, processor, *, name: str, device):
        self.model = model
        self.processor = processor
        self.name = name
        """The Hub id or folder it was loaded from: part of the cache key of the masks it makes."""
        self.device = device

    @classmethod
    def load(cls, name_or_path: str = DEFAULT_SEGMENTER, *, device=None) -> "Segmenter":
        """Load CLIPSeg (downloaded once from the Hub, then cached) onto `device` (default: the GPU if there is
        one). Raises `ConfigError` naming the model and what to do when it cannot be loaded (offline, wrong id)."""
        import torch
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        try:
            processor = CLIPSegProcessor.from_pretrained(name_or_path)
            model = CLIPSegForImageSegmentation.from_pretrained(name_or_path)
        except (OSError, ValueError, ImportError) as err:  # offline, a wrong id or folder, an old transformers
            raise ConfigError(
                f"The subject segmenter {name_or_path} could not be loaded ({str(err).splitlines()[0][:160]}). "
                f"Put photo.mask.png beside each photo ({_HOW_TO_MASK}), or run where the Hub is reachable "
                "(Kaggle: turn Internet on) so it downloads once (about 600 MB), or set mask_segmenter to a "
                "CLIPSeg folder.") from err
        return cls(model.to(device).eval(), processor, name=str(name_or_path), device=device)

    @classmethod
    def loader(cls, name_or_path: str = DEFAULT_SEGMENTER, *, device=None) -> "SegmenterLoader":
        """A factory for `subject_masks` that loads this model only when a photo needs it, and names it for the
        cache (a bare lambda cannot)."""
        return SegmenterLoader(name=str(name_or_path), device=device)

    def __call__(self, images: list[Image.Image], word: str) -> list[Image.Image]:
        """One "L" mask per image, at that image's size: white where CLIPSeg finds `word`, soft at the edges
        (see the ramp above `_LOW`). CLIPSeg sees each image squashed to its square input; resizing its output
        back to the image undoes that."""
        import torch

        if self.model is None:
            raise ConfigError(f"The segmenter {self.name} was closed; load it again with Segmenter.load.")
        masks = []
        for start in range(0, len(images), _BATCH):
            report("masking the photos", start, len(images))  # (a panel's Stop ends it here)
            batch = [im.convert("RGB") for im in images[start:start + _BATCH]]
            inputs = self.processor(text=[word] * len(batch), images=batch, padding=True, return_tensors="pt")
            with torch.inference_mode():
                logits = self.model(**inputs.to(self.device)).logits
            # transformers 4.x squeezes a batch of one to (height, width).
            probabilities = torch.sigmoid(logits.float()).reshape(len(batch), *logits.shape[-2:]).cpu().numpy()
            masks += [_soft_mask(p, image.size) for p, image in zip(probabilities, batch)]
        return masks

    def close(self) -> None:
        """Drop the model and give its GPU memory back (training needs it all on a 16 GB card)."""
        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> "Segmenter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class SegmenterLoader:
    """`Segmenter.load(name, device=device)` deferred: `subject_masks` calls it only when a photo lacks a mask
    file, and reads `name` to find cached masks without loading anything."""

    name: str
    device: object = None

    def __call__(self) -> Segmenter:
        return Segmenter.load(self.name, device=self.device)


def _soft_mask(probabilities: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """CLIPSeg's (h, w) sigmoid probabilities → an "L" mask of `size`: the ramp `_LOW`..`_HIGH` (scaled down to
    a weak image's peak), then dilated by `_DILATION` of the shorter side."""
    p = np.asarray(Image.fromarray(probabilities.astype(np.float32), "F").resize(size, Image.Resampling.BILINEAR))
    high = max(min(_HIGH, float(p.max())), 1e-6)
    low = high * _LOW / _HIGH
    mask = Image.fromarray(np.rint(np.clip((p - low) / (high - low), 0, 1) * 255).astype(np.uint8), "L")
    radius = round(_DILATION * min(size))
    return mask.filter(ImageFilter.MaxFilter(2 * radius + 1)) if radius else mask


def subject_masks(photos: list[Path], images: list[Image.Image], *, word: str,
                  segmenter: Segmenter | Callable[[], Segmenter] | None = None, cache_dir=None,
                  make: bool = True) -> list[Mask | None]:
    """The subject mask of each photo (`images`: the photos as loaded, in the same order).

    `photo.mask.png` when it exists (`load_mask`), else an automatic mask of `word` by `segmenter`: a `Segmenter`,
    or a zero-argument factory (`Segmenter.loader(name)`) called only when some photo needs it — and then closed
    here, freeing its memory — so a folder where every photo has its mask never loads a model.

    With `cache_dir`, automatic masks are kept there as `<sha256>.png`, keyed by the segmenter's `name`, the word
    and the image's size and pixels, and reused without loading the model. A factory without a `name` (a lambda)
    is cached under "unnamed segmenter": changing the model it loads then reuses the other model's masks.

    `make=False` makes nothing: the masks there are (files, cached), None for the others — what the notebook
    shows before anything loads.

    Raises `ConfigError` naming the photos when some lack a mask and there is no segmenter; `ImageError` for a
    mask file that cannot be used; `ConfigError` when the segmenter cannot be loaded.
    """
    photos = [Path(p) for p in photos]
    if len(photos) != len(images):
        raise ConfigError(f"subject_masks needs one image per photo, got {len(photos)} photos and {len(images)} "
                          "images.")
    masks: list[Mask | None] = []
    for photo, image in zip(photos, images):
        file = mask_file(photo)
        masks.append(Mask(load_mask(file, size=image.size, photo=photo), "file") if file.exists() else None)
    missing = [i for i, mask in enumerate(masks) if mask is None]
    if missing and segmenter is None and make:
        names = ", ".join(photos[i].name for i in missing)
        raise ConfigError(f"No subject mask for {names}, and no segmenter to make one. Put a mask beside each "
                          f"(e.g. {mask_file(photos[missing[0]]).name}: {_HOW_TO_MASK}), or pass a segmenter "
                          "(Segmenter.loader()) to make them automatically.")

    cached: dict[int, Path] = {}
    if cache_dir is not None:
        name = getattr(segmenter, "name", "unnamed segmenter")
        cached = {i: Path(cache_dir) / f"{_cache_key(name, word, images[i])}.png" for i in missing}
        for i in list(missing):
            mask = _read_cached(cached[i], images[i].size)
            if mask is not None:
                masks[i] = Mask(mask, "auto")
                missing.remove(i)
    if missing and make:
        owned = not isinstance(segmenter, Segmenter)
        model = segmenter() if owned else segmenter
        try:
            made = model([images[i] for i in missing], word)
        finally:
            if owned:
                model.close()
        for i, image in zip(missing, made):
            masks[i] = Mask(image, "auto")
            if i in cached:
                atomic_write_bytes(cached[i], png_bytes(image))
    return masks


def _cache_key(name: str, word: str, image: Image.Image) -> str:
    digest = hashlib.sha256(f"{name}\0{word}\0{image.mode}\0{image.size}\0".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _read_cached(path: Path, size: tuple[int, int]) -> Image.Image | None:
    """A cached mask, or None when it is missing, unreadable or not of `size` (then it is made again)."""
    try:
        with Image.open(path) as im:
            mask = im.convert("L")
    except (OSError, ValueError, SyntaxError):
        return None
    return mask if mask.size == tuple(size) else None


def overlay(image: Image.Image, mask: Image.Image, *, colour=(255, 64, 64), opacity: float = 0.45) -> Image.Image:
    """`image` (RGB) with its background tinted `colour` at `opacity`, the subject left as it is: what training
    learns stays clear, what it mostly ignores is washed over — for the notebook's table of photos and masks.

    A grey mask pixel gets part of the tint. A `mask` of another size (a full mask over a thumbnail) is resized.
    """
    if not 0 <= opacity <= 1:
        raise ConfigError(f"overlay's opacity must be between 0 and 1, got {opacity!r}.")
    image = image.convert("RGB")
    mask = mask.convert("L")
    if mask.size != image.size:
        mask = mask.resize(image.size, Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    tint = opacity * (1 - np.asarray(mask, dtype=np.float32)[..., None] / 255)
    out = pixels * (1 - tint) + np.asarray(colour, dtype=np.float32) * tint
    return Image.fromarray(np.rint(out).astype(np.uint8), "RGB")

