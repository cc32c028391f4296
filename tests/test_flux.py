"""FLUX.1 Dreambooth LoRA at tiny size: the same `train(config)` with Flux's packed latents, position ids and
guidance embedding; snapshots that diffusers' Flux pipeline loads; the 4-bit base (QLoRA) planned and fitted
for a T4 from FLUX.1-dev's shipped configs."""

from __future__ import annotations

import importlib

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from dreambooth_nb import ConfigError, fit_report, preset, train
from dreambooth_nb.model import snapshots
from dreambooth_nb.model.base import BaseModel
from dreambooth_nb.model.families import FLUX
from dreambooth_nb.model.loading import load_components
from dreambooth_nb.planning.planner import plan
from dreambooth_nb.training.data import TrainingData
from dreambooth_nb.training.prompts import Prompts
from one_batch import losses_on_one_batch

train_module = importlib.import_module("dreambooth_nb.training.train")
PROMPT = "a photo of sks dog"
CPU = torch.device("cpu")
DDPM_CONFIG = DDPMScheduler().config


@pytest.fixture
def flux_config(tiny_flux_model, photos, tmp_path):
    """The "flux" preset on the tiny model: a rank-4 LoRA on the attention's q, k, v and output projections."""
    def make(**overrides):
        values = dict(pretrained_model_name_or_path=str(tiny_flux_model), instance_data_dir=str(photos),
                      instance_prompt=PROMPT, resolution=32, max_train_steps=3, checkpointing_steps=1000,
                      learning_rate=1e-3, output_dir=str(tmp_path / "out"))
        return preset("object", "flux", **{**values, **overrides})
    return make


def _image(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=2, height=32, width=32, max_sequence_length=16, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


# --- Encoding and conditioning -------------------------------------------------------------------------------
def test_prompts_reach_the_transformer_as_fluxs_pipeline_encodes_them(flux_config, tiny_flux_model):
    """T5's hidden states are the text tokens (512 of them, as FluxPipeline reads a prompt), CLIP's pooled
    output the pooled projection: what FluxPipeline.encode_prompt makes."""
    from diffusers import FluxPipeline

    parts = load_components(flux_config(), device=CPU, precision="no")
    prompts = Prompts([PROMPT], family=parts.family, tokenizers=parts.tokenizers)
    assert [ids.shape[-1] for ids in prompts.token_ids] == [16, 512]  # (the tiny CLIP reads 16)
    prompts.encode_once(parts.text_encoders, device=CPU)
    batch = {"prompt": torch.tensor([0]), "original_size": torch.tensor([[32, 32]]), "crop": torch.zeros(1, 2)}
    hidden, added = prompts.conditioning(batch, encoders=None, device=CPU, resolution=32)
    pipe = FluxPipeline.from_pretrained(tiny_flux_model, local_files_only=True)
    expected, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, max_sequence_length=512)
    torch.testing.assert_close(hidden, expected)
    torch.testing.assert_close(added["pooled_projections"], pooled)


def test_the_prediction_is_the_transformers_on_packed_latents_returned_on_the_latent_grid(flux_config):
    """`FluxFamily.predict` packs 2×2 patches into tokens with their (0, row, column) ids, passes σ = t / 1000
    and the training guidance, and unpacks: the same numbers as calling the transformer on packed tokens."""
    from diffusers import FluxPipeline

    parts = load_components(flux_config(), device=CPU, precision="no")
    torch.manual_seed(0)
    noisy, hidden, pooled = torch.randn(2, 16, 4, 6), torch.randn(2, 7, 64), torch.randn(2, 32)
    timesteps = torch.tensor([250.0, 900.0])
    out = FLUX.predict(parts.denoiser, noisy, timesteps, hidden, {"pooled_projections": pooled})
    assert out.shape == noisy.shape
    packed = noisy.view(2, 16, 2, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 6, 64)  # 2×2 patches, row-major
    ids = torch.tensor([[0, r, c] for r in range(2) for c in range(3)], dtype=torch.float32)
    direct = parts.denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=torch.ones(2),
                            pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=torch.zeros(7, 3),
                            img_ids=ids).sample
    torch.testing.assert_close(out, FluxPipeline._unpack_latents(direct, 4, 6, 1))
    torch.testing.assert_close(out.view(2, 16, 2, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 6, 64), direct)


def test_a_caption_only_clip_cuts_is_named_with_the_encoder_that_loses_it(flux_config, photos):
    """FLUX.1's CLIP reads 77 tokens (the tiny one 16) and its T5 512: a caption between the two loses its end
    for CLIP's pooled vector only, and the warning says so."""
    (photos / "photo-1.txt").write_text("[trigger] " + "in the snow " * 6)
    config = flux_config()
    parts = load_components(config, device=CPU, precision="no")
    limits = FLUX.tokens_read(parts.tokenizers)
    assert limits == [16, 512]
    [warning] = TrainingData.load(config).long_prompts(parts.tokenizers, limits=limits)
    assert str(photos / "photo-1.txt") in warning and "text encoder 1 reads 16 of them" in warning
    assert "the others read it all" in warning


