"""Stable Diffusion 3.x Dreambooth LoRA at tiny size: the same `train(config)` with a transformer for a UNet,
three text encoders and a rectified flow for the DDPM objective; snapshots that diffusers' SD3 pipeline loads."""

from __future__ import annotations

import importlib

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dreambooth_nb import ConfigError, preset, train
from dreambooth_nb.model import snapshots
from dreambooth_nb.model.base import BaseModel
from dreambooth_nb.model.families import SD3
from dreambooth_nb.model.loading import load_components
from dreambooth_nb.model.objectives import Flow
from dreambooth_nb.planning.planner import plan
from dreambooth_nb.training.prompts import Prompts
from one_batch import losses_on_one_batch

train_module = importlib.import_module("dreambooth_nb.training.train")
PROMPT = "a photo of sks dog"


@pytest.fixture
def sd3_config(tiny_sd3_model, photos, tmp_path):
    """The "sd3" preset on the tiny model: a LoRA on the joint attention's projections."""
    def make(**overrides):
        values = dict(pretrained_model_name_or_path=str(tiny_sd3_model), instance_data_dir=str(photos),
                      instance_prompt=PROMPT, resolution=32, max_train_steps=3, checkpointing_steps=1000,
                      learning_rate=1e-3, output_dir=str(tmp_path / "out"))
        return preset("object", "sd3", **{**values, **overrides})
    return make


# --- The objective -----------------------------------------------------------------------------------------
def test_the_flow_adds_noise_along_a_straight_line_and_asks_for_its_velocity():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    indices = torch.tensor([0, 500, 999])
    noisy, timesteps, target = Flow().noisy_and_target(scheduler, x0, noise, indices)
    sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1)
    assert torch.equal(noisy, (1 - sigmas) * x0 + sigmas * noise) and torch.equal(target, noise - x0)
    assert torch.equal(timesteps, scheduler.timesteps[indices])
    assert sigmas[0].item() == pytest.approx(1.0) and sigmas[-1].item() < 0.01  # index 0: pure noise
    # The validation loss's points: 10 % of the noise is nearly clean, 90 % nearly pure noise.
    at = Flow().at((0.1, 0.9), scheduler)
    assert scheduler.sigmas[at[0]] < scheduler.sigmas[at[1]]


def test_sigmas_are_drawn_logit_normal_from_each_samples_generator():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    draws = torch.stack([Flow().draw(torch.Generator().manual_seed(i), scheduler) for i in range(4000)])
    assert draws.min() >= 0 and draws.max() <= 999
    assert torch.equal(Flow().draw(torch.Generator().manual_seed(7), scheduler), draws[7])  # reproducible
    # u = sigmoid(N(0, 1)): the median index is the schedule's middle, and the tails are thin (P(u < 0.1) ≈ 1.4 %)
    assert abs(draws.float().median().item() - 500) < 30
    assert (draws < 100).float().mean().item() < 0.03


# --- Encoding and conditioning -------------------------------------------------------------------------------
def test_prompts_reach_the_transformer_as_sd3s_pipeline_encodes_them(sd3_config, tiny_sd3_model):
    """CLIP-L and CLIP-G side by side, zero-padded to T5's width, then T5's 77 tokens in the same sequence;
    their pooled outputs joined: what StableDiffusion3Pipeline.encode_prompt makes (at the same lengths)."""
    from diffusers import StableDiffusion3Pipeline

    config = sd3_config()
    parts = load_components(config, device=torch.device("cpu"), precision="no")
    prompts = Prompts([PROMPT], family=parts.family, tokenizers=parts.tokenizers)
    assert [ids.shape[-1] for ids in prompts.token_ids] == [16, 16, 77]  # tiny CLIPs read 16; T5 77, as trained
    prompts.encode_once(parts.text_encoders, device=torch.device("cpu"))
    batch = {"prompt": torch.tensor([0]), "original_size": torch.tensor([[32, 32]]), "crop": torch.zeros(1, 2)}
    hidden, added = prompts.conditioning(batch, encoders=None, device=torch.device("cpu"), resolution=32)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model, local_files_only=True)
    expected, _, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False,
                                                max_sequence_length=77)
    assert hidden.shape == expected.shape == (1, 16 + 77, 96)
    torch.testing.assert_close(hidden, expected)
    torch.testing.assert_close(added["pooled_projections"], pooled)


