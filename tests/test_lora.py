"""LoRA Dreambooth at tiny size: every option trains, only the adapters change, the snapshot's two files
(diffusers and kohya) load into the base pipeline through diffusers' own loaders and agree."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_nb import preset, train
from dreambooth_nb.planning import memory
from dreambooth_nb.model import snapshots
from dreambooth_nb import storage
from dreambooth_nb.planning.memory import RunSizes

LORA = dict(method="lora", learning_rate=1e-3)

OPTIONS = {
    "plain": {},
    "8bit-accumulation": dict(use_8bit_adam=True, gradient_accumulation_steps=2),
    "prior-cached-checkpointing": dict(with_prior_preservation=True, class_prompt="a photo of a dog",
                                       num_class_images=2, cache_latents=True, gradient_checkpointing=True),
    "text-encoder-min-snr-offset": dict(train_text_encoder=True, snr_gamma=5.0, offset_noise=0.1,
                                        gradient_checkpointing=True),
    "bf16-ema": dict(mixed_precision="bf16", use_ema=True, ema_decay=0.9),
    "rank-8-alpha-16-dropout": dict(lora_rank=8, lora_alpha=16.0, lora_dropout=0.1),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_each_option_trains_a_lora(make_config, tmp_path, name):
    options = dict(OPTIONS[name])
    if options.get("with_prior_preservation"):
        options["class_data_dir"] = str(tmp_path / "class")
    losses = []
    final = train(make_config(max_train_steps=2, **LORA, **options), on_step=lambda s, loss, lr: losses.append(loss))
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    meta = snapshots.info(final)
    assert meta["method"] == "lora" and meta["trained"] == (["text_encoder", "unet"] if "text-encoder" in name
                                                             else ["unet"])
    assert (final / snapshots.LORA_WEIGHTS).is_file() and (final / snapshots.KOHYA_WEIGHTS).is_file()


def test_a_lora_run_saves_only_adapters_and_leaves_the_base_untouched(make_config, tiny_model):
    config = make_config(max_train_steps=3, checkpointing_steps=2, snapshot_steps=[1], **LORA)
    final = train(config)
    state = storage.latest_state(config.output_dir)
    saved = load_file(state / "unet.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    kohya = load_file(final / snapshots.KOHYA_WEIGHTS)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in kohya)
    assert sorted(p.name for p in final.iterdir()) == sorted([snapshots.LORA_WEIGHTS, snapshots.KOHYA_WEIGHTS,
                                                              storage.SNAPSHOT_MARKER])
    # The adapters moved: the first and the last snapshot differ; the base model's files did not change.
    first = load_file(storage.snapshot_path(config.output_dir, 1) / snapshots.LORA_WEIGHTS)
    last = load_file(final / snapshots.LORA_WEIGHTS)
    assert any(not torch.equal(first[k], last[k]) for k in last)


def _fused(model, load) -> dict:
    """The base pipeline's UNet and text encoder weights after `load` and `fuse_lora`, by part."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    if load is not None:
        load(pipe)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return {"unet": pipe.unet.state_dict(), "text_encoder": pipe.text_encoder.state_dict()}


def test_the_diffusers_and_the_kohya_file_give_the_same_weights(make_config, tiny_model):
    """Proved by diffusers' own loaders: its LoRA loader for our diffusers-format file, its kohya
    converter (what reads A1111/ComfyUI files) for the kohya file. alpha / rank = 2 is a power of two in
    both, so both scale the update exactly alike and the fused weights agree bit for bit — UNet and text
    encoder — and they differ from the base."""
    final = train(make_config(max_train_steps=3, **LORA, lora_alpha=8.0, lora_rank=4, train_text_encoder=True))
    from_diffusers = _fused(tiny_model, lambda p: p.load_lora_weights(final, weight_name=snapshots.LORA_WEIGHTS))
    from_kohya = _fused(tiny_model, lambda p: p.load_lora_weights(final, weight_name=snapshots.KOHYA_WEIGHTS))
    base = _fused(tiny_model, None)
    for part in ("unet", "text_encoder"):
        assert from_diffusers[part].keys() == from_kohya[part].keys() == base[part].keys()
        assert all(torch.equal(from_diffusers[part][k], from_kohya[part][k]) for k in base[part]), part
        assert any(not torch.equal(from_diffusers[part][k], base[part][k]) for k in base[part]), part


