"""Simple, honest measurements on generated toy-world images (numpy/PIL only).

Every classifier here is validated on rendered ground truth (see `tests/test_toyworld.py`), so a number
it reports about generated images means what it says:

* `background_of`, `foreground_mask`: the background is the median colour of the image border; the
  foreground is the largest connected blob of pixels that differ clearly from it.
* `colour_of(image)`: the colour name most of the foreground pixels are nearest to (a colour histogram).
* `shape_of(image)`: the foreground blob, cropped to its bounding box and resized, compared with rendered
  reference shapes (nearest neighbour).
* `prompt_accuracy(pipe, captions, seeds)`: generate, classify, and count how often colour and shape
  follow the caption.
* `subject_similarity(images, references)`: how alike the foreground colours of two sets of images are.
* `prompt_distance(tokenizer, text_encoder, a, b)`: how far apart the text encoder puts two prompts.

Dreambooth measurements (subject fidelity, class-prior drift, prompt fidelity) build on these.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache

import numpy as np
from PIL import Image

from dreambooth_nb.toy import world

_MASK_SIZE = 16  # shapes are compared as 16x16 masks of their bounding box


def _pixels(image) -> np.ndarray:
    """A float (H, W, 3) array in 0..255 from a PIL image or an array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=float)
    return np.asarray(image, dtype=float)[..., :3]


def background_of(image) -> np.ndarray:
    """The background colour: the median RGB of the image's one-pixel border."""
    px = _pixels(image)
    border = np.concatenate([px[0], px[-1], px[1:-1, 0], px[1:-1, -1]])
    return np.median(border, axis=0)


def background_name_of(image, *, palette: dict | None = None) -> str:
    """The name of the background colour (nearest of `palette`, default `world.BACKGROUNDS`)."""
    palette = world.BACKGROUNDS if palette is None else palette
    bg = background_of(image)
    return min(palette, key=lambda name: float(np.linalg.norm(bg - np.array(palette[name], dtype=float))))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (empty mask if there is none)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=int)
    best, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros_like(mask, dtype=bool)


def foreground_mask(image, *, threshold: float = 60.0, largest: bool = True) -> np.ndarray:
    """Boolean (H, W) mask of pixels whose RGB distance from the background exceeds `threshold`.

    With `largest=True` only the largest connected blob is kept, which drops stray noisy pixels.
    """
    px = _pixels(image)
    mask = np.linalg.norm(px - background_of(px), axis=-1) > threshold
    return _largest_component(mask) if largest else mask


def colour_votes(image, *, palette: dict | None = None, threshold: float = 60.0) -> dict[str, float]:
    """Fraction of foreground pixels nearest (in RGB) to each colour of `palette` (default: the world's)."""
    palette = world.COLOURS if palette is None else palette
    px = _pixels(image)[foreground_mask(image, threshold=threshold)]
    if len(px) == 0:
        return {name: 0.0 for name in palette}
    refs = np.array([palette[name] for name in palette], dtype=float)
    nearest = np.argmin(np.linalg.norm(px[:, None, :] - refs[None], axis=-1), axis=1)
    counts = np.bincount(nearest, minlength=len(refs)) / len(px)
    return {name: float(c) for name, c in zip(palette, counts)}


def colour_of(image, *, palette: dict | None = None, threshold: float = 60.0, min_pixels: int = 6) -> str | None:
    """The name of the dominant foreground colour (from `palette`, default `world.COLOURS`).

    None when fewer than `min_pixels` pixels stand out from the background (nothing was drawn).
    """
    if foreground_mask(image, threshold=threshold).sum() < min_pixels:
        return None
    votes = colour_votes(image, palette=palette, threshold=threshold)
    return max(votes, key=votes.get)