# --- Training --------------------------------------------------------------------------------------------------
def test_the_flow_loss_falls_on_the_photos(sd3_config):
    """Forty steps on one batch (the transformer's own weights, a high rate): the flow-matching loss halves."""
    config = sd3_config(cache_latents=True)
    parts = load_components(config, device=torch.device("cpu"), precision="no")
    parts.denoiser.requires_grad_(True)
    losses = losses_on_one_batch(config, parts, torch.optim.AdamW(parts.denoiser.parameters(), lr=1e-2))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_an_sd3_lora_trains_snapshots_and_loads_in_diffusers(sd3_config, tiny_sd3_model):
    from diffusers import StableDiffusion3Pipeline

    losses = []
    final = train(sd3_config(snapshot_steps=[1]), on_step=lambda step, loss, lr: losses.append(loss))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    meta = snapshots.info(final)
    assert (meta["method"], meta["trained"], meta["native_resolution"]) == ("lora", ["transformer"], 32)
    assert (final / snapshots.LORA_WEIGHTS).is_file() and not (final / snapshots.KOHYA_WEIGHTS).exists()

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPT, num_inference_steps=2, height=32, width=32, max_sequence_length=16, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    base = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model, local_files_only=True)
    before = image(base)
    base.load_lora_weights(final, weight_name=snapshots.LORA_WEIGHTS)  # what a user of diffusers does
    theirs = image(base)
    ours = image(snapshots.load_pipeline(final, device=torch.device("cpu")))  # how comparison renders it
    assert abs(theirs - before).max() > 1e-4  # the adapters change the drawing
    assert abs(ours - theirs).max() < 1e-4  # fused or not, the same adapters (float rounding apart)


def test_what_sd3_cannot_train_is_refused_before_anything_loads(sd3_config, monkeypatch):
    monkeypatch.setattr(train_module.loading, "load_components", lambda *a, **k: pytest.fail("loaded the model"))
    for changes, message in [(dict(method="full", learning_rate=1e-5), "method: full fine-tuning of SD 3.x"),
                             (dict(train_text_encoder=True), "train_text_encoder: SD 3.x's text encoders"),
                             (dict(snr_gamma=5.0), "snr_gamma: min-SNR weighting is for"),
                             (dict(offset_noise=0.1), "offset_noise:")]:
        with pytest.raises(ConfigError, match=message):
            train(sd3_config(**changes))


def test_the_family_preset_and_the_plan(sd3_config):
    config = sd3_config()
    assert BaseModel.of(config).family is SD3
    assert (config.method, config.learning_rate, config.snr_gamma) == ("lora", 1e-3, None)
    assert "attn.add_q_proj" in config.lora_target_modules  # the text stream's projections train too
    planned = plan(config, gpu="T4")
    assert planned.fits and planned.gpu_peak_bytes > 0


def test_setup_takes_the_sd3_preset_for_an_sd3_model(tiny_sd3_model, photos, tmp_path):
    """Notebook 1 with MODEL_ID an SD 3.x model: a LoRA whatever METHOD says, the family's settings."""
    from dreambooth_nb.notebook import project as projects

    project = projects.Project(tmp_path)
    config = projects.setup_config(project, kind="object", method="full", model=str(tiny_sd3_model),
                                   instance_dir=photos, instance_prompt=PROMPT, resolution=32)
    assert (config.method, config.learning_rate, config.snr_gamma, config.variant) == ("lora", 4e-4, None, None)
    assert config.resolution == 32 and config.fit_to_gpu  # (fitted to a T4)
    assert projects.default_resolution(str(tiny_sd3_model)) == 1024  # RESOLUTION = 0: the family's size


