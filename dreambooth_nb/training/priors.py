"""Class images for prior preservation: yours first, the shortfall generated once, deterministically.

The class folder may already hold images — a regularization set you brought (hundreds of "person" or
"dog" photos, as kohya's and TheLastBen's guides suggest) — and they count: every usable image in the
folder is yours unless it is named `class-NNNNN.png`, the name generated images get. Training uses exactly
`num_class_images`: your images first (in name order), then generated ones by index; only the images
still missing are generated. Generated image i always comes from seed (seed, i), so it is the same image
whether it is made in the first batch or after a Colab disconnect, and a rerun writes nothing new.
"""

from __future__ import annotations

import dataclasses
import gc
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dreambooth_nb.model import snapshots
from dreambooth_nb.errors import DataError
from dreambooth_nb.model.base import BaseModel
from dreambooth_nb.dataset.classes import class_image_path, class_images
from dreambooth_nb.dataset.images import CAPTION_SUFFIX, png_bytes, scan_images
from dreambooth_nb.progress import in_task, report
from dreambooth_nb.training.validation import REFERENCE_IMAGES, hash_seed
from dreambooth_nb.storage import atomic_write_bytes


def image_seed(seed: int, index: int) -> int:
    return seed * 100_003 + index


BASE_RENDERS = "base-model-renders"
"""Beside the run folders (`output_dir`'s parent): the base model's renders of each class prompt that the
validation loss's prior half uses when prior preservation is off, made once and shared by every run there."""


def reference_folder(config, subject, *, number: int = 1) -> Path:
    """Where the base model's renders of `subject`'s class prompt are: the run's own `validation/` folder
    (`validation-2/`, ... for further subjects) when an earlier version made them there (a resumed run keeps
    its numbers), else a folder shared by the runs beside it, named by what decides the images."""
    own = Path(config.output_dir) / ("validation" if number == 1 else f"validation-{number}")
    if own.is_dir() and any(own.glob("class-*.png")):
        return own
    base = BaseModel.of(config)
    model = str(Path(base.path).resolve()) if Path(base.path).exists() else base.path
    key = hash_seed(model, config.revision, config.variant, config.vae_model_name_or_path, subject.class_prompt,
                    config.resolution, config.seed)
    words = re.sub(r"[^a-z0-9]+", "-", subject.class_prompt.lower()).strip("-")[:40]
    return Path(config.output_dir).parent / BASE_RENDERS / f"{words}-{config.resolution}px-{key % 16**8:08x}"


def _reference_subjects(config) -> list:
    """Per subject: a `Concept` whose class folder holds the base model's renders of its class prompt, or None
    (no class prompt)."""
    return [dataclasses.replace(subject, class_data_dir=str(reference_folder(config, subject, number=number)),
                                num_class_images=REFERENCE_IMAGES) if subject.class_prompt else None
            for number, subject in enumerate(config.concepts, start=1)]


def render_reference_images(config, *, shard: tuple[int, int] = (0, 1), device: torch.device | None = None) -> None:
    """Render the base model's images of each subject's class prompt that are still missing (this process's
    share of them, `shard` as in `generate_class_images`): the prior half of the validation loss when prior
    preservation is off (`validation.py`). Deterministic like class images, and made once for every run
    beside this one (`reference_folder`)."""
    for reference in _reference_subjects(config):
        if reference is not None and class_images(reference, resolution=config.resolution, decode=False).to_generate:
            if shard[0] == 0:
                print(f"Rendering {REFERENCE_IMAGES} images of '{reference.class_prompt}' with the base model, once "
                      f"for the runs in {Path(config.output_dir).parent}: the validation loss measures how far "
                      "training moves the class from them.")
            # One image at a time: SDXL at 1024 px with guidance at batch 4 would not fit a T4 beside nothing else.
            generate_class_images(config.replace(concepts=[reference], sample_batch_size=1), quiet=True, shard=shard,
                                  device=device)


def reference_images(config) -> list[list[Path]]:
    """Per subject, the base model's renders of its class prompt (`render_reference_images` made them); empty
    for a subject without a class prompt."""
    return [class_images(reference, resolution=config.resolution).selected if reference is not None else []
            for reference in _reference_subjects(config)]


