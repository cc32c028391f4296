"""The memory planner: parameter counts from shipped configs, the published T4 table, monotonicity, the
verdict and its advice, LoRA and SDXL, and host RAM measured against a real CPU training run.

Everything runs offline on CPU: traces run on fake tensors (no memory), and the SD configs ship in
`dreambooth_nb/model/known_models/`. The SD 1.5 traces are shared through the planner's own cache.
"""

import json
import subprocess
import sys
import time
import dataclasses
from dataclasses import replace

import pytest

from dreambooth_nb import TrainConfig, preset
from dreambooth_nb.planning import memory
from dreambooth_nb.errors import ConfigError
from dreambooth_nb.model import KNOWN_MODELS
from dreambooth_nb.units import GIB
from dreambooth_nb.planning.planner import MemoryPlan, optimizer_state_bytes, plan
from dreambooth_nb.planning.trace import component_sizes, read_model_configs

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD21 = "stabilityai/stable-diffusion-2-1"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
# The `16gb` profile's savers, on a GPU.
SAVERS = dict(mixed_precision="fp16", use_8bit_adam=True, gradient_checkpointing=True, cache_latents=True)


def sd15(**overrides) -> TrainConfig:
    values = dict(pretrained_model_name_or_path=SD15, resolution=512, **SAVERS)
    return preset(**{**values, **overrides})


# --- Parameter counts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, expected", [
    (SD15, {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}),
    (SD21, {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863}),
    (SDXL, {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
            "vae": 83_653_863}),
])
def test_parameter_counts_from_shipped_configs(model, expected):
    assert component_sizes(read_model_configs(model)) == expected


def test_known_models_hold_configs_only():
    for index in KNOWN_MODELS.rglob("model_index.json"):
        folder = index.parent
        assert (folder / "scheduler" / "scheduler_config.json").is_file()
        for name, entry in json.loads(index.read_text()).items():
            if name in ("unet", "vae", "text_encoder", "text_encoder_2"):
                assert (folder / name / "config.json").is_file(), (folder, name)
    assert {p.suffix for p in KNOWN_MODELS.rglob("*") if p.is_file()} == {".json"}


def test_local_folder_and_errors(tiny_model, tmp_path):
    assert read_model_configs(str(tiny_model)).components["unet"]["block_out_channels"] == [16, 32]
    with pytest.raises(ConfigError, match="pretrained_model_name_or_path.*model_index.json"):
        read_model_configs(str(tmp_path))
    with pytest.raises(ConfigError, match="pretrained_model_name_or_path.*Hub"):
        read_model_configs("nobody/no-such-model")  # the tests run with HF_HUB_OFFLINE=1
    with pytest.raises(ConfigError, match="gpu: 'V100' is unknown"):
        plan(sd15(), gpu="V100")


# --- The published T4 table ---------------------------------------------------------------------------------
# ShivamShrirao/diffusers, examples/dreambooth/README.md: "GB VRAM usage" per option on a Tesla T4, SD 1.4
# (the same UNet as 1.5), 512 px, with xformers, latents cached. GB, not GiB: the 32-bit Adam row reads 15.79.
T4_TABLE = [  # (mixed precision, batch, accumulation, checkpointing, 8-bit Adam, GB, tolerance)
    ("fp16", 1, 1, True, True, 9.92, 0.15),
    ("no", 1, 1, True, True, 10.08, 0.20),
    ("fp16", 2, 1, True, True, 10.4, 0.20),
    ("fp16", 1, 1, False, True, 11.17, 0.20),
    ("no", 1, 1, False, True, 11.17, 0.20),
    ("fp16", 1, 2, True, True, 11.56, 0.20),
    ("fp16", 2, 1, False, True, 13.67, 0.20),
    ("fp16", 1, 2, False, True, 13.7, 0.20),
    ("fp16", 1, 1, True, False, 15.79, 0.20),
]


@pytest.mark.parametrize("precision, batch, accumulation, checkpointing, eight_bit, published, tolerance", T4_TABLE)
def test_published_t4_table(precision, batch, accumulation, checkpointing, eight_bit, published, tolerance,
                            monkeypatch):
    """The plan of the code that was measured: that script keeps torch's autocast weight cache (ours turns it
    off, see `planner.AUTOCAST_WEIGHT_CACHE`), and its torch 1.12 AdamW stepped one tensor at a time (as our
    fused AdamW does: no step temporaries)."""
    import dreambooth_nb.planning.planner as planner

    monkeypatch.setattr(planner, "AUTOCAST_WEIGHT_CACHE", True)
    config = sd15(mixed_precision=precision, train_batch_size=batch, gradient_accumulation_steps=accumulation,
                  gradient_checkpointing=checkpointing, use_8bit_adam=eight_bit)
    result = plan(config, gpu="T4")
    assert result.fits
    assert abs(result.gpu_peak_bytes / 1e9 / published - 1) <= tolerance
    assert sum(result.gpu_breakdown.values()) == result.gpu_peak_bytes
    assert result.gpu_allocated_bytes < result.gpu_required_bytes <= result.gpu_peak_bytes


