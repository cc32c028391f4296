"""Training examples: which image, which crop and flip, which noise — all derived from (seed, position).

Every random choice for the k-th sample of the run comes from its own generator seeded by (seed, k).
So the data order and the noise do not depend on how samples are grouped into batches (batch 2 equals
batch 1 × 2 accumulated), and resuming at step N needs no saved data-loader state: the stream simply
continues at position N × batch × accumulation.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import DataError
from .images import load_image, scan_images

INSTANCE, CLASS = 0, 1  # stream ids: instance and class samples draw from separate, independent streams


def sample_generator(seed: int, stream: int, position: int) -> torch.Generator:
    """The generator for one sample: independent of batch size, of resume, and of the other stream."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stream * 7_919 + position * 2_654_435_761) % 2**63)


def item_index(seed: int, stream: int, position: int, n_items: int) -> int:
    """Which image the sample at `position` uses: each epoch is a fresh permutation of all images.

    The permutation's seed is the tuple (seed, stream, epoch) itself (NumPy's SeedSequence hashes it), so
    no two (seed, epoch) pairs share an order. (Earlier versions used seed × 31 + epoch, where seed 1
    repeated seed 0's order 31 epochs later; a run started before that change resumes with the new order
    from its next step on — its weights stay valid, only the data order after the resume differs.)
    """
    epoch, offset = divmod(position, n_items)
    return int(np.random.default_rng((seed, stream, epoch)).permutation(n_items)[offset])


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) after scaling so that the shorter side is `resolution`."""
    w, h = size
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def center_crop_origin(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(top, left) of the centred square crop of an image of `size` (width, height) at `resolution`."""
    w, h = resized_size(size, resolution)
    return (h - resolution) // 2, (w - resolution) // 2


def resize_and_crop(image: Image.Image, *, resolution: int, center_crop: bool,
                    gen: torch.Generator) -> tuple[Image.Image, tuple[int, int]]:
    """Resize so the shorter side is `resolution`, then crop a square (center or random).

    Returns the crop and its (top, left) corner in the resized image: SDXL is conditioned on it.
    """
    image = image.resize(resized_size(image.size, resolution), Image.BICUBIC)
    w, h = image.size
    if center_crop:
        top, left = center_crop_origin(image.size, resolution)
    else:
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=gen))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=gen))
    return image.crop((left, top, left + resolution, top + resolution)), (top, left)


def _flipped(crop: tuple[int, int], *, width: int, resolution: int) -> tuple[int, int]:
    """The crop's corner as seen in the mirrored image (what a flipped sample shows)."""
    top, left = crop
    return top, width - resolution - left


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → float tensor CHW in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class ImageFolder:
    """The usable photos of one folder, loaded once, with the prompt that describes them."""

    images: list[Image.Image]
    prompt: str
    names: list[str]

    def original_size(self, index: int) -> tuple[int, int]:
        """(height, width) of the photo as it was, before any scaling (SDXL's `original_size`)."""
        w, h = self.images[index].info.get("original_size", self.images[index].size)
        return h, w

    @classmethod
    def load(cls, folder, *, prompt: str, resolution: int, min_images: int = 1) -> "ImageFolder":
        report = scan_images(folder, resolution=resolution)
        for warning in report.warnings:
            print(f"Warning: {warning}")
        for path, reason in report.skipped:
            print(f"Skipped {path.name}: {reason}")
        if len(report.usable) < min_images:
            raise DataError(f"{folder}: {len(report.usable)} usable images, need at least {min_images}.")
        return cls.from_paths(report.usable, prompt=prompt, resolution=resolution)

    @classmethod
    def from_paths(cls, paths, *, prompt: str, resolution: int) -> "ImageFolder":
        """These images (already checked, e.g. the class images `priors.class_images` selected)."""
        paths = list(paths)
        if not paths:
            raise DataError("No images to train on: the list is empty.")
        images = [load_image(path, max_side=resolution) for path in paths]
        return cls(images=images, prompt=prompt, names=[Path(p).name for p in paths])

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self, index: int, *, resolution: int, center_crop: bool, flip: bool,
               gen: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
        """The training pixels of image `index` and the (top, left) corner of their crop."""
        image, crop = resize_and_crop(self.images[index], resolution=resolution, center_crop=center_crop, gen=gen)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            crop = _flipped(crop, width=resized_size(self.images[index].size, resolution)[0], resolution=resolution)
        return to_tensor(image), crop