def generate_class_images(config, *, device: torch.device | None = None, pipe=None, quiet: bool = False,
                          shard: tuple[int, int] = (0, 1)) -> list[Path]:
    """Generate the class images every subject of `config` still needs; return the class folders.

    Counts your own images first (see the module docs). Uses `config.pretrained_model_name_or_path`,
    each subject's `class_prompt`, `class_data_dir` and `num_class_images`, and `sample_batch_size`,
    `resolution` and `seed`. Pass `pipe` to reuse an already loaded pipeline; else one is loaded when
    something is missing, once for all subjects. `shard` = (rank, processes): with several GPUs each process
    makes every processes-th missing image, on its own device (image i is the same whoever makes it: its
    seed is (seed, i)).
    """
    subjects = config.concepts
    if not all(subject.class_prompt and subject.class_data_dir for subject in subjects):
        raise DataError("class_prompt and class_data_dir are needed to generate class images.")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    own_pipe = pipe is None
    try:
        for subject in subjects:  # (two subjects may share a class folder: each counts what is there now)
            missing = _missing(subject, resolution=config.resolution, shard=shard, quiet=quiet)
            if missing and pipe is None:
                pipe = snapshots.load_pipeline(config.pretrained_model_name_or_path, device=device,
                                               revision=config.revision, variant=config.variant,
                                               vae=config.vae_model_name_or_path)
            if missing:
                _generate(subject, missing, config=config, pipe=pipe, quiet=quiet)
    finally:
        if own_pipe and pipe is not None:
            del pipe
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return [Path(subject.class_data_dir) for subject in subjects]


def _missing(subject, *, resolution: int, shard: tuple[int, int], quiet: bool) -> list[int]:
    """The indices this process generates for `subject` (after a look at its class folder)."""
    Path(subject.class_data_dir).mkdir(parents=True, exist_ok=True)
    found = class_images(subject, resolution=resolution)
    if not quiet:
        print(found.summary())
    rank, processes = shard
    # By index, not by position in the list: a rank that looks later, after another rank already wrote an
    # image, still takes the same share, so no image is made twice or left out.
    return [index for index in found.to_generate if index % processes == rank]


def class_image_prompts(subject, *, config) -> list[str]:
    """The prompts class images are generated from, image i from entry i mod n: the class prompt alone, or with
    `class_images_from_captions` one per photo — its caption with the class prompt in place of `[trigger]` (a
    photo without a caption: the class prompt), as the photo's own prompt has the instance prompt there."""
    if not config.class_images_from_captions:
        return [subject.class_prompt]
    report = scan_images(subject.instance_data_dir, resolution=config.resolution)
    return report.prompts(subject.class_prompt)


def _generate(subject, missing: list[int], *, config, pipe, quiet: bool) -> None:
    """Images `missing` of `subject`'s class prompt (at `config`'s seed, size and batch; from the photos' captions
    with `class_images_from_captions`), written atomically one by one; an image made from another prompt than
    the class prompt keeps it in its caption file."""
    folder = Path(subject.class_data_dir)
    prompts = class_image_prompts(subject, config=config)
    with tqdm(total=len(missing), desc="Class images", **({"disable": True} if in_task() else {})) as bar:
        for start in range(0, len(missing), config.sample_batch_size):
            report("generating class images", start, len(missing))
            batch = missing[start:start + config.sample_batch_size]
            # One generator per image: image i does not depend on which batch it lands in.
            generators = [torch.Generator("cpu").manual_seed(image_seed(config.seed, i)) for i in batch]
            texts = [prompts[i % len(prompts)] for i in batch]
            images = pipe(texts, generator=generators, height=config.resolution, width=config.resolution).images
            for index, text, image in zip(batch, texts, images):
                path = class_image_path(folder, index)
                caption = path.with_suffix(CAPTION_SUFFIX)  # (before the image: an image is used once it exists)
                if text != subject.class_prompt:
                    atomic_write_bytes(caption, text.encode())
                else:  # a caption left from an earlier image of this number must not describe this one
                    caption.unlink(missing_ok=True)
                atomic_write_bytes(path, png_bytes(image))
            bar.update(len(batch))
    still_missing = [i for i in missing if not class_image_path(folder, i).is_file()]
    if still_missing:
        raise DataError(f"{folder}: {len(still_missing)} class images are still missing after generation; "
                        "check free disk space and run again (finished images are kept).")
    if not quiet:
        print(f"Generated {len(missing)} class images of '{subject.class_prompt}'.")