def test_the_plan_of_sd35_medium_on_a_t4_and_colabs_ram():
    """SD 3.5 Medium from its shipped configs (offline), 1024 px, the savers: its peak is the prompts' encoding,
    the three frozen encoders in fp16 alone on the GPU (T5-XXL is 4.76 B parameters; the 2.24 B-parameter
    transformer loads after them); the encoders stream onto the GPU, so host RAM peaks loading the transformer,
    under a Colab VM's 12.7 GB."""
    from dreambooth_nb.config import SD35_MEDIUM
    from dreambooth_nb.planning.trace import component_facts, component_sizes, read_model_configs

    sizes = component_sizes(read_model_configs(SD35_MEDIUM))
    assert (round(sizes["transformer"] / 1e9, 2), round(sizes["text_encoder_3"] / 1e9, 2)) == (2.24, 4.76)
    planned = plan(preset("object", "sd3", "16gb", instance_data_dir="", instance_prompt=PROMPT), gpu="T4")
    encoders = sizes["text_encoder"] + sizes["text_encoder_2"] + sizes["text_encoder_3"]
    assert planned.gpu_phase == "encoding the prompts"
    kept_fp32 = component_facts(read_model_configs(SD35_MEDIUM))["text_encoder_3"].fp32_in_fp16  # T5's wo
    # (the VAE left with the latents cached; transformers keeps T5's wo projections in fp32 at fp16)
    assert planned.gpu_breakdown["frozen weights"] == 2 * encoders + 2 * kept_fp32
    assert planned.fits and planned.gpu_required_bytes <= 14 * 2**30
    assert planned.host_breakdown["loading (largest part)"] == 4 * sizes["transformer"]  # (its config names no dtype)
    assert planned.host_peak_bytes < 12.7e9


def test_the_prompts_are_encoded_before_the_transformer_loads_and_the_encoders_go(sd3_config, monkeypatch):
    """The frozen encoders and the transformer never share the GPU, and a LoRA run lets the encoders go."""
    from dreambooth_nb.model import loading

    events = []
    real_encode, real_load = Prompts.encode_once, loading.load_denoiser

    def encode(self, encoders, **kwargs):
        events.append(("encode", len(encoders), kwargs["keep"]))
        return real_encode(self, encoders, **kwargs)

    def load(parts, *args, **kwargs):
        events.append(("transformer", parts.denoiser is None, len(parts.text_encoders)))
        return real_load(parts, *args, **kwargs)

    monkeypatch.setattr(Prompts, "encode_once", encode)
    monkeypatch.setattr(loading, "load_denoiser", load)
    train(sd3_config(max_train_steps=1))
    assert events == [("encode", 3, False), ("transformer", True, 0)]


def test_sd3_snapshots_render_with_the_flows_own_sampler(sd3_config, tmp_path):
    """The comparison's sampler names are DDPM solvers; a flow model keeps its Euler flow sampler (DDIM built
    from a flow's config would draw noise), and the renders come out."""
    import numpy as np
    from PIL import Image

    from dreambooth_nb.results.evaluate import EvalSpec, render
    from dreambooth_nb.model.objectives import Flow

    assert type(Flow().sampler("ddim", FlowMatchEulerDiscreteScheduler(shift=3.0).config)).__name__ == \
        "FlowMatchEulerDiscreteScheduler"
    final = train(sd3_config(max_train_steps=1))
    spec = EvalSpec(prompts=[PROMPT], seeds=[0], scheduler="ddim", num_inference_steps=2, resolution=32)
    (item,) = render(final, spec, device="cpu")
    with Image.open(item.image) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (32, 32, 3) and pixels.std() > 0