# --- Training --------------------------------------------------------------------------------------------------
def test_the_flow_loss_falls_on_the_photos(flux_config):
    """Forty steps on one batch (the transformer's own weights, a high rate): the flow-matching loss halves."""
    config = flux_config(cache_latents=True)
    parts = load_components(config, device=CPU, precision="no")
    parts.denoiser.requires_grad_(True)
    losses = losses_on_one_batch(config, parts, torch.optim.AdamW(parts.denoiser.parameters(), lr=1e-2))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_a_flux_lora_trains_snapshots_and_loads_in_diffusers(flux_config, tiny_flux_model):
    from diffusers import FluxPipeline
    from safetensors import safe_open

    losses = []
    final = train(flux_config(snapshot_steps=[1]), on_step=lambda step, loss, lr: losses.append(loss))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    meta = snapshots.info(final)
    assert (meta["method"], meta["trained"], meta["native_resolution"]) == ("lora", ["transformer"], 32)

    base = FluxPipeline.from_pretrained(tiny_flux_model, local_files_only=True)
    before = _image(base)
    base.load_lora_weights(final, weight_name=snapshots.LORA_WEIGHTS)  # what a user of diffusers does
    theirs = _image(base)
    ours = _image(snapshots.load_pipeline(final, device=CPU))  # how comparison renders it
    assert abs(theirs - before).max() > 1e-4  # the adapters change the drawing
    assert abs(ours - theirs).max() < 1e-4  # fused or not, the same adapters (float rounding apart)
    # The kohya-layout file ComfyUI and Forge read: BFL's names, q/k/v fused (proved in test_kohya_flux.py).
    with safe_open(final / snapshots.KOHYA_WEIGHTS, "pt") as kohya:
        keys, metadata = set(kohya.keys()), kohya.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in keys
    assert metadata["ss_base_model_version"] == "flux1"


def test_a_flux_lora_exports_in_kohyas_layout_with_its_model_spec(flux_config, tmp_path):
    from safetensors import safe_open

    from dreambooth_nb import export

    final = train(flux_config(max_train_steps=1))
    path = export(final.parent.parent, tmp_path / "sks-dog.safetensors")
    with safe_open(path, "pt") as exported:
        keys, metadata = set(exported.keys()), exported.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora" and metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert FLUX.architecture({"guidance_embeds": False}) == "flux-1-schnell"  # (schnell has no guidance embedding)


@pytest.fixture
def four_bit_on_cpu(monkeypatch):
    """bitsandbytes ≥ 0.50 runs NF4 on CPU, but diffusers' 4-bit loader (and `loading.check_4bit`, which says so
    before anything loads) refuses without a GPU: lifting those two checks runs the real loader — the same
    quantization config, the same Linear4bit layers — on CPU. The GPU check loads it where it is meant to run."""
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    monkeypatch.setattr(BnB4BitDiffusersQuantizer, "validate_environment", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(train_module.loading, "check_4bit", lambda config, *, device: None)
    # On CPUs with AVX512-BF16, bitsandbytes repacks a layer's weights for its inference kernel in blocks of 64
    # inputs, more than the tiny transformer's layers have: every CPU takes the generic path here.
    monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: False)


def test_adapters_learn_on_a_4bit_base_qlora(flux_config, four_bit_on_cpu):
    """The transformer loads as NF4 (`load_in_4bit`), its linear layers bitsandbytes' Linear4bit with the LoRA on
    top; forty steps on one batch lower the flow loss, and the 4-bit weights do not move."""
    import bitsandbytes as bnb

    from dreambooth_nb.model.methods import method_for

    config = flux_config(cache_latents=True, load_in_4bit=True)
    parts = load_components(config, device=CPU, precision="no")
    base = parts.denoiser.transformer_blocks[0].attn.to_q
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == torch.uint8
    codes = base.weight.detach().clone()
    trained = method_for(config).setup(parts)
    adapters = [p for module in trained.values() for p in module.parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)  # fp32 masters
    losses = losses_on_one_batch(config, parts, torch.optim.AdamW(adapters, lr=3e-2))
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5  # (rank-4 adapters only: slower than all weights)
    assert torch.equal(parts.denoiser.transformer_blocks[0].attn.to_q.base_layer.weight, codes)


