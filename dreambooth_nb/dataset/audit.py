"""A closer look at a subject's usable photos before training: what would quietly make the model worse.

`scan_images` decides which files can be trained on at all; `audit` looks at the pictures themselves and
reports, per photo, what Dreambooth will make of them:

* near-duplicates: photos that look alike (burst shots, an edited copy) give one view of the subject extra
  weight and teach the model that view, pose and background instead of the subject;
* a small subject: with a mask, a subject that fills little of the training crop is learned from few pixels;
* a cut-off subject: training scales the shorter side to `resolution` and keeps the centred square, so a
  subject near the long side's ends loses part of itself (`crop.centre_crop_box` is that square, to draw it);
* an aspect ratio far from square: the crop throws much of the photo away (checked on photos without a mask;
  with one, the cut-off check measures what the crop loses of the subject itself);
* a low resolution: a photo smaller than the training resolution is scaled up and looks soft.

Every finding names its photos, says what is wrong and what to do; nothing is changed or deleted. Facts that
`scan_images` already warns about are not repeated here, so the user reads each fact once: pixel-identical
photos (the scan's "same picture") are taken as one photo before looking for near-duplicates, and photos
under `SMALL_PHOTO_FRACTION` of the resolution (the scan's "blurry") get no low-resolution finding; this
module grades the sizes between that and the resolution.

Near-duplicates, offline: the Pearson correlation of 16x16 colour thumbnails (`thumbnail_similarity`) rather
than a perceptual hash (pHash, dHash). On the 32 px toy photos, a 1-px shift with fresh noise flipped up to 30
of pHash's 64 bits (and 25 of dHash's), the same as between different photos, because a centred subject on a
plain background leaves most hash coefficients near the median they are compared with, where a shift or noise
flips them; the correlation weighs each part of the picture by its contrast instead, so the plain background
counts for nothing rather than for random bits. No comparison of pictures survives a shift across a fine
texture, though: 1 px across the toy subject's 8 px stripes changes them as much as a new photo would. With
`embed` (image embeddings, e.g. DINOv2's), the cosine similarity of the embeddings is used instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dreambooth_nb.dataset.crop import center_crop_origin, centre_crop_box, resized_size
from dreambooth_nb.dataset.images import SMALL_PHOTO_FRACTION, pixel_digest
from dreambooth_nb.errors import ConfigError

__all__ = ["Finding", "audit", "summary", "thumbnail_similarity"]

THUMBNAIL = 16
"""Side of the thumbnails compared for near-duplicates: each thumbnail pixel averages 1/16 of the photo's side,
so a shift of a few percent (a burst shot, a re-crop) moves the picture by under a thumbnail pixel, while a
different pose or framing moves it by several."""
NEAR_DUPLICATE_SIMILARITY = 0.95
"""Thumbnail correlation at or above which two photos count as near-duplicates. Shifting a subject of d px by
δ px moves its outline by δ/c of a thumbnail cell (c px), and one minus the correlation is about half the
squared change over the picture's variance: 1 - 2δ²/(π d c (1 - p)), with p the subject's share of the picture.
For a 1-px shift of a 20 px toy subject (c = 2, p = 0.3) that is 0.98; measured, with new noise, 0.966 and up.
Different toy photos of the subject (other sizes and places) stay under it: the most alike pair of
`world.subject_images(5)` (20 and 21 px, centres 1 px apart, the same background) is at 0.94."""
EMBEDDING_SIMILARITY = 0.95
"""Cosine similarity of image embeddings at or above which two photos count as near-duplicates. Not measured
(no model download on the machine that wrote this): the thumbnails' limit, as a starting point to check on
real photos with the model passed as `embed`."""
SMALL_SUBJECT = 0.10
"""A subject covering less than this fraction of the training crop is "small": at 512 px that is under ~160x160
px of subject, and the rest of the training signal is background the model learns as part of the subject."""
CUT_OFF = 0.15
"""More than this fraction of the subject outside the training crop is "cut off": a sliver at the frame (paws,
an ear tip) is common in good photos; beyond it, the model is taught a subject with a part missing."""
ASPECT_RATIO = 1.5
"""Long side over short side above which the crop's loss is reported: a 3:2 camera photo (exactly 1.5) loses a
third, which Dreambooth photos usually afford; 16:9 (1.78) loses 44 %, panoramas more."""


@dataclass(frozen=True)
class Finding:
    """One thing to fix in the photo set. `kind` is "near-duplicate", "small subject", "cut off", "aspect
    ratio" or "low resolution"; `message` names the photos, says what is wrong and what to do; `crop` is, for a
    cut-off subject, the square training keeps, (left, top, right, bottom) in the loaded photo's pixels."""

    photos: tuple[Path, ...]
    kind: str
    message: str
    crop: tuple[int, int, int, int] | None = None


