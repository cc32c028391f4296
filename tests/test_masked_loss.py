"""Masked loss (`masked_loss`): each photo's loss weighted by where its subject is, on the latent grid."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_nb import ConfigError, train
from dreambooth_nb.dataset.masks import Segmenter, mask_file
from dreambooth_nb.training.data import ImageFolder, TrainingData, mask_cache_dir
from dreambooth_nb.training.train import per_sample_loss
from tiny_segmenter import build_tiny_clipseg


def left_third_mask(size=(48, 32)) -> Image.Image:
    """White on the left 16 columns of a 48×32 picture."""
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[:, :16] = 255
    return Image.fromarray(mask, "L")


def folder_with_mask(mask: Image.Image) -> ImageFolder:
    image = Image.new("RGB", mask.size, (128, 128, 128))
    return ImageFolder(images=[image], prompts=["p"], names=["a.png"], caption_files=[None], masks=[mask])


def test_weights_are_cut_like_the_pixels_and_averaged_per_latent_cell():
    """A 48×32 photo at resolution 32 is centre-cropped to columns 8..40: the subject (columns 0..16) covers the
    crop's first 8 columns, i.e. latent cells 0 (of 4, 8 px each) wholly; mirrored, the last one."""
    folder = folder_with_mask(left_third_mask())
    kwargs = dict(resolution=32, latent_size=(4, 4), background=0.1)
    plain = folder.loss_weights(0, flip=False, crop=(0, 8), **kwargs)
    assert plain.shape == (1, 4, 4)
    # (bilinear scaling at 1:1 keeps the hard edge, so each cell is 0 or 1 exactly, up to float rounding)
    torch.testing.assert_close(plain[0], torch.tensor([[1.0, 0.1, 0.1, 0.1]] * 4), rtol=0, atol=1e-6)
    mirrored = folder.loss_weights(0, flip=True, crop=(0, 8), **kwargs)
    torch.testing.assert_close(mirrored[0], plain[0].flip(-1), rtol=0, atol=1e-6)
    # A crop that starts at the left edge (a random crop) holds the whole subject: two cells.
    torch.testing.assert_close(folder.loss_weights(0, flip=False, crop=(0, 0), **kwargs)[0],
                               torch.tensor([[1.0, 1.0, 0.1, 0.1]] * 4), rtol=0, atol=1e-6)


def test_subject_pixels_count_as_without_a_mask_and_a_weightless_background_not_at_all():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)
    # A mask of ones is exactly the unmasked loss.
    assert torch.equal(per_sample_loss(prediction, target, mask_weights=torch.ones(2, 1, 4, 4)),
                       per_sample_loss(prediction, target))
    # Background weight 0: errors there do not count at all, and each subject pixel's error counts as it does
    # unmasked (1/64 of the sample's loss here, 4 channels × 4 × 4): its column's errors, summed, over 64.
    weights = torch.zeros(2, 1, 4, 4)
    weights[:, :, :, 0] = 1.0
    moved = target.clone()
    moved[..., 1:] += 5.0  # large errors only in the background
    subject_error = ((prediction - target)[..., :1] ** 2).sum(dim=(1, 2, 3)) / 64
    torch.testing.assert_close(per_sample_loss(prediction, moved, mask_weights=weights), subject_error)


def test_a_masked_run_reads_mask_files_makes_the_others_and_caches_them(make_config, photos, tmp_path, monkeypatch,
                                                                        capsys):
    """Two photos bring `photo.mask.png`; the others are masked by the (tiny, random) segmenter from the class
    word, cached beside the runs; the run trains, and a second load reuses the cache without the segmenter."""
    paths = sorted(photos.glob("*.png"))
    for path in paths[:2]:
        with Image.open(path) as photo:
            left_third_mask(photo.size).save(mask_file(path))
    segmenter = build_tiny_clipseg(tmp_path / "clipseg")
    config = make_config(masked_loss=True, mask_segmenter=str(segmenter), max_train_steps=2,
                         class_prompt="a photo of a dog")
    data = TrainingData.load(config)
    assert len(data.photos[0]) == len(paths)  # the masks are not photos
    assert f"Masked loss: 2 of {len(paths)} photos in photos have a mask file; {segmenter} masked the other " \
           f"{len(paths) - 2} as 'dog'" in capsys.readouterr().out
    masks = data.photos[0].masks
    assert [np.asarray(m).shape for m in masks] == [np.asarray(i.convert("L")).shape for i in data.photos[0].images]
    first = np.asarray(masks[0])  # the file's left third, scaled with its photo (the shorter side to 32 px)
    third = first.shape[1] // 3
    assert (first[:, :third - 1] == 255).all() and (first[:, third + 2:] == 0).all()
    cached = sorted(mask_cache_dir(config).glob("*.png"))
    assert len(cached) == len(paths) - 2

    from diffusers import AutoencoderKL

    data.encode(vae=AutoencoderKL.from_pretrained(Path(config.pretrained_model_name_or_path) / "vae"), config=config,
                device=torch.device("cpu"), dtype=torch.float32)
    batch = data.batch(0, config=config, draw=lambda gen: torch.tensor(0))
    weights = batch["mask_weights"]
    assert weights.shape == (1, 1, *batch["latents"].shape[-2:]) and weights.min() >= 0.1 - 1e-6 \
        and weights.max() <= 1 + 1e-6

    def not_again(*args, **kwargs):
        raise AssertionError("the segmenter was loaded although every automatic mask is cached")

    monkeypatch.setattr(Segmenter, "load", not_again)
    assert Path(train(config, progress_bar=False)).is_dir()


def test_mask_background_weight_is_checked(make_config):
    with pytest.raises(ConfigError, match="mask_background_weight: must be between 0"):
        make_config(masked_loss=True, mask_background_weight=1.5).validate()


def test_on_the_toy_model_a_masked_loss_copies_the_photos_background_less(tmp_path):
    """The subject's photos all on grey; asked for it on black or white, the plain loss's model draws grey half the
    time by step 200 of LR 3e-4 (0.50 measured), the masked one (background weight 0.3) far less (0.12), and it
    still draws the subject (fidelity 0.40; the base model's is about 0.08). `bench/masked_loss.py` runs the same
    experiment longer, with more seeds, for the README's table."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from masked_loss import experiment

    results = experiment(tmp_path, lr=3e-4, steps=[200], seeds=8, background=0.3)
    plain, masked = results["plain"][200], results["masked"][200]
    assert masked["copied"] <= plain["copied"] - 0.2
    assert masked["fidelity"] >= 0.25