def test_a_qlora_run_trains_and_its_snapshot_loads_on_the_unquantized_base(flux_config, tiny_flux_model,
                                                                           four_bit_on_cpu):
    from diffusers import FluxPipeline

    final = train(flux_config(load_in_4bit=True, max_train_steps=2))
    pipe = FluxPipeline.from_pretrained(tiny_flux_model, local_files_only=True)
    before = _image(pipe)
    pipe.load_lora_weights(final, weight_name=snapshots.LORA_WEIGHTS)
    assert abs(_image(pipe) - before).max() > 1e-4  # the adapters learned on the 4-bit base apply to the 16-bit one


def test_what_flux_cannot_train_is_refused_before_anything_loads(flux_config, monkeypatch):
    monkeypatch.setattr(train_module.loading, "load_components", lambda *a, **k: pytest.fail("loaded the model"))
    for changes, message in [(dict(method="full", learning_rate=1e-5), "method: full fine-tuning of FLUX.1"),
                             (dict(train_text_encoder=True), "train_text_encoder: FLUX.1's text encoders"),
                             (dict(snr_gamma=5.0), "snr_gamma: min-SNR weighting is for"),
                             (dict(load_in_4bit=True), "load_in_4bit: diffusers loads a 4-bit .* only onto a CUDA")]:
        with pytest.raises(ConfigError, match=message):
            train(flux_config(**changes))


def test_flux_snapshots_render_with_the_flows_own_sampler(flux_config):
    import numpy as np
    from PIL import Image

    from dreambooth_nb.results.evaluate import EvalSpec, render

    final = train(flux_config(max_train_steps=1))
    spec = EvalSpec(prompts=[PROMPT], seeds=[0], scheduler="ddim", num_inference_steps=2, resolution=32)
    (item,) = render(final, spec, device="cpu")
    with Image.open(item.image) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (32, 32, 3) and pixels.std() > 0


# --- The preset, the plan and the fit ----------------------------------------------------------------------------
def test_the_family_and_its_preset(flux_config):
    config = flux_config()
    assert BaseModel.of(config).family is FLUX
    assert (config.method, config.lora_rank, config.snr_gamma, config.load_in_4bit) == ("lora", 4, None, False)
    assert config.sample_batch_size == 1  # class images one at a time on a T4
    assert config.lora_target_modules == ["to_q", "to_k", "to_v", "to_out.0"]  # the QLoRA blog's


def test_setup_takes_the_flux_preset_for_a_flux_model(tiny_flux_model, photos, tmp_path):
    """Notebook 1 with MODEL_ID a FLUX.1 model: a LoRA whatever METHOD says, the QLoRA recipe's 512 px by
    default; on a T4 (no GPU here: planned for one) the fit would load a full-size base in 4 bits."""
    from dreambooth_nb.notebook import project as projects

    assert projects.default_resolution(str(tiny_flux_model)) == 512  # RESOLUTION = 0 (the family's own: 1024)
    project = projects.Project(tmp_path)
    config = projects.setup_config(project, kind="object", method="full", model=str(tiny_flux_model),
                                   instance_dir=photos, instance_prompt=PROMPT, resolution=32)
    assert (config.method, config.learning_rate, config.max_train_steps, config.variant) == ("lora", 1e-4, 700, None)
    assert config.fit_to_gpu and not config.load_in_4bit  # (the tiny transformer fits in 16 bits)
    from dreambooth_nb.notebook.settings import config_summary

    assert "Method:             LoRA, rank 4 on the transformer's to_q, to_k, to_v, to_out.0" in config_summary(config)


def test_flux1_dev_qlora_plans_under_14_gib_on_a_t4_and_11_gib_of_host_ram():
    """FLUX.1-dev from its shipped configs (offline), 512 px, batch 1, the 16 GB savers and a 4-bit base: the
    transformer's 11.9 B parameters take ≈0.52 bytes each (NF4 + double-quantized absmax); the peak is the
    prompts' encoding (T5-XXL in fp16, its `wo` kept in fp32 by transformers, before the transformer loads);
    no component passes whole through host RAM (each streams onto the GPU)."""
    from dreambooth_nb.planning.planner import GPUS, setup_for, trace_key
    from dreambooth_nb.model.quantization import nf4_bytes
    from dreambooth_nb.planning.trace import component_facts, component_sizes, read_model_configs, trace_step

    config = preset("object", "flux", "16gb", instance_data_dir="", instance_prompt=PROMPT, load_in_4bit=True)
    configs = read_model_configs(config.pretrained_model_name_or_path)
    sizes, facts = component_sizes(configs), component_facts(configs)
    assert round(sizes["transformer"] / 1e9, 1) == 11.9 and round(sizes["text_encoder_2"] / 1e9, 2) == 4.76
    assert facts["text_encoder_2"].fp32_in_fp16 == 24 * 2 * 4096 * 10240 // 2  # each layer's wo: d_ff × d_model
    planned = plan(config, gpu="T4")
    assert planned.fits and planned.gpu_required_bytes <= 14 * 2**30
    assert planned.gpu_phase == "encoding the prompts"
    assert planned.host_peak_bytes <= 11 * 2**30
    assert nf4_bytes(sizes["transformer"]) < 0.53 * sizes["transformer"]
    # The training step itself: the transformer's weights at their 4-bit size (norms, biases, embeddings in
    # 16 bits are the rest), and the fp32 adapters, far below the encoding's peak.
    step = trace_step(trace_key(configs, setup_for(config, GPUS["T4"])))
    assert nf4_bytes(sizes["transformer"]) < step.peak["frozen"] < nf4_bytes(sizes["transformer"]) + 0.1e9
    assert sum(step.peak.values()) + step.dequantized < 0.7 * planned.gpu_allocated_bytes