def test_a_lora_with_alpha_other_than_rank_loads_as_it_trained(make_config, tiny_model):
    """alpha = 8 at rank 4 scales the update by 2 in training; a loader that assumes alpha = rank (diffusers'
    kohya converter writes that) must still get W + 2·B·A. Checked against the state's raw adapters at the
    same step: W + (alpha / rank)·B·A computed here. Both sides are fp32 sums of 4 products added to W, so
    they agree to a few ulps of |W| (≤ 1 here): 1e-6 absolute."""
    config = make_config(max_train_steps=2, checkpointing_steps=1, snapshot_steps=[1], **LORA, lora_alpha=8.0)
    train(config)
    raw = load_file(storage.state_path(config.output_dir, 1) / "unet.safetensors")
    snapshot = storage.snapshot_path(config.output_dir, 1)
    base = _fused(tiny_model, None)["unet"]
    for name in (snapshots.LORA_WEIGHTS, snapshots.KOHYA_WEIGHTS):
        fused = _fused(tiny_model, lambda p: p.load_lora_weights(snapshot, weight_name=name))["unet"]
        for key in (k for k in raw if ".lora_A." in k):
            module = key.split(".lora_A.")[0]
            expected = base[f"{module}.weight"] + 2.0 * raw[key.replace(".lora_A.", ".lora_B.")] @ raw[key]
            assert torch.allclose(fused[f"{module}.weight"], expected, rtol=0, atol=1e-6), (name, module)


def test_a_lora_snapshot_loads_and_generates(make_config):
    config = make_config(max_train_steps=2, **LORA, train_text_encoder=True)
    final = train(config)
    kohya = load_file(final / snapshots.KOHYA_WEIGHTS)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in kohya)  # A1111's names
    assert any(k.startswith("lora_unet_") for k in kohya)
    pipe = snapshots.load_pipeline(final, device=torch.device("cpu"))
    image = pipe(config.concepts[0].instance_prompt, num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_the_lora_preset_and_its_disk_plan(tmp_path):
    config = preset("object", "lora", "16gb", instance_data_dir="p", instance_prompt="a photo of sks dog",
                    output_dir="/content/drive/MyDrive/x", snapshot_steps=[200])
    assert (config.method, config.learning_rate, config.lora_rank) == ("lora", 1e-4, 4)
    # SD 1.5 at rank 4 on to_q, to_k, to_v, to_out.0: 797,184 adapter weights (3.2 MB in fp32).
    sizes = RunSizes(total=859_520_964 + 123_060_480 + 83_653_863, trained=797_184)
    plan = memory.disk_plan(config.replace(mixed_precision="fp16"), sizes=sizes, free_bytes=15 * 10**9,
                            trash_counts=True, missing_class_images=0)
    assert plan.checkpointing_steps == 100  # states are small: every 100 steps even on a free Drive
    snapshot = memory.snapshot_bytes(config.replace(mixed_precision="fp16"), sizes=sizes, complete=False)
    assert snapshot == 2 * 797_184 * 2  # fp16, diffusers + kohya: 3.2 MB
    assert plan.peak_bytes < 50 * 10**6


def test_parameter_counts_know_what_lora_trains(make_config):
    from dreambooth_nb.model.loading import parameter_counts

    full, lora = parameter_counts(make_config()), parameter_counts(make_config(**LORA))
    assert full["trained"] == full["unet"]
    assert 0 < lora["trained"] < full["unet"] / 10 and lora["unet"] == full["unet"]


def test_adapters_on_convolutions_and_attention_both_load(make_config, tiny_model):
    """With conv adapters beside the attention ones, every adapter reaches the loaded pipeline (diffusers'
    older `lora.down` key format lost the attention ones silently; the snapshot uses PEFT's layout)."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    final = train(make_config(max_train_steps=2, **LORA, lora_target_modules=targets))
    pipe = snapshots.load_pipeline(final, device=torch.device("cpu"))
    pipe.unload_lora_weights()  # (fused weights stay)
    loaded, base = pipe.unet.state_dict(), _fused(tiny_model, None)["unet"]
    for module in ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1"):
        assert not torch.equal(loaded[f"{module}.weight"], base[f"{module}.weight"]), module


def test_a_lora_run_exports_its_adapters_or_a_merged_checkpoint(make_config, tmp_path):
    """`export` of a LoRA run writes kohya's file with the run's metadata (the adapters, a few kB here), or
    with `merged` one original-layout checkpoint of base + adapters that diffusers' single-file loader reads."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from dreambooth_nb.results.export import export, how_to_use

    config = make_config(max_train_steps=2, **LORA)
    final = train(config)
    adapters = export(final, tmp_path / "lora.safetensors")
    assert load_file(adapters).keys() == load_file(final / snapshots.KOHYA_WEIGHTS).keys()
    with safe_open(adapters, framework="pt") as handle:
        meta = handle.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["dreambooth_nb.method"] == "lora"
    assert meta["modelspec.trigger_phrase"] == config.concepts[0].instance_prompt
    assert "<lora:lora:1>" in how_to_use(adapters)
    merged = export(final, tmp_path / "merged.safetensors", half=False, merged=True)
    pipe = StableDiffusionPipeline.from_single_file(merged, config=config.pretrained_model_name_or_path,
                                                    local_files_only=True)
    fused = snapshots.load_pipeline(final, device=torch.device("cpu"))
    fused.unload_lora_weights()
    ours, theirs = fused.unet.state_dict(), pipe.unet.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # fp32 export: every weight exactly