def _box_mask(mask: np.ndarray) -> np.ndarray:
    """`mask` cropped to its bounding box and resized to 16x16 floats in 0..1."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].astype(np.uint8) * 255
    return np.asarray(Image.fromarray(crop).resize((_MASK_SIZE, _MASK_SIZE), Image.BILINEAR), float) / 255


@lru_cache(maxsize=None)
def _reference_masks() -> dict[str, np.ndarray]:
    """Bounding-box masks of each world shape, rendered large and centred."""
    refs = {}
    for shape in world.SHAPES:
        image = world.render("blue", shape, background="white", size=24)
        refs[shape] = _box_mask(foreground_mask(image))
    return refs


def shape_scores(image, *, threshold: float = 60.0) -> dict[str, float]:
    """Mean absolute difference between the foreground's box mask and each reference shape's (lower = closer)."""
    mask = foreground_mask(image, threshold=threshold)
    if not mask.any():
        return {shape: 1.0 for shape in world.SHAPES}
    box = _box_mask(mask)
    return {shape: float(np.abs(box - ref).mean()) for shape, ref in _reference_masks().items()}


def shape_of(image, *, threshold: float = 60.0, min_pixels: int = 6) -> str | None:
    """The world shape ("circle", "square", "triangle") the foreground blob looks most like, or None."""
    if foreground_mask(image, threshold=threshold).sum() < min_pixels:
        return None
    scores = shape_scores(image, threshold=threshold)
    return min(scores, key=scores.get)


def generate(pipe, prompts, seeds, *, num_inference_steps: int = 25, guidance_scale: float = 4.0,
             size: int = world.IMAGE_SIZE) -> list[list[Image.Image]]:
    """Images for every prompt and seed: `result[i][j]` is `prompts[i]` generated with `seeds[j]`.

    Each seed drives its own `torch.Generator`, so an image depends only on (prompt, seed), not on
    which other prompts share its batch.
    """
    import torch

    prompts, seeds = list(prompts), list(seeds)
    out: list[list[Image.Image]] = [[] for _ in prompts]
    for seed in seeds:
        generators = [torch.Generator().manual_seed(int(seed)) for _ in prompts]
        images = pipe(prompts, generator=generators, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, height=size, width=size, output_type="pil").images
        for i, image in enumerate(images):
            out[i].append(image)
    return out


def prompt_accuracy(pipe, captions, seeds, *, num_inference_steps: int = 25, guidance_scale: float = 4.0,
                    images=None) -> dict:
    """How often generations follow the colour and shape their caption names.

    Generates every caption with every seed (or scores the given `images`, shaped like `generate`'s
    result) and returns a dict: `colour`, `shape`, `both` (fractions of generations where the named
    colour / shape / both were recognised; items a caption does not name count as correct),
    `background` (fraction right among generations whose caption names a background, None if none
    does; `n_background` of them), `chance_colour`, `chance_shape` and `chance_background` (the
    accuracy of guessing), `n`, and `records`, one `(caption, seed, colour_seen, shape_seen,
    background_seen)` per generation.
    """
    captions, seeds = list(captions), list(seeds)
    if images is None:
        images = generate(pipe, captions, seeds, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale)
    records, colour_ok, shape_ok, both_ok, bg_ok, bg_n = [], 0, 0, 0, 0, 0
    for caption, row in zip(captions, images):
        wanted = world.parse_caption(caption)
        for seed, image in zip(seeds, row):
            colour, shape, background = colour_of(image), shape_of(image), background_name_of(image)
            c = wanted["colour"] is None or colour == wanted["colour"]
            s = wanted["shape"] is None or shape == wanted["shape"]
            colour_ok, shape_ok, both_ok = colour_ok + c, shape_ok + s, both_ok + (c and s)
            if wanted["background"] is not None:
                bg_n, bg_ok = bg_n + 1, bg_ok + (background == wanted["background"])
            records.append((caption, seed, colour, shape, background))
    n = max(len(records), 1)
    return {
        "colour": colour_ok / n,
        "shape": shape_ok / n,
        "both": both_ok / n,
        "background": bg_ok / bg_n if bg_n else None,
        "n_background": bg_n,
        "chance_colour": 1 / len(world.COLOURS),
        "chance_shape": 1 / len(world.SHAPES),
        "chance_background": 1 / len(world.BACKGROUNDS),
        "n": len(records),
        "records": records,
    }


def prompt_distance(tokenizer, text_encoder, prompt: str, reference: str) -> float:
    """How far apart a text encoder puts two prompts: ‖h(prompt) − h(reference)‖ / ‖h(reference)‖.

    `h` is the encoder's last hidden state over the whole padded sequence (`model_max_length` tokens), the
    condition the UNet cross-attends to; 0 means the UNet cannot tell the prompts apart. On the toy model
    of issue 13's time "a photo of sks circle" was 0.04 from "a photo of a circle" (a colour, "a photo of
    a red circle", 0.58): Dreambooth's prior preservation then pulls one condition two ways.
    """
    import torch

    ids = tokenizer([prompt, reference], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text_encoder(ids.to(text_encoder.device))[0].float()
    return float((hidden[0] - hidden[1]).norm() / hidden[1].norm())


def subject_similarity(images, references, *, palette: dict | None = None) -> float:
    """Mean foreground colour-histogram intersection (0..1) of every image with every reference.

    Each image's histogram is `colour_votes` over `palette` (default `world.ALL_COLOURS`: the world's
    colours, the backgrounds' and purple, orange, magenta, cyan, pink, brown). 1 means the same mix of
    named foreground colours (e.g. the subject's purple and orange stripes), 0 none in common.
    """
    palette = world.ALL_COLOURS if palette is None else palette
    refs = [np.array(list(colour_votes(r, palette=palette).values())) for r in references]
    hists = [np.array(list(colour_votes(im, palette=palette).values())) for im in images]
    scores = [np.minimum(h, r).sum() for h in hists for r in refs]
    return float(np.mean(scores)) if scores else 0.0


# --- Dreambooth measurements: the same three numbers for every checkpoint ------------------------------------

def subject_fidelity(images, instance_images, *, shape: str = world.SUBJECT_CLASS,
                     palette: dict | None = None) -> float:
    """How much generations for the instance prompt look like the instance photos (0..1, higher = closer).

    Per image: its `subject_similarity` to the instance photos (mean foreground colour-histogram
    intersection with each photo: the subject's purple and orange) if `shape_of` sees the subject's
    `shape` (default "circle"), else 0. The result is the mean over `images`. It measures colours and
    outline, not the stripes' geometry. Reference points: the instance photos against themselves score
    about 0.84, other photos of the subject about 0.85, photo-like solid red/green/blue/yellow circles
    0.02-0.06, and the toy base model's "a photo of sks circle" about 0.08 (its orange-ish circles).
    """
    images, instance_images = list(images), list(instance_images)
    if not images:
        return 0.0
    scores = [subject_similarity([image], instance_images, palette=palette) if shape_of(image) == shape else 0.0
              for image in images]
    return float(np.mean(scores))


def _palette_histogram(image, palette: dict) -> np.ndarray:
    """Fraction of all pixels (background included) nearest in RGB to each colour of `palette`."""
    px = _pixels(image).reshape(-1, 3)
    refs = np.array(list(palette.values()), dtype=float)
    nearest = np.argmin(np.linalg.norm(px[:, None, :] - refs[None], axis=-1), axis=1)
    return np.bincount(nearest, minlength=len(refs)) / len(px)


def class_drift(images, base_images, *, method: str = "pixels", palette: dict | None = None) -> float:
    """How far generations for the class prompt moved from the base model's, seed for seed (0 = unchanged).

    `images[i]` and `base_images[i]` must come from the same prompt and seed (the fine-tuned and the base
    model). `method="pixels"`: the mean absolute per-channel difference divided by 255, so 0..1 (two
    unrelated toy-world images typically differ by 0.2–0.4). `method="histogram"`: 1 minus the
    intersection of the two images' palette histograms over all pixels (default palette
    `world.ALL_COLOURS`), 0..1; it ignores where things are and only sees which colours are drawn.
    The mean over the pairs is returned.
    """
    images, base_images = list(images), list(base_images)
    if len(images) != len(base_images):
        raise ValueError(f"class_drift: {len(images)} images but {len(base_images)} base images; give one base "
                         "image per image, generated with the same prompt and seed.")
    if not images:
        return 0.0
    if method == "pixels":
        distances = [np.abs(_pixels(a) - _pixels(b)).mean() / 255.0 for a, b in zip(images, base_images)]
    elif method == "histogram":
        palette = world.ALL_COLOURS if palette is None else palette
        distances = [1.0 - np.minimum(_palette_histogram(a, palette), _palette_histogram(b, palette)).sum()
                     for a, b in zip(images, base_images)]
    else:
        raise ValueError(f"class_drift: method {method!r} is unknown; use 'pixels' or 'histogram'.")
    return float(np.mean(distances))


def prompt_fidelity(images, *, background: str = world.SUBJECT_CONTEXT_BACKGROUND,
                    shape: str = world.SUBJECT_CLASS, max_distance: float = 60.0, instance_images=None,
                    min_similarity: float = 0.25) -> float:
    """Fraction of generations for the context prompt that follow it (0..1).

    An image counts when its background (`background_of`, the median border colour) is within
    `max_distance` (RGB) of the named `background` (default black, the colour of
    `world.SUBJECT_CONTEXT_PROMPT`) and is nearest to it among `world.BACKGROUNDS`, and its
    foreground is still the subject's `shape` (default circle). With `instance_images`, it must also show
    the subject: `subject_similarity` to them of at least `min_similarity`.
    """
    images = list(images)
    if not images:
        return 0.0
    wanted = np.array(world.BACKGROUNDS[background], dtype=float)
    ok = 0
    for image in images:
        follows = (background_name_of(image) == background
                   and float(np.linalg.norm(background_of(image) - wanted)) <= max_distance
                   and shape_of(image) == shape)
        if follows and instance_images is not None:
            follows = subject_similarity([image], instance_images) >= min_similarity
        ok += follows
    return ok / len(images)