def _training_crop(size: tuple[int, int], resolution: int) -> tuple[int, int, int, int]:
    """(left, top, width, height): the crop's corner in the image scaled for training, and that image's size."""
    top, left = center_crop_origin(size, resolution)
    return (left, top, *resized_size(size, resolution))


def thumbnail_similarity(images: Sequence[Image.Image]) -> np.ndarray:
    """(n, n) Pearson correlation of the images' `THUMBNAIL`-px colour thumbnails: 1 for the same picture at
    any size, brightness or contrast; near 0 for unrelated ones. The thumbnails are centred on their mean over
    all three colours, so colour counts as much as shape; a plain grey image has nothing to compare and is
    similar to nothing."""
    return _cosine(np.stack([_thumbnail(image) for image in images]))


def _thumbnail(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX), float).ravel()
    return pixels - pixels.mean()


def _cosine(vectors) -> np.ndarray:
    vectors = np.asarray(vectors.detach().cpu() if hasattr(vectors, "detach") else vectors, dtype=float)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    return unit @ unit.T


def audit(photos: Sequence[Path], images: Sequence[Image.Image], *, resolution: int,
          masks: Sequence[Image.Image | None] | None = None,
          embed: Callable[[list[Image.Image]], object] | None = None) -> list[Finding]:
    """What to fix in a subject's photos (`photos[i]` is the file `images[i]` was loaded from), before training
    at `resolution`.

    `images` are the photos as training loads them (`load_image(path, max_side=resolution)`, which records the
    size before scaling in `info["original_size"]`). `masks[i]`, when given and not None, marks the subject in
    `images[i]` (white = subject, grey = partly; any size, it is scaled to the photo): only photos with a mask
    are checked for a small or cut-off subject. `embed` maps a list of images to an (n, d) array or tensor of
    image embeddings (e.g. DINOv2's); without it near-duplicates are found offline by `thumbnail_similarity`.

    Findings come near-duplicates first, then photo by photo in the given order.
    """
    photos = [Path(p) for p in photos]
    masks = [None] * len(photos) if masks is None else list(masks)
    if not len(photos) == len(images) == len(masks):
        raise ConfigError(f"audit needs one image (and one mask or None) per photo: got {len(photos)} photos, "
                          f"{len(images)} images and {len(masks)} masks")
    if resolution < 1:
        raise ConfigError(f"resolution must be a positive number of pixels, got {resolution!r}")
    findings = _near_duplicates(photos, images, embed)
    for photo, image, mask in zip(photos, images, masks):
        if mask is not None:
            findings += _subject_findings(photo, image, mask, resolution)
        else:
            findings += _aspect_finding(photo, image, resolution)
        findings += _resolution_finding(photo, image, resolution)
    return findings


def _near_duplicates(photos: list[Path], images, embed) -> list[Finding]:
    """One finding per group of photos that look alike (pairs above the threshold, joined transitively)."""
    firsts: dict[str, int] = {}  # pixel-identical photos are one photo here: the scan names them already
    for i, image in enumerate(images):
        firsts.setdefault(pixel_digest(image), i)
    kept = sorted(firsts.values())
    if len(kept) < 2:
        return []
    chosen = [images[i] for i in kept]
    if embed is None:
        similarity, threshold = thumbnail_similarity(chosen), NEAR_DUPLICATE_SIMILARITY
    else:
        similarity, threshold = _cosine(embed(chosen)), EMBEDDING_SIMILARITY
    group = list(range(len(kept)))  # union-find: each photo's group leader

    def leader(i):
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i in range(len(kept)):
        for j in range(i):
            if similarity[i, j] >= threshold:
                group[leader(i)] = leader(j)
    members: dict[int, list[int]] = {}
    for i in range(len(kept)):
        members.setdefault(leader(i), []).append(i)
    findings = []
    for member in members.values():
        if len(member) < 2:
            continue
        paths = tuple(photos[kept[i]] for i in member)
        findings.append(Finding(paths, "near-duplicate", (
            f"{_names(paths)} look alike: keep the best one, or add more varied photos — near-duplicates give "
            "one view of the subject extra weight, and the model learns that view, pose and background with it.")))
    return findings


