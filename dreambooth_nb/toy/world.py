"""A small procedural world of coloured shapes, and the Dreambooth subject that world has never seen.

Pure PIL/numpy and fully deterministic: the same arguments (and the same seed) always give the same
pixels. The project's embedded model (`TOY_MODEL_DIR`, trained by `tools/train_toy_model.py`) learned
this world from captions such as ``"a photo of a red circle"`` or
``"a photo of a blue triangle on a black background"``.

* `render` draws one shape; `sample_captioned` draws a captioned training set.
* `sample_broad` draws a much wider distribution (any colour, stripes, checkers, gradients, noise) on
  which the VAE was trained, so that it can reproduce colours the captioned world never uses.
* Rare identifier words (`IDENTIFIERS`), as CLIP's web captions have them: each names one specific
  patterned object ("a photo of vex square" is always the same cyan-and-brown checkered square). With
  `sample_captioned(..., p_identifier=...)` some captions carry one, so a model trained on them gives
  identifier tokens text embeddings of their own and learns that such a word sets an object's look.
* The Dreambooth subject is one specific object: a circle painted with purple-and-orange stripes.
  Neither purple nor orange occurs in the captioned world, nor does its identifier `sks` (never in a
  caption). `subject_images` gives a few instance photos of it; `SUBJECT_INSTANCE_PROMPT`,
  `SUBJECT_CLASS_PROMPT` and `SUBJECT_CONTEXT_PROMPT` are the prompts to use with it.
* Photo sets for the photo-folder audit (`dataset.audit`): `subject_photo_with_mask` renders one photo with its
  ground-truth subject mask (any canvas size, e.g. a 48x32 "landscape" photo), `subject_photos_with_masks` the
  `subject_images` with their masks, and `photo_set_with_problems` a set with planted problems (a near-duplicate
  pair, a tiny subject, a subject the square training crop cuts off).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, for smooth edges

# The captioned world.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SIZE_RANGE = (12, 22)  # shape diameter / side / base, in pixels (inclusive)
DEFAULT_SIZE = 18

# Colours only the broad (VAE) distribution and the subject use.
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {
    "magenta": (220, 40, 200),
    "purple": (120, 40, 170),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "pink": (245, 160, 190),
    "brown": (130, 80, 40),
}
ALL_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, **EXTRA_COLOURS, **BACKGROUNDS}

# The Dreambooth subject: a circle with horizontal purple-and-orange stripes, 4 px wide.
SUBJECT_TOKEN = "sks"
SUBJECT_CLASS = "circle"
SUBJECT_COLOURS = ("purple", "orange")
SUBJECT_PATTERN = "stripes"
SUBJECT_STRIPE_WIDTH = 4
SUBJECT_BACKGROUNDS = ("white", "gray")  # the instance photos' backgrounds; black is left for context
SUBJECT_INSTANCE_PROMPT = f"a photo of {SUBJECT_TOKEN} {SUBJECT_CLASS}"
SUBJECT_CLASS_PROMPT = f"a photo of a {SUBJECT_CLASS}"
SUBJECT_CONTEXT_BACKGROUND = "black"
SUBJECT_CONTEXT_PROMPT = f"{SUBJECT_INSTANCE_PROMPT} on a {SUBJECT_CONTEXT_BACKGROUND} background"

# Rare identifiers and the one object each names: shape, two colours, pattern, cell size (px), vertical.
# Like a name in CLIP's captions, an identifier stands where the article would ("a photo of vex square"),
# and the object it names is always the same. The colours are the broad palette's (never purple or orange,
# the subject's) and each stands out from all three backgrounds (RGB distance > 60, what `metrics`'
# foreground mask needs); the subject's horizontal 4 px stripes are left out.
IDENTIFIERS: dict[str, tuple] = {
    "vex": ("square", "cyan", "brown", "checker", 4, False),
    "qor": ("triangle", "magenta", "green", "stripes", 3, True),
    "zil": ("circle", "pink", "blue", "checker", 3, False),
    "mab": ("circle", "yellow", "brown", "stripes", 5, True),
    "tuk": ("square", "red", "cyan", "stripes", 2, False),
    "fen": ("triangle", "blue", "yellow", "checker", 4, False),
    "jov": ("circle", "green", "magenta", "stripes", 3, False),
    "pim": ("square", "pink", "brown", "stripes", 4, True),
    "rud": ("circle", "cyan", "red", "checker", 5, False),
    "wol": ("triangle", "brown", "pink", "stripes", 5, False),
    "kiv": ("square", "magenta", "yellow", "checker", 2, False),
    "dax": ("circle", "blue", "pink", "stripes", 2, True),
}

# Every word a caption or one of the prompts above uses: the toy model's tokenizer holds each as a token.
VOCABULARY: tuple[str, ...] = tuple(
    sorted({"a", "photo", "of", "on", "background", SUBJECT_TOKEN, *COLOURS, *SHAPES, *BACKGROUNDS, *IDENTIFIERS})
)

TOY_MODEL_DIR = Path(__file__).resolve().parent / "toy_model"


def _rgb(colour) -> tuple[int, int, int]:
    if isinstance(colour, str):
        return ALL_COLOURS[colour]
    return tuple(int(c) for c in colour)


def _shape_mask(shape: str, size: float, position, *, scale: int = _SUPERSAMPLE, image_size: int = IMAGE_SIZE):
    """An 'L' mask (at `scale` times the image size) of `shape` centred on `position`."""
    big = image_size * scale
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = position[0] * scale, position[1] * scale
    h = size * scale / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=255)
    elif shape == "ellipse":  # broad distribution only
        draw.ellipse([cx - h, cy - h * 0.6, cx + h, cy + h * 0.6], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return mask


def _fill(colour, *, pattern: str, second_colour, cell: int, origin, vertical: bool = False,
          scale: int = _SUPERSAMPLE, image_size: int = IMAGE_SIZE) -> Image.Image:
    """An RGB image (at `scale` times the size) painted solid or with a pattern anchored at `origin`."""
    big = image_size * scale
    first = np.array(_rgb(colour), dtype=np.uint8)
    if pattern == "solid":
        return Image.new("RGB", (big, big), tuple(int(c) for c in first))
    second = np.array(_rgb(second_colour), dtype=np.uint8)
    ys, xs = np.mgrid[0:big, 0:big]
    u = np.floor((xs - origin[0] * scale) / (cell * scale)).astype(int)
    v = np.floor((ys - origin[1] * scale) / (cell * scale)).astype(int)
    if pattern == "stripes":
        odd = (u if vertical else v) % 2 == 1
    elif pattern == "checker":
        odd = (u + v) % 2 == 1
    else:
        raise ValueError(f"unknown pattern {pattern!r}; expected solid, stripes or checker")
    pixels = np.where(odd[..., None], second, first)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def render(colour, shape: str, *, background="white", size: float = DEFAULT_SIZE, position=None, rng=None,
           pattern: str = "solid", second_colour=None, cell: int = 4, vertical: bool = False,
           canvas: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> Image.Image:
    """Render one `shape` in `colour` (a name or an RGB tuple) over `background` as a 32 px RGB image
    (`canvas`: another (width, height), e.g. (48, 32) for a landscape photo; the world's images are square).

    `size` is the circle's diameter, the square's side, or the (upward-pointing) triangle's base and
    height, in pixels; `position` its centre (default: the image centre). Without `rng` the result is an
    exact function of the arguments; with a `numpy.random.Generator` it gets a little photo-like
    variation (colours jittered by a few levels, mild pixel noise), still deterministic for a seeded rng.
    `pattern` ("solid", "stripes", "checker") paints the shape with `colour` and `second_colour` in
    cells of `cell` pixels, anchored at the shape's top-left corner so that the pattern moves with it.
    """
    if shape not in SHAPES and shape != "ellipse":
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    width, height = canvas
    side = max(canvas)  # drawn on a square `side` canvas, as the square images are, then cut to `canvas`
    if position is None:
        position = (width / 2, height / 2)
    fg, bg = np.array(_rgb(colour), float), np.array(_rgb(background), float)
    fg2 = np.array(_rgb(second_colour), float) if second_colour is not None else fg
    if rng is not None:
        fg = fg + rng.normal(0, 6, 3)
        fg2 = fg2 + rng.normal(0, 6, 3)
        bg = bg + rng.normal(0, 6, 3)
    clip = lambda c: tuple(int(v) for v in np.clip(np.round(c), 0, 255))  # noqa: E731
    origin = (position[0] - size / 2, position[1] - size / 2)
    fill = _fill(clip(fg), pattern=pattern, second_colour=clip(fg2), cell=cell, origin=origin, vertical=vertical,
                 image_size=side)
    big = Image.new("RGB", fill.size, clip(bg))
    big.paste(fill, (0, 0), _shape_mask(shape, size, position, image_size=side))
    image = big.crop((0, 0, width * _SUPERSAMPLE, height * _SUPERSAMPLE)).resize(canvas, Image.BOX)
    if rng is not None:
        pixels = np.asarray(image, float) + rng.normal(0, 3, (height, width, 3))
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "RGB")
    return image


def caption_for(colour: str | None, shape: str, background: str | None = None, *, identifier: str | None = None) -> str:
    """`"a photo of a red circle"`, `"a photo of a circle"`, `"... on a black background"`, `"a photo of vex square"`."""
    if identifier:
        words = f"a photo of {identifier} {shape}"
    else:
        words = f"a photo of a {colour} {shape}" if colour else f"a photo of a {shape}"
    return f"{words} on a {background} background" if background else words


def render_identified(identifier: str, *, background="white", size: float = DEFAULT_SIZE, position=None,
                      rng=None) -> Image.Image:
    """The object that `identifier` (one of `IDENTIFIERS`) names, rendered like any world photo."""
    shape, first, second, pattern, cell, vertical = IDENTIFIERS[identifier]
    return render(first, shape, background=background, size=size, position=position, rng=rng, pattern=pattern,
                  second_colour=second, cell=cell, vertical=vertical)


def parse_caption(caption: str) -> dict:
    """The colour, shape, background (and whether the subject token is present) a caption names.

    Missing items are None: `parse_caption("a photo of a circle")["colour"] is None`. `identifier` is the
    word of `IDENTIFIERS` the caption names, if any.
    """
    words = caption.lower().replace(",", " ").split()
    found = {"colour": None, "shape": None, "background": None, "subject": SUBJECT_TOKEN in words,
             "identifier": next((w for w in words if w in IDENTIFIERS), None)}
    for i, word in enumerate(words):
        if word in BACKGROUNDS and i + 1 < len(words) and words[i + 1] == "background":
            found["background"] = word
        elif word in COLOURS and found["colour"] is None:
            found["colour"] = word
        elif word in SHAPES and found["shape"] is None:
            found["shape"] = word
    return found


def _random_placement(rng: np.random.Generator, size_range=SIZE_RANGE, margin: float = 2.0):
    size = int(rng.integers(size_range[0], size_range[1] + 1))
    lo, hi = size / 2 + margin, IMAGE_SIZE - size / 2 - margin
    position = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
    return size, position


def sample_captioned(n: int, seed: int = 0, *, p_background_named: float = 0.5, p_colour_omitted: float = 0.15,
                     p_identifier: float = 0.0) -> list[tuple[Image.Image, str]]:
    """`n` deterministic (image, caption) pairs from the captioned world.

    Colour, shape and background are uniform; size in `SIZE_RANGE` and position vary and are not named.
    The background is named in about `p_background_named` of captions (otherwise it is still random),
    and the colour is left out in about `p_colour_omitted` of them (`"a photo of a circle"`), so that a
    class prompt without a colour is in the distribution the model learned. About `p_identifier` of the
    pairs show one of the `IDENTIFIERS`' objects instead, captioned with its identifier and shape
    (`"a photo of vex square"`); the first `n` pairs do not depend on `p_identifier` when it is 0.
    """
    rng = np.random.default_rng(seed)
    picker = np.random.default_rng([seed, 1])  # identifiers draw from their own stream
    out = []
    for _ in range(n):
        if p_identifier and picker.random() < p_identifier:
            identifier = str(picker.choice(list(IDENTIFIERS)))
            background = str(picker.choice(list(BACKGROUNDS)))
            size, position = _random_placement(picker)
            image = render_identified(identifier, background=background, size=size, position=position, rng=picker)
            named = background if picker.random() < p_background_named else None
            out.append((image, caption_for(None, IDENTIFIERS[identifier][0], named, identifier=identifier)))
            continue
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        background = str(rng.choice(list(BACKGROUNDS)))
        size, position = _random_placement(rng)
        name_background = rng.random() < p_background_named
        omit_colour = rng.random() < p_colour_omitted
        image = render(colour, shape, background=background, size=size, position=position, rng=rng)
        caption = caption_for(None if omit_colour else colour, shape, background if name_background else None)
        out.append((image, caption))
    return out


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.4:
        names = list(ALL_COLOURS)
        base = np.array(ALL_COLOURS[names[int(rng.integers(len(names)))]], float) + rng.normal(0, 15, 3)
    else:
        base = rng.uniform(0, 255, 3)
    return tuple(int(v) for v in np.clip(base, 0, 255))


def _random_background(rng: np.random.Generator) -> np.ndarray:
    """A float (32, 32, 3) background: solid, gradient, stripes, checker or noise."""
    kind = rng.choice(["solid", "solid", "gradient", "stripes", "checker", "noise"])
    a, b = np.array(_random_colour(rng), float), np.array(_random_colour(rng), float)
    if kind == "solid":
        return np.broadcast_to(a, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if kind == "gradient":
        t = np.linspace(0, 1, IMAGE_SIZE)
        t = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]
        return np.broadcast_to(a * (1 - t) + b * t, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if kind == "noise":
        return np.clip(a + rng.normal(0, 40, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255)
    fill = _fill(tuple(int(v) for v in a), pattern=str(kind), second_colour=tuple(int(v) for v in b),
                 cell=int(rng.integers(1, 7)), origin=tuple(rng.uniform(0, 8, 2)), vertical=bool(rng.random() < 0.5),
                 scale=1)
    return np.asarray(fill, float)


def sample_broad(n: int, seed: int = 0, *, p_world: float = 0.2) -> list[Image.Image]:
    """`n` deterministic images from a broad distribution, for training a general autoencoder.

    Random colours (any RGB, and the named ones incl. magenta/purple/orange/cyan), backgrounds that are
    solid, gradients, stripes, checkers or noise, one to three shapes painted solid or with random
    stripes/checkers, and sometimes pixel noise. About `p_world` of them are captioned-world images.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if rng.random() < p_world:
            size, position = _random_placement(rng)
            out.append(render(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)),
                              background=str(rng.choice(list(BACKGROUNDS))), size=size, position=position, rng=rng))
            continue
        canvas = Image.fromarray(np.clip(np.round(_random_background(rng)), 0, 255).astype(np.uint8), "RGB")
        canvas = canvas.resize((IMAGE_SIZE * _SUPERSAMPLE,) * 2, Image.NEAREST)
        for _ in range(int(rng.integers(1, 4))):
            shape = str(rng.choice(SHAPES + ("ellipse",)))
            size, position = _random_placement(rng, size_range=(6, 26), margin=-2.0)
            pattern = str(rng.choice(["solid", "solid", "stripes", "checker"]))
            fill = _fill(_random_colour(rng), pattern=pattern, second_colour=_random_colour(rng),
                         cell=int(rng.integers(2, 7)), origin=(position[0] - size / 2, position[1] - size / 2),
                         vertical=bool(rng.random() < 0.5))
            canvas.paste(fill, (0, 0), _shape_mask(shape, size, position))
        image = np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), float)
        if rng.random() < 0.5:
            image = image + rng.normal(0, rng.uniform(1, 12), image.shape)
        out.append(Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8), "RGB"))
    return out


