"""`fit`: the fastest memory savers whose plan fits a GPU, never a change to what is trained.

1. The choice for SD 1.5 at 512 px on a T4, an L4 and an A100-40GB, full fine-tuning and LoRA, is what the plan
   allows: each saver left on is one whose removal the plan says would not fit (and the table of choices is
   pinned). Plans run on fake tensors from the shipped configs: offline, no weights.
2. What is trained never changes: every setting but the savers is kept, the effective batch too, and a fitted
   config can resume the run it was fitted from (`changed_settings` is empty).
3. The savers fit changes train the same model, on the tiny pipeline: gradient checkpointing on or off and
   batch instead of accumulation give the optimizer the same gradients (within rounding, see
   `GRADIENT_RTOL`); 8-bit AdamW is AdamW from the moments it stores, which are the exact moments quantized by
   bitsandbytes' blockwise quantizer (so they differ from 32-bit AdamW by that quantization alone).
4. Resume on another GPU: the savers are re-fitted within what may change on resume, and the run says so.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from dreambooth_nb import fit, fit_report, preset
from dreambooth_nb.notebook import ui
from dreambooth_nb.config import changed_settings
from dreambooth_nb.planning.fitting import SAVERS, previous_run, step_seconds
from dreambooth_nb.planning.planner import plan
from recording import gradients_of

train_module = importlib.import_module("dreambooth_nb.training.train")
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def sd15(*names, **overrides):
    """A preset with the 16 GB profile (every saver on: batch by accumulation), SD 1.5 at 512 px."""
    values = dict(instance_data_dir="photos", instance_prompt="a photo of sks dog", class_prompt="a photo of a dog",
                  class_data_dir="class-images", resolution=512)
    return preset(*names, "16gb", **{**values, **overrides})


def _savers(config) -> tuple:
    return (config.gradient_checkpointing, config.train_batch_size, config.gradient_accumulation_steps,
            config.use_8bit_adam)


# --- 1. The choice per GPU ------------------------------------------------------------------------------------
# (checkpointing, batch, accumulation, 8-bit Adam) that fit chooses for the `object` preset (batch 4) with the
# 16 GB profile. Why, from the plan (GiB needed, with the 10 % margin and the CUDA context): full fine-tuning
# without checkpointing at batch 4 × 1 needs 12.60 with 8-bit Adam and 17.85 with 32-bit, so a T4 (14.75) keeps
# 8-bit Adam and the L4 (22.0) and A100 (39.4) drop every saver; a LoRA needs at most 6.74 with none.
EXPECTED = {
    ("full", "T4"): (False, 4, 1, True),
    ("full", "L4"): (False, 4, 1, False),
    ("full", "A100-40GB"): (False, 4, 1, False),
    ("lora", "T4"): (False, 4, 1, False),
    ("lora", "L4"): (False, 4, 1, False),
    ("lora", "A100-40GB"): (False, 4, 1, False),
}


@pytest.mark.parametrize("method, gpu", EXPECTED)
def test_the_choice_per_gpu_is_what_the_plan_allows(method, gpu):
    config = sd15("object", *(("lora",) if method == "lora" else ()))
    assert _savers(config) == (True, 1, 4, True)  # the 16 GB profile: every saver on
    fitted = fit(config, gpu)
    assert _savers(fitted) == EXPECTED[method, gpu]
    assert fitted.cache_latents and plan(fitted, gpu).fits
    # Every saver still on is needed: the plan without it does not fit.
    if fitted.gradient_checkpointing:
        assert not plan(dataclasses.replace(fitted, gradient_checkpointing=False), gpu).fits
    if fitted.use_8bit_adam:
        assert not plan(dataclasses.replace(fitted, use_8bit_adam=False), gpu).fits
    if fitted.gradient_accumulation_steps > 1:
        assert not plan(dataclasses.replace(fitted, train_batch_size=4, gradient_accumulation_steps=1), gpu).fits


@pytest.mark.parametrize("gpu, expected", [("T4", (False, 2, 1, True)), ("L4", (False, 2, 1, False))])
def test_faces_with_prior_preservation_and_the_text_encoder(gpu, expected):
    """Batch 2 with prior preservation is 4 images a micro-step: without checkpointing, batch 2 × 1 needs 13.72
    GiB with 8-bit Adam (1 × 2 accumulated would need 15.09: accumulated gradients live through the forward)."""
    fitted = fit(sd15("face", train_text_encoder=True), gpu)
    assert _savers(fitted) == expected and plan(fitted, gpu).fits
    if gpu == "T4":
        assert not plan(dataclasses.replace(fitted, train_batch_size=1, gradient_accumulation_steps=2), gpu).fits


def test_the_report_says_what_changed_and_why_with_the_plans_before_and_after():
    report = fit_report(sd15("object"), "T4")
    assert [c.saver for c in report.changes] == ["gradient checkpointing", "batch"]
    why = {c.saver: c.why for c in report.choices}
    assert "0.93 → 1.14 it/s" in why["gradient checkpointing"] and "1 × 4" in why["batch"]
    assert why["Adam"].startswith("needed: 32-bit AdamW needs 17.85 of 14.75 GiB")
    assert why["cached latents"].startswith("faster and smaller")
    assert report.before.gpu_required_bytes < report.after.gpu_required_bytes <= report.after.gpu_total_bytes
    assert report.fits and report.speedup > 1.5
    text = repr(report)
    assert "Fitted to T4: gradient checkpointing off, batch 4 × 1" in text and "Before: 9.75 GiB" in text
    assert "Memory plan" in report._repr_html_() and "<table>" in report._repr_html_()


def test_ema_is_offloaded_only_where_needed():
    config = sd15("object", use_ema=True, offload_ema=True)
    assert fit(config, "L4").offload_ema is False  # room for it on the GPU: no copy there and back every step
    on_t4 = fit_report(config, "T4")
    assert on_t4.fits
    if on_t4.config.offload_ema:  # then it must be needed
        assert not plan(dataclasses.replace(on_t4.config, offload_ema=False), "T4").fits


def test_the_step_time_model_gives_back_the_t4_table():
    """ShivamShrirao/diffusers examples/dreambooth/README.md, T4, fp16, 8-bit Adam: it/s (micro-batches)."""
    rows = [  # (batch, accumulation, checkpointing, it/s)
        (1, 1, True, 0.93), (2, 1, True, 0.66), (1, 1, False, 1.14), (1, 2, True, 1.0), (2, 1, False, 0.82)]
    for batch, accumulation, checkpointing, its in rows:
        config = sd15("object", train_batch_size=batch, gradient_accumulation_steps=accumulation,
                      gradient_checkpointing=checkpointing)
        assert step_seconds(config) == pytest.approx(accumulation / its, rel=0.01)
    # The order the issue names: checkpointing off is the largest single gain for a batch of 1, then batch
    # instead of accumulation; 32-bit Adam is not taken for speed.
    one = sd15("object", train_batch_size=1, gradient_accumulation_steps=1)
    assert step_seconds(one.replace(gradient_checkpointing=False)) / step_seconds(one) == pytest.approx(1 / 1.23, rel=0.02)
    assert step_seconds(one.replace(use_8bit_adam=False)) == step_seconds(one)


# --- 2. What is trained never changes -------------------------------------------------------------------------
@pytest.mark.parametrize("names, overrides, gpu", [
    (("object",), {}, "T4"),
    (("face",), dict(train_text_encoder=True, learning_rate=2e-6, max_train_steps=800), "L4"),
    (("object", "lora"), dict(lora_rank=8, use_ema=True, snr_gamma=5.0), "A100-40GB"),
    (("object",), dict(center_crop=False, cache_latents=False, random_flip=True), "T4"),
    (("face",), {}, 4),  # nothing fits 4 GiB: the least memory, and the verdict says so
])
def test_fitting_never_changes_what_is_trained(names, overrides, gpu):
    config = sd15(*names, **overrides)
    report = fit_report(config, gpu)
    fitted = report.config
    kept = {k: v for k, v in config.to_dict().items() if k not in SAVERS}
    assert {k: v for k, v in fitted.to_dict().items() if k not in SAVERS} == kept
    assert fitted.train_batch_size * fitted.gradient_accumulation_steps == \
        config.train_batch_size * config.gradient_accumulation_steps
    assert changed_settings(config.to_dict(), fitted) == []  # the fitted config resumes the same run
    assert fitted.validate(check_paths=False)
    if not config.center_crop:
        assert not fitted.cache_latents  # a random crop per step cannot be cached
    if gpu == 4:
        assert not report.fits and "Nothing fits" in report.headline()
        assert report.config.gradient_checkpointing and report.config.use_8bit_adam


def test_32_bit_adam_only_where_its_larger_states_fit_the_disk(monkeypatch):
    """On a free 15 GB Google Drive (deletions count: Drive's Trash) a full SD 1.5 state is 5.2 GB with 8-bit
    Adam and 10.3 GB with 32-bit: the disk plan would keep one state instead of one every 200 steps."""
    from dreambooth_nb import storage

    monkeypatch.setattr(storage, "free_bytes", lambda folder: 15 * 10**9)
    monkeypatch.setattr(storage, "deletes_go_to_trash", lambda folder, **kw: True)
    report = fit_report(sd15("object"), "L4")
    assert report.config.use_8bit_adam and not report.config.gradient_checkpointing
    assert "32-bit AdamW's training states (10.31 GB each)" in {c.saver: c.why for c in report.choices}["Adam"]


# --- 3. The same training with and without the savers fit changes (tiny model) --------------------------------
# Checkpointing recomputes the same forward ops on the same inputs, and batch 4 is the same four samples as
# 1 × 4 accumulated (the sample stream is indexed by position: step s covers positions 4s..4s+3 either way):
# in exact arithmetic the gradients are equal. In fp32 only the order of summation differs (a batch's gradient
# summed inside one matmul vs four gradients added; autograd's accumulation order), so they differ by rounding:
# each element is a sum over at most n ≈ 1e4 terms, whose error is ≈ √n · 2⁻²⁴ ≈ 6e-6 of the norm typically and
# n · 2⁻²⁴ ≈ 6e-4 at worst. 1e-3 of the norm is above that worst case and far below any real difference (a lost
# 1/accumulation scale or another sample is an error of order 1). The gradients are compared where the
# optimizer receives them (SGD swapped in), not as weights after AdamW, whose first step lr · g/|g| would turn
# rounding on ≈0 gradients into a full learning-rate step. Measured here (1 and 2 threads): 0, bit for bit
# (checkpointing), 1.0–1.3e-6 (batch); 1 × 2 instead of 1 × 4, a real difference, gives 0.6–1.0.
GRADIENT_RTOL = 1e-3


def _count_checkpoints(monkeypatch) -> list:
    """Calls of torch's activation checkpointing from now on (diffusers binds it when checkpointing is enabled)."""
    import torch.utils.checkpoint

    calls, real = [], torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    return calls


@pytest.mark.parametrize("change", ["checkpointing", "batch", "the fit of the 16gb profile"])
def test_the_savers_fit_changes_give_the_same_gradients(make_config, tmp_path, monkeypatch, change):
    profile = make_config(max_train_steps=3, use_8bit_adam=True, gradient_checkpointing=True, cache_latents=True,
                          mixed_precision="auto", gradient_accumulation_steps=4, output_dir=str(tmp_path / "a"))
    if change == "checkpointing":
        other = profile.replace(gradient_checkpointing=False, output_dir=str(tmp_path / "b"))
    elif change == "batch":
        other = profile.replace(train_batch_size=4, gradient_accumulation_steps=1, output_dir=str(tmp_path / "b"))
    else:
        other = fit(profile, "T4").replace(output_dir=str(tmp_path / "b"))
        assert _savers(other) == (False, 4, 1, False)  # the tiny model fits anything: every saver off
    checkpointed = _count_checkpoints(monkeypatch)
    a = gradients_of(profile, monkeypatch)
    assert checkpointed  # (the profile's run really recomputed its activations)
    checkpointed.clear()
    b = gradients_of(other, monkeypatch)
    assert bool(checkpointed) == other.gradient_checkpointing
    assert len(a) == len(b) == 3
    for step, (ga, gb) in enumerate(zip(a, b), start=1):
        assert ga.norm() > 0
        relative = ((ga - gb).norm() / ga.norm()).item()
        assert relative < GRADIENT_RTOL, f"step {step}: gradients differ by {relative:.2e} of their norm"


def test_checkpointing_the_text_encoder_too_gives_the_same_gradients(make_config, tmp_path, monkeypatch):
    common = dict(max_train_steps=2, train_text_encoder=True, gradient_accumulation_steps=2)
    a = gradients_of(make_config(gradient_checkpointing=True, output_dir=str(tmp_path / "a"), **common), monkeypatch)
    b = gradients_of(make_config(train_batch_size=2, gradient_accumulation_steps=1, max_train_steps=2,
                               train_text_encoder=True, output_dir=str(tmp_path / "b")), monkeypatch)
    for ga, gb in zip(a, b):
        assert ((ga - gb).norm() / ga.norm()).item() < GRADIENT_RTOL


def _dequantized(state, which: int) -> torch.Tensor:
    import bitsandbytes.functional as F

    return F.dequantize_blockwise(state[f"state{which}"], absmax=state[f"absmax{which}"], code=state[f"qmap{which}"],
                                  blocksize=256)


def test_8_bit_adamw_is_adamw_up_to_the_quantization_of_its_moments():
    """bitsandbytes' AdamW8bit (as `train.make_optimizer` builds it) stores each moment as an 8-bit code of its
    dynamic map times the absmax of its 256-value block. Two checks pin that this storage is the only
    difference from torch's AdamW:

    - a step of AdamW8bit equals a step of torch AdamW started from the moments AdamW8bit had stored
      (dequantized), to fp32 rounding (a few operations per element: ≈1e-7 relative; 1e-5 allowed);
    - the moments it stores after that step are the exact new moments (β·old + (1 − β)·g or g²) put through
      bitsandbytes' own `quantize_blockwise`, to fp32 rounding.

    So 8-bit and 32-bit AdamW differ by the quantization of the moments alone: measured here ≈1 % of their norm
    for the first moment and ≈0.7 % for the second, ≈3e-5 of the weights' norm after five steps at lr 1e-3."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    n = 8192  # above bitsandbytes' min_8bit_size (4096): 8-bit moments
    kwargs = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)  # the trainer's defaults
    weights = torch.nn.Parameter(torch.randn(n))
    eight = bnb.optim.AdamW8bit([weights], **kwargs)
    exact = torch.nn.Parameter(weights.detach().clone())
    reference = torch.optim.AdamW([exact], **kwargs)
    gradients = [torch.randn(n) * (1 + 10 * torch.rand(n)) for _ in range(6)]
    for g in gradients[:5]:
        weights.grad, exact.grad = g.clone(), g.clone()
        eight.step()
        reference.step()
    state = eight.state[weights]
    m, v = _dequantized(state, 1), _dequantized(state, 2)
    drift = ((weights - exact).norm() / exact.norm()).item()
    assert 0 < drift < 1e-3  # five steps apart by the quantization alone

    # A step from the stored moments, by both.
    restarted = torch.nn.Parameter(weights.detach().clone())
    torch_adamw = torch.optim.AdamW([restarted], **kwargs)
    torch_adamw.state[restarted] = {"step": torch.tensor(5.0), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    before = weights.detach().clone()
    weights.grad, restarted.grad = gradients[5].clone(), gradients[5].clone()
    eight.step()
    torch_adamw.step()
    update_8bit, update_torch = weights.detach() - before, restarted.detach() - before
    assert ((update_8bit - update_torch).norm() / update_torch.norm()).item() < 1e-5

    # What it stored: the exact new moments, quantized blockwise by bitsandbytes itself.
    beta1, beta2 = kwargs["betas"]
    for which, moment in ((1, beta1 * m + (1 - beta1) * gradients[5]), (2, beta2 * v + (1 - beta2) * gradients[5] ** 2)):
        codes, quant_state = F.quantize_blockwise(moment, code=state[f"qmap{which}"], blocksize=256)
        requantized = F.dequantize_blockwise(codes, quant_state)
        stored = _dequantized(state, which)
        assert (stored - requantized).abs().max().item() <= 1e-5 * moment.abs().max().item()
        assert 1e-4 < ((stored - moment).norm() / moment.norm()).item() < 0.05  # the quantization itself


def test_small_tensors_get_32_bit_moments_in_8_bit_adamw():
    """Under 4096 values (bitsandbytes' min_8bit_size: biases, norms) AdamW8bit keeps float32 moments: torch's
    AdamW step for step, to fp32 rounding."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(1)
    kwargs = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    a = torch.nn.Parameter(torch.randn(1000))
    b = torch.nn.Parameter(a.detach().clone())
    eight, reference = bnb.optim.AdamW8bit([a], **kwargs), torch.optim.AdamW([b], **kwargs)
    for _ in range(5):
        g = torch.randn(1000)
        a.grad, b.grad = g.clone(), g.clone()
        eight.step()
        reference.step()
    assert eight.state[a]["state1"].dtype == torch.float32
    assert ((a - b).norm() / (b.norm())).item() < 1e-6


# --- 4. Resume on another GPU ---------------------------------------------------------------------------------
def test_a_resume_on_a_smaller_gpu_refits_and_says_so():
    """Saved on an L4 (no savers, 32-bit Adam), resumed on a T4: 32-bit Adam no longer fits, so 8-bit Adam, and
    its moments restart; checkpointing stays off and the batch stays whole where the T4 allows it."""
    on_l4 = fit(sd15("object"), "L4")
    report = fit_report(on_l4, "T4", previous=on_l4)
    assert _savers(report.config) == (False, 4, 1, True)
    assert changed_settings(on_l4.to_dict(), report.config) == []
    assert "Resuming, re-fitted to T4: Adam 8-bit (was 32-bit: Adam's moments restart" in report.resumed[0]


def test_a_resume_on_a_larger_gpu_keeps_its_adam():
    """Saved on a T4 (8-bit Adam), resumed on an L4: 32-bit Adam would fit, but switching would restart Adam's
    moments, so the run keeps 8-bit Adam; the other savers change freely."""
    on_t4 = sd15("object")  # the 16 GB profile, as an older run saved it
    report = fit_report(on_t4, "L4", previous=on_t4)
    assert _savers(report.config) == (False, 4, 1, True)
    assert "the run started with 8-bit Adam" in {c.saver: c.why for c in report.choices}["Adam"]
    assert report.resumed[0].startswith("Resuming, re-fitted to L4: gradient checkpointing off (was on); batch "
                                        "4 × 1 (was 1 × 4: the same images per step)")


def test_the_panel_refits_a_resumed_run_and_the_log_says_so(make_config, capsys):
    """A run saved with the 16 GB profile's savers (a T4's), resumed from the training panel with the fit on:
    the savers are re-fitted (checkpointing off, one batch), 8-bit Adam is kept, and it trains on."""
    saved = make_config(max_train_steps=2, checkpointing_steps=1, use_8bit_adam=True, gradient_checkpointing=True,
                        cache_latents=True, gradient_accumulation_steps=2)
    train_module.train(saved)
    assert previous_run(saved.replace(max_train_steps=4)) is not None
    panel = ui.TrainingPanel(saved.replace(max_train_steps=4, fit_to_gpu=True), sample_steps=2, sample_seeds=(0,),
                             gpu="T4")
    assert panel.fit_box.value and panel.values()["gradient_checkpointing"] is False
    assert (panel.values()["train_batch_size"], panel.values()["use_8bit_adam"]) == (2, True)
    assert "Resuming, re-fitted to T4: gradient checkpointing off (was on); batch 2 × 1" in panel.fit_note.value
    panel.train()
    out = capsys.readouterr().out
    assert "Resuming, re-fitted to T4" in out and "Resuming from state-000001: step 1 of 4." in out
    assert panel._config.gradient_checkpointing is False and panel._config.use_8bit_adam


def test_no_previous_run_to_resume(make_config):
    assert previous_run(make_config()) is None


# --- 5. Two GPUs, and a fit that ran out of memory -----------------------------------------------------------
def test_the_fit_for_two_gpus_plans_the_buckets_and_fits_a_t4():
    """Kaggle's 2×T4: the object preset's 4 images per step split 2 per GPU (the effective batch kept); the fit
    plans each process with DDP's buckets and still fits a T4."""
    from dreambooth_nb.training.distributed import for_processes

    two = for_processes(sd15("object"), 2)
    report = fit_report(two, "T4")
    assert report.fits and report.config.num_processes == 2 and report.config.effective_batch == 4
    chosen = report.config
    assert plan(chosen, "T4").gpu_required_bytes <= plan(chosen, "T4").gpu_total_bytes
    # What fits one process with batch 4 × 1 does not fit two processes each holding its buckets' worth more...
    alone = fit(sd15("object"), "T4")
    assert plan(dataclasses.replace(alone, num_processes=2), "T4").gpu_allocated_bytes > \
        plan(alone, "T4").gpu_allocated_bytes
    # ...and the fit accounts for it: the plan it reports is the per-process plan with the buckets.
    assert report.after.gpu_allocated_bytes == plan(chosen, "T4").gpu_allocated_bytes


def test_a_run_that_ran_out_of_memory_is_never_fitted_as_large_again(tmp_path, monkeypatch):
    """The plan under-estimated what ran out of memory: pressing Train again (the panel re-fits) must not choose
    it, nor anything planned as large, on that GPU; a larger GPU is fitted as usual."""
    from dreambooth_nb.planning import memory
    from dreambooth_nb.planning.planner import GPUS

    config = sd15("object", output_dir=str(tmp_path / "run"))
    first = fit_report(config, "T4")
    assert first.fits and not first.config.gradient_checkpointing
    (tmp_path / "run").mkdir()
    from dreambooth_nb.storage import write_json

    write_json(tmp_path / "run" / memory.OUT_OF_MEMORY_FILE,
               {"gpu": "Tesla T4", "total_bytes": GPUS["T4"].total_bytes, "config": first.config.to_dict()})
    again = fit_report(config, "T4")
    failed_need = plan(first.config, "T4").gpu_required_bytes
    assert again.fits and _savers(again.config) != _savers(first.config)
    assert plan(again.config, "T4").gpu_required_bytes < failed_need
    assert any("ran out of memory on this GPU" in note for note in again.notes)
    assert not changed_settings(config.to_dict(), again.config)  # still the same run
    assert _savers(fit_report(config, "L4").config) == _savers(fit(sd15("object"), "L4"))  # a larger GPU: as usual