def _subject_findings(photo: Path, image: Image.Image, mask: Image.Image, resolution: int) -> list[Finding]:
    """Small-subject and cut-off findings, measured in the scaled image that training crops."""
    left, top, width, height = _training_crop(image.size, resolution)
    coverage = np.asarray(mask.convert("L").resize((width, height), Image.Resampling.BOX), float) / 255
    area = coverage.sum()
    if area == 0:
        return [Finding((photo,), "small subject", (
            f"{photo.name}: its mask marks no subject (it is all black). Paint the subject white in the mask, "
            "or delete the mask file."))]
    findings = []
    share = area / resolution**2
    if share < SMALL_SUBJECT:
        findings.append(Finding((photo,), "small subject", (
            f"{photo.name}: the subject fills only {_percent(share)} of the {resolution}x{resolution} training "
            f"crop (under {_percent(SMALL_SUBJECT)}, its details are learned from few pixels); crop the photo "
            "closer to the subject, or leave the photo out.")))
    cut = 1 - coverage[top:top + resolution, left:left + resolution].sum() / area
    if cut > CUT_OFF:
        box = centre_crop_box(image.size, resolution)
        findings.append(Finding((photo,), "cut off", (
            f"{photo.name}: training keeps the centred square {box} of this {image.width}x{image.height} photo, "
            f"which cuts off {_percent(cut)} of the subject; crop the photo square around the subject yourself, "
            "or leave it out."), crop=box))
    return findings


def _aspect_finding(photo: Path, image: Image.Image, resolution: int) -> list[Finding]:
    ratio = max(image.size) / min(image.size)
    if ratio <= ASPECT_RATIO:
        return []
    return [Finding((photo,), "aspect ratio", (
        f"{photo.name} is {image.width}x{image.height} (the long side {ratio:.2f}x the short side): the square "
        f"training crop {centre_crop_box(image.size, resolution)} loses {_percent(1 - 1 / ratio)} of the photo, "
        "and with it whatever of the subject is near the ends; crop the photo square around the subject "
        "yourself (or give it a mask, and the audit checks what the crop cuts)."))]


def _resolution_finding(photo: Path, image: Image.Image, resolution: int) -> list[Finding]:
    w, h = image.info.get("original_size", image.size)
    if not resolution * SMALL_PHOTO_FRACTION <= min(w, h) < resolution:
        return []
    return [Finding((photo,), "low resolution", (
        f"{photo.name} is {w}x{h}: training scales it up x{resolution / min(w, h):.1f} to {resolution} px on "
        "the shorter side, so its details will be a little soft; use a larger original if you have one."))]


def _names(paths) -> str:
    names = [p.name for p in paths]
    return ", ".join(names[:-1]) + f" and {names[-1]}"


def _percent(fraction: float) -> str:
    return "under 1 %" if 0 < fraction < 0.005 else f"{fraction:.0%}".replace("%", " %")


def summary(findings: Sequence[Finding]) -> str:
    """Lines for the notebook: one per finding, grouped by kind, or one line saying the photos look fine."""
    if not findings:
        return "Photo audit: nothing to fix."
    lines = [f"Photo audit: {len(findings)} thing(s) to look at (nothing was changed or deleted):"]
    kinds = list(dict.fromkeys(f.kind for f in findings))
    for kind in kinds:
        lines.append(f"{kind[0].upper()}{kind[1:]}:")
        lines += [f"  - {f.message}" for f in findings if f.kind == kind]
    return "\n".join(lines)
