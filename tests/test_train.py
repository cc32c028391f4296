"""The trainer, run for real at tiny size: every option, the optimizer, accumulation, the losses, saving."""

import functools
import importlib
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from dreambooth_nb import train
from dreambooth_nb.model import loading as models
from dreambooth_nb.training.data import CLASS, INSTANCE, ImageFolder, TrainingData
from dreambooth_nb.model.loading import load_components
from dreambooth_nb.model.objectives import Diffusion
from dreambooth_nb.training.prompts import Prompts
from dreambooth_nb.training.train import compute_loss, make_optimizer
from one_batch import losses_on_one_batch
from recording import gradients_of

# The tiny models' draw: a DDPM schedule of 1000 timesteps (what `train` passes as `draw`)
uniform_timestep = functools.partial(Diffusion().draw, scheduler=DDPMScheduler())

# The package exports the function `train`, which hides the module of the same name as an attribute.
train_module = importlib.import_module("dreambooth_nb.training.train")


def _weights(folder, part="unet"):
    name = "diffusion_pytorch_model.safetensors" if part in ("unet", "vae") else "model.safetensors"
    return load_file(folder / part / name)


def _max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


MEMORY_OPTIONS = {
    "8bit-adam": dict(use_8bit_adam=True),
    "checkpointing": dict(gradient_checkpointing=True),
    "cache-latents": dict(cache_latents=True),
    "bf16": dict(mixed_precision="bf16"),
    "xformers-falls-back": dict(attention_backend="xformers"),
    "accumulation": dict(gradient_accumulation_steps=2),
    "all-16gb": dict(use_8bit_adam=True, gradient_checkpointing=True, cache_latents=True,
                     mixed_precision="auto", gradient_accumulation_steps=2),
    "all-with-text-encoder": dict(use_8bit_adam=True, gradient_checkpointing=True, cache_latents=True,
                                  train_text_encoder=True, gradient_accumulation_steps=2, random_flip=True),
}


@pytest.mark.parametrize("name", MEMORY_OPTIONS)
def test_each_memory_option_and_their_combination_trains(make_config, name):
    losses = []
    final = train(make_config(max_train_steps=2, **MEMORY_OPTIONS[name]), on_step=lambda s, loss, lr: losses.append(loss))
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (final / "model_index.json").is_file()


def test_8bit_adamw_is_the_optimizer_in_use(make_config, capsys):
    config = make_config(use_8bit_adam=True, max_train_steps=2, checkpointing_steps=1)
    train(config)
    assert "AdamW8bit" in capsys.readouterr().out
    state = torch.load(f"{config.output_dir}/states/state-000001/optimizer.pt", weights_only=True)["state"]

    def tensors(value):  # bitsandbytes nests its quantized state in a dict per parameter
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, dict):
            for inner in value.values():
                yield from tensors(inner)

    dtypes = {t.dtype for t in tensors(state)}
    assert torch.uint8 in dtypes  # 8-bit moments for the large tensors, not float32