# --- Monotonicity -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("saver, on, off", [
    ("gradient checkpointing", {}, dict(gradient_checkpointing=False)),
    ("8-bit Adam", {}, dict(use_8bit_adam=False)),
    ("cached latents", {}, dict(cache_latents=False)),
    ("offloaded EMA", dict(use_ema=True, offload_ema=True), dict(use_ema=True)),
    ("frozen text encoder", {}, dict(train_text_encoder=True)),
    ("mixed precision", {}, dict(mixed_precision="no")),
    ("accumulation, without checkpointing", dict(gradient_checkpointing=False, gradient_accumulation_steps=4),
     dict(gradient_checkpointing=False, train_batch_size=4)),
])
def test_each_saver_lowers_the_plan(saver, on, off):
    assert plan(sd15(**on), gpu="T4").gpu_required_bytes < plan(sd15(**off), gpu="T4").gpu_required_bytes


def test_accumulation_costs_memory_when_checkpointing_is_on():
    """Accumulated gradients stay alive through the next forward pass, beside autocast's fp16 weight copies
    (3.2 + 1.6 GiB for SD 1.5); checkpointed activations are 0.2 GiB a sample. So batch 2 needs less than
    batch 1 × 2 (the published table agrees: 10.4 vs 11.56 GB)."""
    assert plan(sd15(train_batch_size=2), gpu="T4").gpu_required_bytes < \
        plan(sd15(gradient_accumulation_steps=2), gpu="T4").gpu_required_bytes


@pytest.mark.parametrize("change", [dict(train_batch_size=2), dict(resolution=640)])
def test_batch_and_resolution_raise_the_plan(change):
    assert plan(sd15(**change), gpu="T4").gpu_required_bytes > plan(sd15(), gpu="T4").gpu_required_bytes


def test_8_bit_adam_arithmetic():
    # bitsandbytes: two uint8 moments + two float32 absmax per 256 elements; small tensors stay 32-bit.
    assert optimizer_state_bytes([256 * 1024], eight_bit=True) == 2 * 256 * 1024 + 2 * 4096
    assert optimizer_state_bytes([4095], eight_bit=True) == optimizer_state_bytes([4095], eight_bit=False)
    assert optimizer_state_bytes([1024], eight_bit=False) == 8 * 1024


# --- Verdict, advice, display -------------------------------------------------------------------------------
def test_verdict_and_cheapest_advice():
    """Nothing on: the ladder climbs to 8-bit Adam, and checkpointing is dropped again since 8-bit Adam
    alone fits; on an A100 the same run fits as it is."""
    bare = sd15(mixed_precision="no", use_8bit_adam=False, gradient_checkpointing=False, cache_latents=False)
    result = plan(bare, gpu="T4")
    assert not result.fits and result.headroom_bytes < 0
    assert result.advised_changes == {"use_8bit_adam": True}
    assert plan(replace(bare, **result.advised_changes), gpu="T4").fits
    assert plan(bare, gpu="A100-40GB").fits and plan(bare, gpu="A100-40GB").advice == []
    assert plan(bare, gpu=40).gpu_total_bytes == 40 * GIB
    assert not plan(sd15(), gpu=8).fits  # the full UNet's weights, gradients and state alone need 8 GiB


def test_advice_when_nothing_fits():
    result = plan(sd15(), gpu=1)  # even a LoRA's fp16 base UNet needs 1.6 GiB
    assert not result.fits and result.advised_changes == {}
    assert "even with every saver on" in result.advice[-1]


