"""Shared fixtures: a tiny random Stable Diffusion pipeline built from configs once per test run.

Tests run on CPU and offline. One thread per process unless OMP_NUM_THREADS says otherwise: the tiny
models gain nothing from more, and two processes each spinning two OpenMP threads on a 2-core machine run
~100× slower. The suite must pass with any thread count (`OMP_NUM_THREADS=2 make test`): results may then
differ in the last bits, and every numeric tolerance allows for that (see the README's Development).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from photos import write_photos  # (a module of its own: tests/browser has a conftest too)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
if torch.cuda.is_available() and os.environ.get("DREAMBOOTH_NB_GPU_CAP_GIB"):  # bench/gpu_check.py: act like a T4
    torch.cuda.set_per_process_memory_fraction(min(1.0, float(os.environ["DREAMBOOTH_NB_GPU_CAP_GIB"]) * 2**30
                                                   / torch.cuda.get_device_properties(0).total_memory))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Folder of a random tiny `StableDiffusionPipeline` (32 px images, 16 px latents)."""
    from dreambooth_nb.toy.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory):
    """Folder of a random tiny `StableDiffusionXLPipeline` (two text encoders, `text_time` conditioning)."""
    from dreambooth_nb.toy.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd3_model(tmp_path_factory):
    """Folder of a random tiny `StableDiffusion3Pipeline` (MMDiT transformer, two CLIPs and a T5, a flow)."""
    from dreambooth_nb.toy.tiny import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_flux_model(tmp_path_factory):
    """Folder of a random tiny `FluxPipeline` (double- and single-stream transformer, CLIP and T5, a flow)."""
    from dreambooth_nb.toy.tiny import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_model_vpred(tmp_path_factory):
    from dreambooth_nb.toy.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-model-v"), prediction_type="v_prediction")


@pytest.fixture
def photos(tmp_path):
    return write_photos(tmp_path / "photos")


@pytest.fixture
def make_config(tiny_model, photos, tmp_path):
    """`make_config(**overrides)`: a valid tiny TrainConfig writing into this test's tmp folder (overrides as
    `preset` takes them: a subject's settings, or `concepts`)."""
    from dreambooth_nb import preset

    def make(**overrides):
        values = dict(pretrained_model_name_or_path=str(tiny_model), resolution=32, max_train_steps=4,
                      learning_rate=1e-4, checkpointing_steps=1000, output_dir=str(tmp_path / "out"))
        if "concepts" not in overrides:  # the one subject: the photos fixture
            values.update(instance_data_dir=str(photos), instance_prompt="a photo of sks dog")
        values.update(overrides)
        return preset(**values)

    return make