def test_8bit_falls_back_when_bitsandbytes_cannot_run(make_config, capsys, monkeypatch):
    monkeypatch.setattr(models, "bitsandbytes_works", lambda device: (False, "no CUDA setup"))
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer, why = make_optimizer([{"params": params, "lr": 1e-3}], config=make_config(use_8bit_adam=True),
                                    device=torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW and why == "no CUDA setup"
    assert "8-bit Adam is not available (no CUDA setup)" in capsys.readouterr().out


# Batch 2 and batch 1 × 2 accumulated are the same gradient in exact arithmetic; in fp32 the sums run in
# another order, so they differ by rounding. The bound: each gradient element is a sum of products over
# at most n ≈ 1e4 terms (the widest reduction in the tiny model), whose rounding error grows like
# sqrt(n) · 2**-24 ≈ 6e-6 relative to the norm (γ_n = n · 2**-24 ≈ 6e-4 in the very worst case). 1e-3 of
# the gradient's norm lies above even that worst case, and far below what any real accumulation bug gives:
# a missing 1/accumulation scale is an error of 1.0, a wrong sample or timestep one of order 1.
# The comparison is on the gradients the optimizer receives, with SGD, not on AdamW's weights: Adam
# divides by |g|, so on parameters whose gradient is ≈ 0 it turns that rounding into a step of up to one
# learning rate (the first update is lr · g/|g|), and a weight tolerance would depend on the machine.
GRADIENT_RTOL = 1e-3


def _assert_same_gradients(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and a, "both runs must make the same number of optimizer steps"
    for step, (ga, gb) in enumerate(zip(a, b), start=1):
        assert ga.norm() > 0, f"step {step}: no gradient reached the optimizer"
        relative = ((ga - gb).norm() / ga.norm()).item()
        assert relative < GRADIENT_RTOL, f"step {step}: gradients differ by {relative:.2e} of their norm"


def test_accumulating_two_batches_of_one_matches_one_batch_of_two(make_config, tmp_path, monkeypatch):
    one_batch = gradients_of(
        make_config(train_batch_size=2, max_train_steps=3, output_dir=str(tmp_path / "a")), monkeypatch)
    accumulated = gradients_of(
        make_config(train_batch_size=1, gradient_accumulation_steps=2, max_train_steps=3,
                    output_dir=str(tmp_path / "b")), monkeypatch)
    _assert_same_gradients(one_batch, accumulated)
    # The test can fail: a batch of one alone (what accumulation without the second micro-batch gives)
    # is a different gradient by far more than the bound.
    half = gradients_of(make_config(train_batch_size=1, max_train_steps=3,
                                                  output_dir=str(tmp_path / "c")), monkeypatch)
    assert ((half[0] - one_batch[0]).norm() / one_batch[0].norm()).item() > 100 * GRADIENT_RTOL


def test_accumulation_with_text_encoder_and_prior_preservation(make_config, tmp_path, monkeypatch):
    common = dict(max_train_steps=2, train_text_encoder=True, with_prior_preservation=True,
                  class_prompt="a photo of a dog", class_data_dir=str(tmp_path / "class"), num_class_images=2)
    a = gradients_of(make_config(train_batch_size=2, output_dir=str(tmp_path / "a"), **common),
                                   monkeypatch)
    b = gradients_of(make_config(train_batch_size=1, gradient_accumulation_steps=2,
                                               output_dir=str(tmp_path / "b"), **common), monkeypatch)
    _assert_same_gradients(a, b)  # UNet and text encoder gradients, concatenated


class _FakeOutput:
    def __init__(self, sample):
        self.sample = sample


def test_prior_loss_is_computed_on_the_class_half_only(make_config, tiny_model, tmp_path):
    """A UNet that predicts the noise exactly for instance rows and is off by 1 on class rows."""
    config = make_config(with_prior_preservation=True, class_prompt="a dog", class_data_dir=str(tmp_path),
                         train_batch_size=2)
    parts = load_components(config, device=torch.device("cpu"), precision="no")
    folder = ImageFolder.load(config.concepts[0].instance_data_dir, prompt="p", resolution=32)
    data = TrainingData([folder], [ImageFolder.from_paths(sorted(Path(config.concepts[0].instance_data_dir).iterdir()),
                                                          prompt="a dog", resolution=32)])
    data.encode(vae=parts.vae, config=config.replace(cache_latents=True), device=torch.device("cpu"),
                dtype=torch.float32)
    batch = data.batch(0, config=config, draw=uniform_timestep)
    assert data.texts == ["p", "a dog"]
    assert batch["prompt"].tolist() == [INSTANCE, INSTANCE, CLASS, CLASS]
    assert batch["is_prior"].tolist() == [False, False, True, True]

    def unet(noisy, timesteps, hidden, added_cond_kwargs=None):
        off = batch["is_prior"].float().view(-1, 1, 1, 1)
        return _FakeOutput(batch["noise"] + off)

    prompts = Prompts(["a photo of sks dog", "a dog"], family=parts.family, tokenizers=parts.tokenizers)
    prompts.encode_once(parts.text_encoders, device=torch.device("cpu"))
    for weight in (0.0, 1.0, 2.5):
        loss = compute_loss(batch, denoiser=unet, family=parts.family, prompts=prompts, encoders=None,
                            scheduler=parts.noise_scheduler, config=config.replace(prior_loss_weight=weight),
                            device=torch.device("cpu"))
        assert loss.item() == pytest.approx(weight)  # instance half contributes 0, class half 1 × weight


@pytest.mark.parametrize("schedule,warmup,expected", [
    ("constant", 0, [1e-4] * 6),
    ("constant_with_warmup", 2, [5e-5, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4]),
    ("linear", 2, [5e-5, 1e-4, 0.75e-4, 0.5e-4, 0.25e-4, 0.0]),
])
def test_lr_schedule_steps_once_per_optimizer_step(make_config, schedule, warmup, expected):
    lrs = []
    train(make_config(lr_scheduler=schedule, lr_warmup_steps=warmup, max_train_steps=6, gradient_accumulation_steps=2),
          on_step=lambda step, loss, lr: lrs.append(lr))
    assert lrs == pytest.approx(expected)


def test_text_encoder_frozen_stays_identical_and_trained_changes(make_config, tiny_model, tmp_path):
    base = load_file(tiny_model / "text_encoder" / "model.safetensors")
    frozen = train(make_config(output_dir=str(tmp_path / "frozen"), max_train_steps=2))
    trained = train(make_config(output_dir=str(tmp_path / "trained"), max_train_steps=2, train_text_encoder=True,
                                text_encoder_learning_rate=1e-3))
    assert _max_diff(_weights(frozen, "text_encoder"), base) == 0.0
    assert _max_diff(_weights(trained, "text_encoder"), base) > 1e-5


def test_a_trained_text_encoder_runs_in_train_mode(make_config, monkeypatch):
    """transformers checkpoints a text encoder's activations only in train mode (it checks `training`)."""
    modes = []
    real = train_module.compute_loss

    def spy(batch, **kwargs):
        modes.append(all(encoder.training for encoder in kwargs["encoders"]))
        return real(batch, **kwargs)

    monkeypatch.setattr(train_module, "compute_loss", spy)
    train(make_config(max_train_steps=2, train_text_encoder=True, gradient_checkpointing=True))
    assert modes == [True, True]


def test_restoring_random_state_saved_on_more_gpus_than_there_are(monkeypatch):
    """A state saved on Kaggle's two GPUs resumes on Colab's one: the second GPU's state is not needed."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.append((int(state[0]), index)))
    before = torch.get_rng_state()
    saved = {"torch": [before, torch.get_rng_state()], "cuda": [torch.full((8,), r, dtype=torch.uint8) for r in (0, 1)]}
    train_module.restore_rng(saved, rank=0)  # one process now: rank 0's generators, on its device
    assert restored == [(0, 0)] and torch.equal(torch.get_rng_state(), before)
    train_module.restore_rng(saved, rank=2)  # more processes than saved: rank 0's
    assert restored[-1] == (0, 0)


def test_the_xformers_probe_survives_an_error_without_a_message(monkeypatch):
    from dreambooth_nb.model import loading as models

    assert models.first_line(RuntimeError()) == "RuntimeError"
    assert models.first_line(ValueError("bad\nmore")) == "ValueError: bad"

    import sys
    import types

    def fails(*args, **kwargs):
        raise RuntimeError()  # as some CUDA kernel failures do: no message at all

    xformers = types.ModuleType("xformers")
    xformers.ops = types.SimpleNamespace(memory_efficient_attention=fails)
    monkeypatch.setitem(sys.modules, "xformers", xformers)
    monkeypatch.setitem(sys.modules, "xformers.ops", xformers.ops)
    monkeypatch.setattr(models.torch, "randn", lambda *args, **kwargs: torch.zeros(1))
    ok, why = models.xformers_works(torch.device("cuda"))
    assert not ok and why == "xformers is not usable (RuntimeError)"


def test_text_encoder_stops_training_at_its_stop_step(make_config, tmp_path):
    stopped_at_1 = train(make_config(output_dir=str(tmp_path / "a"), max_train_steps=3, train_text_encoder=True,
                                     stop_text_encoder_training=1, snapshot_steps=[1]))
    after_1 = _weights(stopped_at_1.parent / "step-000001", "text_encoder")
    assert _max_diff(_weights(stopped_at_1, "text_encoder"), after_1) == 0.0
    unet_moved = _max_diff(_weights(stopped_at_1), _weights(stopped_at_1.parent / "step-000001"))
    assert unet_moved > 0.0


def test_loss_falls_on_a_fixed_batch(make_config):
    from dreambooth_nb.model.methods import method_for

    config = make_config(learning_rate=1e-3, train_batch_size=2)
    parts = load_components(config, device=torch.device("cpu"), precision="no")
    method_for(config).setup(parts)  # (which weights train is the method's business)
    optimizer, _ = make_optimizer([{"params": parts.denoiser.parameters(), "lr": 1e-3}], config=config,
                                  device=torch.device("cpu"))
    losses = losses_on_one_batch(config, parts, optimizer, draw=uniform_timestep)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


@pytest.mark.parametrize("options", [dict(), dict(snr_gamma=5.0, offset_noise=0.1), dict(use_ema=True)])
def test_loss_options_run(make_config, options):
    assert (train(make_config(max_train_steps=2, **options)) / "unet").is_dir()


def test_v_prediction_models_train(make_config, tiny_model_vpred):
    assert train(make_config(pretrained_model_name_or_path=str(tiny_model_vpred), max_train_steps=2)).is_dir()


def test_ema_snapshot_differs_from_raw_weights(make_config, tmp_path):
    raw = train(make_config(output_dir=str(tmp_path / "raw"), max_train_steps=3))
    ema = train(make_config(output_dir=str(tmp_path / "ema"), max_train_steps=3, use_ema=True, ema_decay=0.5))
    assert _max_diff(_weights(raw), _weights(ema)) > 0


def test_saved_snapshots_reload_and_generate(make_config):
    from diffusers import StableDiffusionPipeline

    config = make_config(max_train_steps=3, snapshot_steps=[1, 2])
    final = train(config)
    steps = sorted(p.name for p in final.parent.iterdir())
    assert steps == ["step-000001", "step-000002", "step-000003"]
    pipe = StableDiffusionPipeline.from_pretrained(final, local_files_only=True)
    image = pipe(config.concepts[0].instance_prompt, num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_finished_run_is_not_trained_again(make_config, monkeypatch):
    config = make_config(max_train_steps=2)
    first = train(config)
    monkeypatch.setattr(train_module.loading, "load_components", lambda *a, **k: pytest.fail("trained again"))
    assert train(config) == first


def test_restarting_a_run_with_other_settings_is_refused(make_config):
    from dreambooth_nb import ConfigError

    train(make_config(max_train_steps=2, checkpointing_steps=1, snapshot_steps=[1]))
    with pytest.raises(ConfigError, match="learning_rate"):
        train(make_config(max_train_steps=2, learning_rate=5e-5))
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(make_config(max_train_steps=2, resume_from_checkpoint=None))


def test_the_validation_loss_is_measured_at_every_snapshot_the_same_way(make_config, tmp_path):
    """Fixed (image, noise, timestep) triples: two runs of the same config measure the same numbers, one per
    snapshot step, with a prior half on base-model renders of the class prompt (prior preservation off)."""
    import json

    config = make_config(max_train_steps=3, snapshot_steps=[1, 2], class_prompt="a photo of a dog")
    seen = []
    train(config.replace(output_dir=str(tmp_path / "a")), on_validation=lambda step, losses: seen.append(step))
    train(config.replace(output_dir=str(tmp_path / "b")))
    a, b = ((json.loads((tmp_path / run / "history.json").read_text())["validation"]) for run in "ab")
    assert a == b and [v["step"] for v in a] == seen == [1, 2, 3]
    assert all(v["fit"] > 0 and v["prior"] > 0 for v in a)
    # Rendered once by the base model, one image at a time, into a folder shared by the runs beside each other.
    from dreambooth_nb.training.priors import BASE_RENDERS

    (shared,) = (tmp_path / BASE_RENDERS).iterdir()
    assert len(list(shared.glob("class-*.png"))) == 4 and not (tmp_path / "a" / "validation").exists()
    assert shared.name.startswith("a-photo-of-a-dog-32px-")
    written = {p.name: p.stat().st_mtime_ns for p in shared.iterdir()}
    train(config.replace(output_dir=str(tmp_path / "c"), learning_rate=2e-4))
    assert {p.name: p.stat().st_mtime_ns for p in shared.iterdir()} == written  # a third run renders nothing


def test_a_run_that_rendered_its_own_validation_images_keeps_them(make_config, tmp_path):
    """Runs of earlier versions rendered them into their own `validation/`: resumed, they keep those numbers."""
    from dreambooth_nb.training.priors import BASE_RENDERS, reference_folder

    config = make_config(max_train_steps=2, class_prompt="a photo of a dog", output_dir=str(tmp_path / "old"))
    own = tmp_path / "old" / "validation"
    own.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 200, 30)).save(own / "class-00000.png")
    assert reference_folder(config, config.concepts[0]) == own
    assert reference_folder(config.replace(output_dir=str(tmp_path / "new")), config.concepts[0]).parent \
        == tmp_path / BASE_RENDERS
