"""The sample stream: which image, crop, flip and noise each sample gets, independent of batching."""

import importlib

import pytest
import torch
from PIL import Image

from dreambooth_nb import train
from dreambooth_nb.dataset.crop import resized_size
from dreambooth_nb.training.data import item_index, resize_and_crop, sample_generator, to_tensor

data_module = importlib.import_module("dreambooth_nb.training.data")


def test_every_epoch_is_a_permutation_and_epochs_differ():
    epochs = [[item_index(0, 0, e * 5 + i, 5) for i in range(5)] for e in range(4)]
    assert all(sorted(epoch) == list(range(5)) for epoch in epochs)
    assert len({tuple(e) for e in epochs}) > 1


def test_sample_generators_depend_on_seed_stream_and_position_only():
    def draw(*key):
        return torch.randn(4, generator=sample_generator(*key))

    assert torch.equal(draw(3, 0, 10), draw(3, 0, 10))
    assert not torch.equal(draw(3, 0, 10), draw(3, 0, 11))
    assert not torch.equal(draw(3, 0, 10), draw(3, 1, 10))
    assert not torch.equal(draw(3, 0, 10), draw(4, 0, 10))


@pytest.mark.parametrize("size", [(64, 48), (48, 64), (32, 32), (20, 10)])
def test_resize_and_crop_gives_a_square_of_the_resolution(size):
    image = Image.new("RGB", size, (255, 0, 0))
    for center in (True, False):
        out, (top, left) = resize_and_crop(image, resolution=32, center_crop=center,
                                           gen=torch.Generator().manual_seed(0))
        assert out.size == (32, 32)
        w, h = resized_size(size, 32)
        assert 0 <= top <= h - 32 and 0 <= left <= w - 32


def test_the_crop_corner_is_where_the_pixels_came_from():
    """SDXL is conditioned on the crop's top-left corner: it must be the corner of the pixels it got."""
    image = Image.linear_gradient("L").rotate(90).convert("RGB").resize((96, 32))  # varies left to right
    for seed in range(4):
        crop, (top, left) = resize_and_crop(image, resolution=32, center_crop=False,
                                            gen=torch.Generator().manual_seed(seed))
        assert top == 0 and crop.tobytes() == image.crop((left, 0, left + 32, 32)).tobytes()
    assert resize_and_crop(image, resolution=32, center_crop=True, gen=torch.Generator())[1] == (0, 32)


def test_random_crop_moves_and_center_crop_does_not():
    image = Image.linear_gradient("L").rotate(90).convert("RGB").resize((96, 32))  # varies left to right
    crops = {resize_and_crop(image, resolution=32, center_crop=False, gen=torch.Generator().manual_seed(s))[0].tobytes()
             for s in range(6)}
    centers = {resize_and_crop(image, resolution=32, center_crop=True, gen=torch.Generator().manual_seed(s))[0].tobytes()
               for s in range(6)}
    assert len(crops) > 1 and len(centers) == 1


def test_to_tensor_range_and_layout():
    tensor = to_tensor(Image.new("RGB", (4, 2), (255, 0, 128)))
    assert tensor.shape == (3, 2, 4)
    assert tensor[0].max() == 1.0 and tensor[1].min() == -1.0


def test_latent_cache_dir_is_reused_by_the_next_run(make_config, tmp_path, monkeypatch):
    cache = tmp_path / "latents"
    first = train(make_config(cache_latents=True, latent_cache_dir=str(cache), max_train_steps=2,
                              output_dir=str(tmp_path / "a")))
    assert len(list(cache.glob("*.safetensors"))) == 4  # one per photo

    def no_vae(*args, **kwargs):
        raise AssertionError("the VAE was run although the latents were cached")

    monkeypatch.setattr(data_module.LatentSource, "_encode", no_vae)
    second = train(make_config(cache_latents=True, latent_cache_dir=str(cache), max_train_steps=2,
                               output_dir=str(tmp_path / "b")))
    from safetensors.torch import load_file

    a = load_file(first / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(second / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # cached latents give the very same training