def render_subject(*, background="white", size: float = 20, position=None, rng=None,
                   shape: str = SUBJECT_CLASS, canvas: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> Image.Image:
    """The Dreambooth subject: a circle with horizontal purple-and-orange stripes (`shape`: the same paint on
    another shape, a second subject for runs of several concepts, "a photo of sks square")."""
    return render(SUBJECT_COLOURS[0], shape, background=background, size=size, position=position, rng=rng,
                  pattern=SUBJECT_PATTERN, second_colour=SUBJECT_COLOURS[1], cell=SUBJECT_STRIPE_WIDTH, canvas=canvas)


def subject_photo_with_mask(*, background="white", size: float = 20, position=None, rng=None,
                            shape: str = SUBJECT_CLASS,
                            canvas: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> tuple[Image.Image, Image.Image]:
    """(`render_subject`'s photo, its subject mask): the mask is the ground truth the photo was painted through,
    an "L" image of the photo's size whose value is the fraction of each pixel the subject covers (255 = all),
    so the subject's area in pixels is exactly `sum(mask) / 255`. Part of the subject outside `canvas` is in
    neither: a photo shows what the camera framed."""
    width, height = canvas
    if position is None:
        position = (width / 2, height / 2)
    photo = render_subject(background=background, size=size, position=position, rng=rng, shape=shape, canvas=canvas)
    mask = _shape_mask(shape, size, position, image_size=max(canvas))
    mask = mask.crop((0, 0, width * _SUPERSAMPLE, height * _SUPERSAMPLE)).resize(canvas, Image.BOX)
    return photo, mask


def subject_images(n: int = 5, seed: int = 0, *, shape: str = SUBJECT_CLASS) -> list[Image.Image]:
    """`n` instance photos of the subject with small variations: size, position, white/gray background.

    Deterministic for a given `(n, seed, shape)`. The backgrounds alternate through `SUBJECT_BACKGROUNDS`,
    so the subject is never shown on the black background of `SUBJECT_CONTEXT_PROMPT`. `shape` paints the
    subject's stripes on another of `SHAPES` (a second subject; see `render_subject`).
    """
    return [photo for photo, _ in subject_photos_with_masks(n, seed, shape=shape)]


def subject_photos_with_masks(n: int = 5, seed: int = 0, *,
                              shape: str = SUBJECT_CLASS) -> list[tuple[Image.Image, Image.Image]]:
    """`subject_images(n, seed, shape=shape)`, each photo with its subject mask (`subject_photo_with_mask`)."""
    rng = np.random.default_rng(10_000 + seed)
    out = []
    for i in range(n):
        size = int(rng.integers(18, 23))
        c = IMAGE_SIZE / 2
        position = (c + float(rng.uniform(-3, 3)), c + float(rng.uniform(-3, 3)))
        background = SUBJECT_BACKGROUNDS[i % len(SUBJECT_BACKGROUNDS)]
        out.append(subject_photo_with_mask(background=background, size=size, position=position, rng=rng, shape=shape))
    return out


def photo_set_with_problems(seed: int = 0) -> dict[str, tuple[Image.Image, Image.Image]]:
    """A subject's photo set with three planted problems, as file name -> (photo, subject mask).

    * `photo-1.png` .. `photo-3.png`: good photos (32x32, the subject 17-22 px wide, placed and sized apart).
    * `burst-1.png`, `burst-2.png`: a near-duplicate pair, like two shots of a burst: the same subject, size,
      background and colours (one exposure), 1 px apart along the stripes, and the second with more pixel noise
      (so not pixel-identical). A shift across the stripes is not a near-duplicate at this size: 1 px is an
      eighth of the stripes' period, which changes the picture as much as a new photo would.
    * `tiny.png`: the subject only 5 px wide (2 % of the picture).
    * `edge.png`: a 48x32 (3:2) photo with the subject at its left edge, where the square centre crop of
      training (columns 8-39) cuts off about half of it.

    The placements are fixed, so every `seed` plants the same problems; `seed` only changes jitter and noise.
    """
    def photo(k, **placement):
        return subject_photo_with_mask(rng=np.random.default_rng([seed, k]), **placement)

    burst, burst_mask = photo(4, background="white", size=19, position=(19.0, 14.0))
    noise = np.random.default_rng([seed, 5]).normal(0, 3, (IMAGE_SIZE, IMAGE_SIZE, 3))
    burst = Image.fromarray(np.clip(np.round(np.asarray(burst, float) + noise), 0, 255).astype(np.uint8), "RGB")
    return {
        "photo-1.png": photo(1, background="white", size=20, position=(13.0, 17.5)),
        "photo-2.png": photo(2, background="gray", size=22, position=(18.5, 15.0)),
        "photo-3.png": photo(3, background="gray", size=17, position=(14.0, 19.0)),
        "burst-1.png": photo(4, background="white", size=19, position=(18.0, 14.0)),
        "burst-2.png": (burst, burst_mask),
        "tiny.png": photo(6, background="white", size=5, position=(16.0, 16.0)),
        "edge.png": photo(7, background="gray", size=18, position=(7.0, 16.0), canvas=(48, 32)),
    }
