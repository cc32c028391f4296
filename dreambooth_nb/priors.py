"""Class images for prior preservation: generated once, deterministically, resumable.

Image i is always generated from seed (seed, i), so it is the same image whether it is made in the
first batch or after a Colab disconnect, and a rerun writes only the images still missing.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import snapshots
from .errors import DataError
from .storage import atomic_write_bytes

_NAME = "class-{:05d}.png"
_NAME_RE = re.compile(r"^class-(\d{5})\.png$")


def class_image_path(folder, index: int) -> Path:
    return Path(folder) / _NAME.format(index)


def missing_class_images(folder, count: int) -> list[int]:
    """Indices in 0..count-1 whose image is not on disk yet."""
    folder = Path(folder)
    present = {int(m.group(1)) for p in folder.glob("class-*.png") if (m := _NAME_RE.match(p.name))} \
        if folder.is_dir() else set()
    return [i for i in range(count) if i not in present]


def image_seed(seed: int, index: int) -> int:
    return seed * 100_003 + index


def generate_class_images(config, *, device: torch.device | None = None, pipe=None) -> Path:
    """Write the missing class images of `config` into `config.class_data_dir`; return the folder.

    Uses `config.pretrained_model_name_or_path`, `class_prompt`, `num_class_images`, `sample_batch_size`,
    `resolution` and `seed`. Pass `pipe` to reuse an already loaded pipeline.
    """
    if not config.class_prompt or not config.class_data_dir:
        raise DataError("class_prompt and class_data_dir are needed to generate class images.")
    folder = Path(config.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    missing = missing_class_images(folder, config.num_class_images)
    if not missing:
        return folder
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    own_pipe = pipe is None
    if own_pipe:
        pipe = snapshots.load_pipeline(config.pretrained_model_name_or_path, device=device,
                                       revision=config.revision, variant=config.variant)
    try:
        with tqdm(total=len(missing), desc="Class images") as bar:
            for start in range(0, len(missing), config.sample_batch_size):
                batch = missing[start:start + config.sample_batch_size]
                # One generator per image: image i does not depend on which batch it lands in.
                generators = [torch.Generator("cpu").manual_seed(image_seed(config.seed, i)) for i in batch]
                images = pipe([config.class_prompt] * len(batch), generator=generators,
                              height=config.resolution, width=config.resolution).images
                for index, image in zip(batch, images):
                    atomic_write_bytes(class_image_path(folder, index), _png_bytes(image))
                bar.update(len(batch))
    finally:
        if own_pipe:
            del pipe
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    still_missing = missing_class_images(folder, config.num_class_images)
    if still_missing:
        raise DataError(f"{folder}: {len(still_missing)} class images are still missing after generation; "
                        "check free disk space and run again (finished images are kept).")
    return folder


def _png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