def test_fit_loads_flux_in_4_bits_on_a_t4_and_says_why_and_not_on_a_large_gpu():
    config = preset("object", "flux", "16gb", instance_data_dir="", instance_prompt=PROMPT)
    report = fit_report(config, gpu="T4")
    assert report.config.load_in_4bit and report.after.fits and not report.before.fits
    (base,) = [c for c in report.choices if c.saver == "base weights"]
    assert (base.before, base.after) == ("16-bit", "4-bit (NF4)") and "16-bit base needs" in base.why
    assert not fit_report(config, gpu="A100-80GB").config.load_in_4bit  # the exact base where it fits


def test_4bit_is_the_ladders_rung_before_giving_up_for_a_lora():
    from dreambooth_nb.planning.memory import next_memory_saver

    config = preset("object", "flux", "16gb", instance_data_dir="", instance_prompt=PROMPT)
    assert next_memory_saver(config).changes == {"load_in_4bit": True}
    assert next_memory_saver(config.replace(load_in_4bit=True)) is None
    with pytest.raises(ConfigError, match="load_in_4bit: a 4-bit base cannot be trained itself"):
        from dreambooth_nb.model.methods import method_for

        full = preset("object", instance_data_dir="", instance_prompt=PROMPT, load_in_4bit=True)
        method_for(full).check(BaseModel.of(full).family)


def test_renders_on_a_t4_load_the_largest_parts_in_4_bits_only_where_16_bits_do_not_fit():
    """FLUX.1-dev in 16 bits is 33 GB (transformer 24, T5-XXL 9.5): on a T4 both load in 4 bits; SD 3.5 Medium
    only its T5; SD 1.5 and SDXL nothing; an A100-80GB nothing. (The 4-bit load itself needs CUDA: the GPU
    check runs it.)"""
    from dreambooth_nb.config import FLUX_DEV, SD15, SD35_MEDIUM, SDXL
    from dreambooth_nb.model.quantization import quantized_to_fit
    from dreambooth_nb.planning.planner import GPUS
    from dreambooth_nb.planning.trace import component_sizes, read_model_configs

    def chosen(model, gpu):
        return quantized_to_fit(component_sizes(read_model_configs(model)), gpu_bytes=GPUS[gpu].total_bytes)

    assert chosen(FLUX_DEV, "T4") == ["transformer", "text_encoder_2"]
    assert chosen(SD35_MEDIUM, "T4") == ["text_encoder_3"]
    assert chosen(SD15, "T4") == chosen(SDXL, "T4") == chosen(FLUX_DEV, "A100-80GB") == []


def test_comparisons_of_a_flux_run_use_its_sampler_and_its_distilled_guidance(flux_config, make_config):
    """Notebook 4's defaults follow the model: FLUX.1-dev's own Euler sampler (a DDPM sampler's name means it
    too) and its distilled guidance 3.5; an SD model keeps DDIM and 7.5, and every one of its samplers."""
    from dreambooth_nb.model.objectives import Diffusion, Flow
    from dreambooth_nb.notebook.settings import sampler_choices
    from dreambooth_nb.results.evaluate import EvalSpec

    flux = EvalSpec.for_config(flux_config(), scheduler="ddim", guidance_scale=0)
    assert (flux.scheduler, flux.guidance_scale) == ("euler", 3.5)
    assert EvalSpec.for_config(flux_config(), guidance_scale=2.0).guidance_scale == 2.0
    sd = EvalSpec.for_config(make_config(), scheduler="euler", guidance_scale=0)
    assert (sd.scheduler, sd.guidance_scale) == ("euler", 7.5)
    assert EvalSpec.for_config(make_config()).scheduler == "ddim"
    assert sampler_choices(flux_config()) == list(Flow.choices) and sampler_choices(make_config()) == list(Diffusion.choices)
    config = FlowMatchEulerDiscreteScheduler().config
    assert type(Diffusion().sampler("euler", DDPM_CONFIG)).__name__ == "EulerDiscreteScheduler"
    assert type(Flow().sampler("dpm", config)).__name__ == "FlowMatchEulerDiscreteScheduler"