def test_no_gpu_means_a_t4(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = plan(sd15())
    assert result.gpu == "T4" and "planned for a T4" in result.notes[0]


def test_repr_is_a_small_table():
    result = plan(sd15(), gpu="T4")
    text = repr(result)
    assert "fits" in text and "optimizer state" in text and "Host RAM" in text and len(text.splitlines()) < 30
    assert "<table>" in result._repr_html_() and isinstance(result, MemoryPlan)


def test_replanning_a_cached_setup_is_instant():
    plan(sd15(), gpu="T4")
    start = time.perf_counter()
    plan(sd15(learning_rate=1e-6, use_ema=True, max_train_steps=800), gpu="L4")
    assert time.perf_counter() - start < 1.0


def test_disk_is_the_disk_plan():
    config = sd15(train_text_encoder=True, snapshot_steps=[100, 200])
    sizes = component_sizes(read_model_configs(SD15))
    trained = sizes["unet"] + sizes["text_encoder"]
    expected = memory.disk_plan(config, sizes=memory.RunSizes(total=sum(sizes.values()), trained=trained)).peak_bytes
    assert plan(config, gpu="T4").disk_bytes == expected


def test_every_rung_of_the_ladder_names_its_settings():
    config = sd15(gradient_checkpointing=False, use_8bit_adam=False, cache_latents=False, use_ema=True,
                  train_batch_size=2, train_text_encoder=True)
    while (saver := memory.next_memory_saver(config)) is not None:
        assert saver.changes and str(saver).startswith(next(iter(saver.changes))), saver
        config = replace(config, **saver.changes)
    assert config.method == "lora" and config.learning_rate == 1e-4  # the last rung: a LoRA at its preset's rate
    assert config.train_batch_size == 1 and config.gradient_accumulation_steps == 2


# --- LoRA, SDXL, the goal cases -----------------------------------------------------------------------------
def test_lora_trains_only_the_adapters():
    result = plan(sd15(method="lora"), gpu="T4")
    assert result.trained_params == 797_184  # rank 4 on to_q, to_k, to_v, to_out.0: a 3.2 MB LoRA
    assert result.gpu_breakdown["frozen weights"] == pytest.approx(2 * 859_520_964, rel=0.01)  # fp16 base
    assert result.gpu_breakdown["autocast weight copies"] < 2**20


def test_sdxl_lora_fits_a_t4_with_the_savers():
    config = sd15(method="lora", pretrained_model_name_or_path=SDXL, resolution=1024)
    result = plan(config, gpu="T4")
    assert result.fits and result.gpu_peak_bytes < 14 * GIB


def test_early_stop_plans_the_snapshots_pipeline_beside_training():
    """stop_when="suggested" renders each snapshot while training holds its weights and optimizer state: for
    SDXL's LoRA that is the peak; on a 12 GiB card the run fits without it, not with the 16-bit pipeline beside
    it, and the advice turns early stop off."""
    config = sd15(method="lora", pretrained_model_name_or_path=SDXL, resolution=1024, variant="fp16")
    off, on = plan(config, gpu="T4"), plan(config.replace(stop_when="suggested"), gpu="T4")
    assert "snapshot's pipeline (measuring)" not in off.gpu_breakdown
    assert on.gpu_phase == "measuring a snapshot" and on.gpu_required_bytes > off.gpu_required_bytes
    pipeline = 2 * sum(component_sizes(read_model_configs(SDXL)).values())  # every part in 16 bits on a T4
    assert on.gpu_breakdown["snapshot's pipeline (measuring)"] == pipeline
    # Besides it, what training keeps between steps, and the render's activations (the decode at 1024 px).
    assert on.gpu_breakdown["frozen weights"] == off.gpu_breakdown["frozen weights"]
    assert on.gpu_breakdown["gradients"] == 0 and on.gpu_breakdown["activations and temporaries"] > 0
    # The pipeline passes through host RAM on its way to the GPU (from_pretrained, then .to("cuda")): more than
    # loading the base's largest part (its fp16 UNet, 5.1 GB).
    assert on.host_phase.startswith("training, loading a snapshot's pipeline")
    assert on.host_breakdown["snapshot's pipeline"] == pipeline
    small = plan(config.replace(stop_when="suggested"), gpu=12)
    assert plan(config, gpu=12).fits and not small.fits
    assert small.advice[0].startswith("stop_when='end'") and small.advised_changes == {"stop_when": "end"}
    # A CPU run's plan (tests, the toy model) leaves the renders out.
    assert "snapshot's pipeline" not in plan(sd15(stop_when="suggested"), gpu="cpu").host_breakdown


def test_the_goal_cases_fit_without_the_autocast_weight_cache(monkeypatch):
    """SD 1.5, prior preservation, batch 1 × 4, 16gb profile: UNet only ≤ 9.5 GiB and UNet + text encoder
    ≤ 11 GiB at the peak (allocated). With accumulation the gradients live through the forward; autocast's
    cache would add an fp16 copy of every weight beside them, which is why `train` turns it off."""
    import dreambooth_nb.planning.planner as planner

    goal = sd15(with_prior_preservation=True, class_prompt="a photo of a dog", class_data_dir="class",
                gradient_accumulation_steps=4)
    unet, both = plan(goal, gpu="T4"), plan(goal.replace(train_text_encoder=True), gpu="T4")
    assert unet.gpu_allocated_bytes <= 9.5 * GIB and both.gpu_allocated_bytes <= 11 * GIB
    assert unet.fits and both.fits
    monkeypatch.setattr(planner, "AUTOCAST_WEIGHT_CACHE", True)
    cached = plan(goal, gpu="T4")
    assert cached.gpu_breakdown["autocast weight copies"] > 1.5 * GIB
    assert cached.gpu_allocated_bytes > unet.gpu_allocated_bytes + 1.2 * GIB


# --- Host RAM, measured ---------------------------------------------------------------------------------------
_MEASURE = r"""
import json, os, sys, tempfile
import torch
torch.set_num_threads(1)

def kib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

# VmHWM := VmRSS: the baseline is a process that imported torch, what the plan's LIBRARIES_BYTES starts from
# (the package, diffusers, transformers and accelerate are part of what is measured)
open("/proc/self/clear_refs", "w").write("5")
base = kib("VmRSS")
from dreambooth_nb import preset, train
with tempfile.TemporaryDirectory() as out:
    train(preset(output_dir=out, **json.loads(sys.argv[1])))
print("PEAK", (kib("VmHWM") - base) * 1024)
"""


def _measured_peak(settings: dict) -> int:
    proc = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(settings)], capture_output=True, text=True,
                          timeout=240)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("PEAK ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    return int(line.split()[1])


def _medium_pipeline(folder):
    """A 26 M-parameter UNet: big enough that weights, gradients and Adam outweigh the libraries."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from dreambooth_nb.toy.tiny import TINY_WORDS, build_text_encoder, build_tokenizer, build_unet, build_vae

    tokenizer = build_tokenizer(TINY_WORDS)
    pipe = StableDiffusionPipeline(vae=build_vae(), text_encoder=build_text_encoder(tokenizer), tokenizer=tokenizer,
                                   unet=build_unet(channels=(128, 256, 256), sample_size=32),
                                   scheduler=DDPMScheduler(beta_schedule="scaled_linear"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("model, resolution, options", [
    ("tiny", 32, {}),
    ("tiny", 32, dict(mixed_precision="bf16", gradient_checkpointing=True, train_text_encoder=True)),
    ("medium", 64, {}),
    ("medium", 64, dict(use_8bit_adam=True)),
])
def test_host_ram_of_a_cpu_run_matches_its_measured_peak(model, resolution, options, tiny_model, photos,
                                                          tmp_path_factory):
    folder = tiny_model if model == "tiny" else tmp_path_factory.getbasetemp() / "medium-model"
    if model == "medium" and not (folder / "model_index.json").is_file():
        _medium_pipeline(folder)
    settings = dict(pretrained_model_name_or_path=str(folder), instance_data_dir=str(photos),
                    instance_prompt="a photo of sks dog", resolution=resolution, max_train_steps=3, checkpointing_steps=2, learning_rate=1e-4, **options)
    planned = plan(preset(output_dir=str(tmp_path_factory.mktemp("out")), **settings), gpu="cpu")
    measured = _measured_peak(settings)
    assert abs(planned.host_peak_bytes / measured - 1) <= 0.25, (planned, measured)


# --- Several GPUs: DDP's gradient buckets --------------------------------------------------------------------
def test_ddp_buckets_cost_a_gradient_copy_unless_they_are_views(monkeypatch):
    """Each process of a data-parallel run holds DDP's all-reduce buckets, one fp32 slot per trained weight,
    for the whole run. As copies (DDP's default) they are a second gradient (+3.2 GiB for SD 1.5's UNet) at
    the end of the backward; as views (what training asks for) the gradients live in them. Views cost nothing
    where the gradients are alive anyway at the peak (checkpointing on: the peak is at the end of the
    backward; or accumulation: they are always alive) — there two processes plan as one. Where the peak is
    the end of the forward (checkpointing off), the buckets are memory a single process would not hold yet:
    views or copies, a gradient's worth more."""
    import dreambooth_nb.planning.planner as planner_module

    config = preset("object", "16gb", instance_data_dir="p", instance_prompt="a photo of sks mug", resolution=512)

    def allocated(views: bool, **changes) -> tuple[int, int]:
        monkeypatch.setattr(planner_module, "DDP_BUCKET_VIEWS", views)
        one = dataclasses.replace(config, **changes)
        return (plan(one, "T4").gpu_allocated_bytes,
                plan(dataclasses.replace(one, num_processes=2), "T4").gpu_allocated_bytes)

    grads = 4 * plan(config, "T4").trained_params
    checkpointed = dict(gradient_checkpointing=True, train_batch_size=1, gradient_accumulation_steps=1)
    one, copies = allocated(False, **checkpointed)
    assert copies - one >= grads
    one, views = allocated(True, **checkpointed)
    assert 0 <= views - one < grads / 4
    one, views = allocated(True, gradient_checkpointing=True)  # the 16gb profile: 1 × 4 accumulated
    assert views == one
    one, views = allocated(True, gradient_checkpointing=False, train_batch_size=2, gradient_accumulation_steps=1)
    assert views - one >= 0.9 * grads
    assert allocated(False, gradient_checkpointing=False, train_batch_size=2, gradient_accumulation_steps=1)[1] >= views