class LatentSource:
    """Latents for (image, flip): encoded once and cached (`cache_latents`), or encoded on every use.

    The cache keeps the VAE's distribution (mean and std) rather than one sample, so a cached run draws a
    fresh latent sample per step exactly as an uncached one does.
    """

    def __init__(self, folder: ImageFolder, *, vae, resolution: int, center_crop: bool, cache: bool,
                 flips: tuple[bool, ...], device: torch.device, dtype: torch.dtype, cache_dir=None,
                 model_key: str = ""):
        self.folder, self.vae, self.device, self.dtype = folder, vae, device, dtype
        self.resolution, self.center_crop = resolution, center_crop
        self.scaling_factor = vae.config.scaling_factor
        self.cached: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        if cache:
            for index in range(len(folder)):
                for flip in flips:
                    self.cached[index, flip] = self._cached_or_encode(index, flip=flip, cache_dir=cache_dir,
                                                                     model_key=model_key)

    def _cached_or_encode(self, index: int, *, flip: bool, cache_dir, model_key: str):
        """From `cache_dir` when an earlier run encoded the same pixels with the same VAE, else encode now."""
        if cache_dir is None:
            return self._encode(index, flip=flip, gen=torch.Generator())[:2]
        from safetensors.torch import load_file, save_file

        from .storage import atomic_write_bytes

        key = hashlib.sha256(f"{model_key}|{self.resolution}|{self.center_crop}|{flip}|{self.dtype}".encode()
                             + self.folder.images[index].tobytes()).hexdigest()[:32]
        path = Path(cache_dir) / f"{key}.safetensors"
        if path.is_file():
            tensors = load_file(path)
            return tensors["mean"], tensors["std"]
        mean, std, _ = self._encode(index, flip=flip, gen=torch.Generator())
        with tempfile.TemporaryDirectory() as tmp:  # safetensors writes to a path; publish it atomically
            save_file({"mean": mean, "std": std}, f"{tmp}/latent.safetensors")
            atomic_write_bytes(path, Path(f"{tmp}/latent.safetensors").read_bytes())
        return mean, std

    @torch.no_grad()
    def _encode(self, index: int, *, flip: bool, gen: torch.Generator):
        """(mean, std, crop corner) of the VAE's latent distribution for image `index`."""
        pixels, crop = self.folder.pixels(index, resolution=self.resolution, center_crop=self.center_crop,
                                          flip=flip, gen=gen)
        dist = self.vae.encode(pixels[None].to(self.device, self.dtype)).latent_dist
        return dist.mean[0].float().cpu(), dist.std[0].float().cpu(), crop

    def mean_latent(self, index: int) -> torch.Tensor:
        """The VAE's mean for image `index` (unflipped, its training crop), scaled as training's samples."""
        mean = self.cached[index, False][0] if (index, False) in self.cached else \
            self._encode(index, flip=False, gen=torch.Generator())[0]
        return mean * self.scaling_factor

    def sample(self, index: int, *, flip: bool, gen: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
        """A latent sample of image `index` (flipped or not) and the (top, left) corner of its crop."""
        if (index, flip) in self.cached:  # cached latents are centre crops (validation insists)
            mean, std = self.cached[index, flip]
            image = self.folder.images[index]
            crop = center_crop_origin(image.size, self.resolution)
            if flip:
                crop = _flipped(crop, width=resized_size(image.size, self.resolution)[0], resolution=self.resolution)
        else:
            mean, std, crop = self._encode(index, flip=flip, gen=gen)
        eps = torch.randn(mean.shape, generator=gen)
        return (mean + std * eps) * self.scaling_factor, crop

