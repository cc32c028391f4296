"""Training examples: which image, which crop and flip, which noise — all derived from (seed, position).

Every random choice for the k-th sample of the run comes from its own generator seeded by (seed, k).
So the data order and the noise do not depend on how samples are grouped into batches (batch 2 equals
batch 1 × 2 accumulated), and resuming at step N needs no saved data-loader state: the stream simply
continues at position N × batch × accumulation.

Several subjects (`config.concepts`) share the stream by a fixed rule: sample k of the run belongs to
subject k mod n and is that subject's sample k // n, drawn from the subject's own streams (photos 2s, class
images 2s + 1). So a batch of 2 with two subjects holds one photo of each, a batch of 1 alternates, and one
subject is exactly the single-subject stream. Each photo trains with its own prompt (its caption, or the
subject's instance prompt); `TrainingData` keeps the table of all the run's prompts, and a batch names each
row's prompt by its index there — the loop never sees where a text came from.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreambooth_nb.training import distributed
from dreambooth_nb.errors import DataError
from dreambooth_nb.dataset.classes import class_images
from dreambooth_nb.dataset.crop import center_crop_origin, resized_size
from dreambooth_nb.dataset.images import load_image, scan_images
from dreambooth_nb.dataset.masks import Mask, Segmenter, subject_masks
from dreambooth_nb.storage import atomic_write_bytes

INSTANCE, CLASS = 0, 1  # stream ids of subject 0: photos and class images draw from independent streams


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
    """Usable images of one folder, loaded once, each with the prompt it trains with."""

    images: list[Image.Image]
    prompts: list[str]
    """Per image: its caption (`[trigger]` replaced), else the folder's prompt."""
    names: list[str]
    caption_files: list[Path | None]
    """Per image: the `.txt` its prompt came from, or None (the folder's prompt)."""
    masks: list[Image.Image | None] | None = None
    """Per image, with `masked_loss`: its subject mask ("L", white = subject) at the image's size; None: every
    pixel counts the same."""

    def original_size(self, index: int) -> tuple[int, int]:
        """(height, width) of the photo as it was, before any scaling (SDXL's `original_size`)."""
        w, h = self.images[index].info.get("original_size", self.images[index].size)
        return h, w

    @classmethod
    def load(cls, folder, *, prompt: str, resolution: int, min_images: int = 1, masks=None) -> "ImageFolder":
        """The photos of `folder` with their captions (`images.scan_images`), warnings printed. `masks`: a
        `MaskSource` to give each photo its subject mask (`masked_loss`)."""
        report = scan_images(folder, resolution=resolution, instance_prompt=prompt)
        for warning in report.warnings:
            print(f"Warning: {warning}")
        for path, reason in report.skipped:
            print(f"Skipped {path.name}: {reason}")
        if len(report.usable) < min_images:
            raise DataError(f"{folder}: {len(report.usable)} usable images, need at least {min_images}.")
        loaded = cls.from_paths(report.usable, prompt=prompt, prompts=report.prompts(prompt), resolution=resolution)
        loaded.caption_files = [p.with_suffix(".txt") if p in report.captions else None for p in report.usable]
        if masks is not None:
            found = masks.of(report.usable, loaded.images)
            loaded.masks = [mask.image for mask in found]
            own = sum(mask.source == "file" for mask in found)
            print(f"Masked loss: {own} of {len(found)} photos in {Path(folder).name} have a mask file; "
                  f"{masks.segmenter} masked the other {len(found) - own} as '{masks.word}' (cached in "
                  f"{masks.cache_dir}).")
        return loaded

    @classmethod
    def from_paths(cls, paths, *, prompt: str, resolution: int, prompts: list[str] | None = None) -> "ImageFolder":
        """These images (already checked, e.g. the class images `dataset.classes.class_images` selected), each with
        its entry of `prompts`, else all with `prompt`."""
        paths = list(paths)
        if not paths:
            raise DataError("No images to train on: the list is empty.")
        images = [load_image(path, max_side=resolution) for path in paths]
        return cls(images=images, prompts=list(prompts) if prompts is not None else [prompt] * len(paths),
                   names=[Path(p).name for p in paths], caption_files=[None] * len(paths))

    def __len__(self) -> int:
        return len(self.images)

    def loss_weights(self, index: int, *, resolution: int, flip: bool, crop: tuple[int, int],
                     latent_size: tuple[int, int], background: float) -> torch.Tensor:
        """(1, h, w) loss weights of image `index` on the latent grid: its mask cut exactly as its pixels were
        (scaled, mirrored when `flip`, cropped at `crop` — the corner `pixels` and `LatentSource.sample` return,
        already in mirrored coordinates), averaged over each latent cell (a cell half on the subject weighs half),
        then `background` + (1 − `background`) × mask."""
        mask = self.masks[index].resize(resized_size(self.masks[index].size, resolution), Image.BILINEAR)
        if flip:
            mask = mask.transpose(Image.FLIP_LEFT_RIGHT)
        top, left = crop
        mask = mask.crop((left, top, left + resolution, top + resolution))
        cells = np.asarray(mask.resize((latent_size[1], latent_size[0]), Image.BOX), dtype=np.float32) / 255.0
        return torch.from_numpy(background + (1.0 - background) * cells)[None]

    def pixels(self, index: int, *, resolution: int, center_crop: bool, flip: bool,
               gen: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
        """The training pixels of image `index` and the (top, left) corner of their crop."""
        image, crop = resize_and_crop(self.images[index], resolution=resolution, center_crop=center_crop, gen=gen)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            crop = _flipped(crop, width=resized_size(self.images[index].size, resolution)[0], resolution=resolution)
        return to_tensor(image), crop


SUBJECT_MASKS = "subject-masks"
"""Beside the run folders (`output_dir`'s parent): the automatic subject masks, made once per photo and shared by
every run there (notebook 1 shows them; training reads them back)."""


def mask_cache_dir(config) -> Path:
    return Path(config.output_dir).parent / SUBJECT_MASKS


@dataclass
class MaskSource:
    """Where one subject's masks come from (`masked_loss`): `photo.mask.png`, else `segmenter` prompted with the
    class `word`, loaded only if some photo needs it and cached in `cache_dir` (`masks.subject_masks`)."""

    word: str
    segmenter: str
    cache_dir: Path
    device: torch.device | None = None

    @classmethod
    def of_subject(cls, config, subject, *, device: torch.device | None = None) -> "MaskSource":
        return cls(word=subject.class_noun, segmenter=config.mask_segmenter, cache_dir=mask_cache_dir(config),
                   device=device)

    def of(self, photos: list[Path], images: list[Image.Image]) -> list[Mask]:
        return subject_masks(photos, images, word=self.word, cache_dir=self.cache_dir,
                             segmenter=Segmenter.loader(self.segmenter, device=self.device))


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
        # What the denoiser sees: (latent − shift) × scale (SD3 and Flux VAEs have a shift; SD's have none).
        self.scaling_factor = vae.config.scaling_factor
        self.shift_factor = getattr(vae.config, "shift_factor", None) or 0.0
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
        return (mean - self.shift_factor) * self.scaling_factor

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
        return (mean + std * eps - self.shift_factor) * self.scaling_factor, crop



class TrainingData:
    """What a run learns from: each subject's photos (and class images), their latents, the table of every
    prompt, and which samples make up a micro-batch (the rule in the module doc).

    `photos[s]` and `classes[s]` belong to subject s (`classes` is empty without prior preservation);
    `reference[s]`, when given, are base-model renders of subject s's class prompt that only the validation
    loss uses (prior preservation off)."""

    def __init__(self, photos: list[ImageFolder], classes: list[ImageFolder] = (), *,
                 reference: list[ImageFolder] = ()):
        if not photos or (classes and len(classes) != len(photos)):
            raise DataError(f"TrainingData needs one photo folder per subject and, with prior preservation, one "
                            f"class folder each; got {len(photos)} and {len(classes)}.")
        self.photos, self.classes, self.reference = list(photos), list(classes), list(reference)
        self.texts: list[str] = []
        """The run's prompt table: each distinct prompt once, in order of first use."""
        self._sources: list[str] = []
        one = len(self.photos) == 1
        self.photo_prompts = [
            [self._prompt_id(text, str(caption) if caption else
                             "instance_prompt" if one else f"instance_prompt of subject {s + 1}")
             for text, caption in zip(folder.prompts, folder.caption_files)]
            for s, folder in enumerate(self.photos)]
        self.class_prompts = [[self._prompt_id(text, "class_prompt" if one else f"class_prompt of subject {s + 1}")
                               for text in folder.prompts] for s, folder in enumerate([*self.classes, *self.reference])]
        self.latents: list[LatentSource] = []

    def _prompt_id(self, text: str, source: str) -> int:
        if text not in self.texts:
            self.texts.append(text)
            self._sources.append(source)
        return self.texts.index(text)

    @classmethod
    def load(cls, config, *, reference: list[list] = (), device: torch.device | None = None) -> "TrainingData":
        """Every subject's photos (captions read; with `masked_loss` their masks, an automatic one made on
        `device`) and, with prior preservation, exactly its selected class images (`dataset.classes.class_images`:
        yours first, then generated ones); `reference`: per subject, the validation renders of its class prompt
        (`priors.reference_images`). Bad files are reported here, before any step."""
        subjects = config.concepts
        photos = [ImageFolder.load(s.instance_data_dir, prompt=s.instance_prompt, resolution=config.resolution,
                                   masks=MaskSource.of_subject(config, s, device=device) if config.masked_loss else None)
                  for s in subjects]
        found = [class_images(s, resolution=config.resolution) for s in subjects] if config.with_prior_preservation \
            else []
        classes = [ImageFolder.from_paths(f.selected, prompt=s.class_prompt, prompts=f.prompts(s.class_prompt),
                                          resolution=config.resolution) for s, f in zip(subjects, found)]
        rendered = [ImageFolder.from_paths(paths, prompt=s.class_prompt, resolution=config.resolution)
                    for s, paths in zip(subjects, reference) if paths]
        return cls(photos, classes, reference=rendered)

    def long_prompts(self, tokenizers: list, *, limits: list[int]) -> list[str]:
        """A warning per prompt longer than a text encoder reads (`limits`: 77 tokens for CLIP, 512 for FLUX.1's
        T5), naming where it comes from (the caption file, or the setting), the words cut off and — where the
        model has several encoders and one reads further — which one loses them."""
        warnings = []
        for text, source in zip(self.texts, self._sources):
            cut = []
            for number, (tokenizer, limit) in enumerate(zip(tokenizers, limits)):
                ids = tokenizer(text, truncation=False).input_ids
                if len(ids) > limit:  # (the end-of-text token is kept: the words before it are lost)
                    cut.append((number, len(ids), limit, tokenizer.decode(ids[limit - 1:-1]).strip()))
            if not cut:
                continue
            number, length, limit, lost = cut[0]
            if len(cut) == len(tokenizers):
                warnings.append(f"{source}: the prompt is {length} tokens, the text encoder reads {limit}; "
                                f"'{lost}' is cut off. Shorten it to keep those words.")
            else:
                warnings.append(f"{source}: the prompt is {length} tokens; text encoder {number + 1} reads {limit} "
                                f"of them ('{lost}' is cut off there), the others read it all. Shorten it if "
                                "those words matter.")
        return warnings

    def encode(self, *, vae, config, device: torch.device, dtype: torch.dtype, model_key: str = "") -> None:
        """Latents of every photo and class image: encoded once and cached with `config.cache_latents`."""
        flips = (False, True) if config.random_flip else (False,)
        self.latents = [LatentSource(folder, vae=vae, resolution=config.resolution, center_crop=config.center_crop,
                                     cache=config.cache_latents, flips=flips, device=device, dtype=dtype,
                                     cache_dir=config.latent_cache_dir, model_key=model_key)
                        for folder in [*self.photos, *self.classes]]
        self._reference = [LatentSource(folder, vae=vae, resolution=config.resolution, center_crop=True, cache=False,
                                        flips=(False,), device=device, dtype=dtype) for folder in self.reference]

    def validation_pairs(self, *, count: int) -> dict[str, list[tuple[torch.Tensor, int]]]:
        """(VAE mean latent, prompt id) of up to `count` photos ("fit") and class images or renders ("prior"),
        taking the subjects in turn, for `validation.Validation`."""
        n = len(self.photos)
        pairs = {"fit": _in_turn(self.latents[:n], self.photo_prompts, count)}
        priors = self.latents[n:] or self._reference
        if priors:
            pairs["prior"] = _in_turn(priors, self.class_prompts, count)
        return pairs

    def batch(self, micro: int, *, config, draw, rank: int = 0, world: int = 1) -> dict:
        """Micro-batch `micro` of process `rank` of `world`: photo samples, then class samples. Per row: the
        latent, its noise and timestep (an index into the schedule, `draw(generator)`: the family's
        `objective.draw`, from the sample's own generator), its prompt id (index into `texts`), whether it is a prior (class)
        sample, its subject and image (index in the subject's folder), and the image's original size and crop
        corner (SDXL is conditioned on them)."""
        n = len(self.photos)
        positions = distributed.sample_positions(micro, batch=config.train_batch_size, rank=rank, world=world)
        halves = [(False, self.latents[:n], self.photo_prompts)]
        if self.classes:
            halves.append((True, self.latents[n:], self.class_prompts))
        rows = []
        for is_prior, sources, prompt_ids in halves:
            for position in positions:
                subject, own = position % n, position // n  # round robin over the subjects
                stream = 2 * subject + is_prior
                source = sources[subject]
                gen = sample_generator(config.seed, stream, own)
                index = item_index(config.seed, stream, own, len(source.folder))
                flip = config.random_flip and bool(torch.rand((), generator=gen) < 0.5)
                latent, crop = source.sample(index, flip=flip, gen=gen)
                noise = torch.randn(latent.shape, generator=gen)
                if config.offset_noise:
                    noise = noise + config.offset_noise * torch.randn((latent.shape[0], 1, 1), generator=gen)
                timestep = draw(gen)
                rows.append(dict(latents=latent, noise=noise, timesteps=timestep, prompt=prompt_ids[subject][index],
                                 is_prior=is_prior, subject=subject, image=index,
                                 original_size=source.folder.original_size(index), crop=crop))
                if config.masked_loss:  # class images are never masked: they keep the whole picture of the class
                    rows[-1]["mask_weights"] = torch.ones((1, *latent.shape[-2:])) if source.folder.masks is None else \
                        source.folder.loss_weights(index, resolution=config.resolution, flip=flip, crop=crop,
                                                   latent_size=latent.shape[-2:],
                                                   background=config.mask_background_weight)
        return {key: torch.stack([torch.as_tensor(row[key]) for row in rows]) for key in rows[0]}


def _in_turn(sources: list[LatentSource], prompt_ids: list[list[int]], count: int) -> list[tuple[torch.Tensor, int]]:
    """Image 0 of each source, then image 1 of each, ...: the first `count` (mean latent, prompt id) pairs."""
    pairs = []
    for index in range(max(len(source.folder) for source in sources)):
        for source, ids in zip(sources, prompt_ids):
            if index < len(source.folder) and len(pairs) < count:
                pairs.append((source.mean_latent(index), ids[index]))
    return pairs
