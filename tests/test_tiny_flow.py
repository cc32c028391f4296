"""The tiny random SD3 and Flux pipelines: built from configs offline, they load in diffusers and draw, and a
seed fixes every weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreambooth_nb.toy.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

# builder, pipeline class, the call's own options (a short T5 sequence keeps the render quick)
FLOW = {
    "sd3": (build_tiny_sd3_pipeline, "StableDiffusion3Pipeline", dict(max_sequence_length=16, guidance_scale=2.0)),
    "flux": (build_tiny_flux_pipeline, "FluxPipeline", dict(max_sequence_length=16, guidance_scale=3.5)),
}


@pytest.mark.parametrize("name", FLOW)
def test_the_tiny_pipeline_loads_offline_and_draws_32_px(name, tmp_path):
    import diffusers

    build, pipeline_class, options = FLOW[name]
    pipe = getattr(diffusers, pipeline_class).from_pretrained(build(tmp_path / name), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0), **options).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("name", FLOW)
def test_a_seed_fixes_the_transformers_weights(name, tmp_path):
    build = FLOW[name][0]

    def weights(folder, seed):
        return load_file(build(tmp_path / folder, seed=seed) / "transformer" / "diffusion_pytorch_model.safetensors")

    first, again, other = weights("first", 0), weights("again", 0), weights("other", 1)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)  # the seed does reach the weights
