"""What a run writes, and where: the disk plan (Colab's Drive and its Trash), and saving without a second
copy of the model in host memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from dreambooth_nb import TrainConfig, preset
from dreambooth_nb.planning import memory
from dreambooth_nb import storage
from dreambooth_nb.planning.memory import RunSizes, disk_plan

# SD 1.5's parameter counts (its UNet, CLIP text encoder and VAE).
UNET = 859_520_964  # SD 1.5's, what full fine-tuning trains
SD15 = RunSizes(total=UNET + 123_060_480 + 83_653_863, trained=UNET)
GB = 10**9
FREE_DRIVE = 15 * GB  # a free Google Drive, empty


def colab_default(kind: str, **changes) -> TrainConfig:
    """The default Colab run: the preset with the 16gb profile, snapshots halfway (notebook 3's default)."""
    config = preset(kind, "16gb", instance_data_dir="photos", instance_prompt="a photo of sks dog",
                    class_prompt="a photo of a dog", class_data_dir="class",
                    output_dir="/content/drive/MyDrive/dreambooth/runs/x")
    config = config.replace(snapshot_steps=[config.max_train_steps // 2], mixed_precision="fp16")
    return config.replace(**changes)


@pytest.mark.parametrize("kind", ["object", "face"])
def test_the_default_colab_run_fits_a_free_drive_within_12_gb(kind):
    config = colab_default(kind)
    plan = disk_plan(config, sizes=SD15, free_bytes=FREE_DRIVE, trash_counts=True, missing_class_images=0)
    assert plan.fits and plan.peak_bytes <= 12 * GB, plan.summary()
    # One 5.18 GB state (fp32 UNet + 8-bit Adam), the halfway snapshot (fp16 UNet, 1.72 GB) and the final
    # complete fp16 pipeline (2.13 GB): states every 100 steps would write 3 (object) or 11 (face) states,
    # each kept in Drive's Trash after rotation.
    assert len(plan.state_steps) == 1
    state = memory.state_bytes(config, trained_params=UNET)
    assert state == pytest.approx(5.18 * GB, rel=0.01)
    assert plan.peak_bytes == state + UNET * 2 + SD15.total * 2


def test_on_a_disk_that_frees_space_states_come_every_100_steps():
    config = colab_default("object", output_dir="/tmp/run")
    plan = disk_plan(config, sizes=SD15, free_bytes=100 * GB, trash_counts=False, missing_class_images=0)
    assert plan.checkpointing_steps == 100 and plan.state_steps == [100, 200, 300]
    state = memory.state_bytes(config, trained_params=UNET)
    # the peak: at step 300 the new state exists beside the old one (until it is complete), with the
    # halfway snapshot; at the end one state, that snapshot and the complete final pipeline weigh less
    assert plan.peak_bytes == 2 * state + UNET * 2 > state + UNET * 2 + SD15.total * 2
    assert plan.trash_bytes == 2 * state


def test_on_drive_deleted_states_count_and_the_plan_says_so():
    config = colab_default("object", checkpointing_steps=100)
    plan = disk_plan(config, sizes=SD15, free_bytes=FREE_DRIVE, trash_counts=True, missing_class_images=0)
    state = memory.state_bytes(config, trained_params=UNET)
    assert plan.peak_bytes == 3 * state + UNET * 2 + SD15.total * 2  # all three stay in the quota
    assert not plan.fits
    refusal = plan.refusal()
    assert "empty the Trash" in refusal and "training state of step 300" in refusal
    assert "Google Drive's Trash" in disk_plan(colab_default("object"), sizes=SD15, free_bytes=100 * GB,
                                               trash_counts=True, missing_class_images=0).summary()


def test_no_room_for_any_state_still_trains_to_the_end_when_the_snapshots_fit():
    config = colab_default("object")
    plan = disk_plan(config, sizes=SD15, free_bytes=5 * GB, trash_counts=True, missing_class_images=0)
    assert plan.fits and plan.checkpointing_steps is None and plan.state_steps == []
    assert "a disconnect loses at most all the steps" in plan.summary()
    assert not disk_plan(config, sizes=SD15, free_bytes=3 * GB, trash_counts=True, missing_class_images=0).fits


def test_class_images_count_in_the_plan():
    config = colab_default("face")
    with_images = disk_plan(config, sizes=SD15, free_bytes=FREE_DRIVE, trash_counts=True, missing_class_images=200)
    without = disk_plan(config, sizes=SD15, free_bytes=FREE_DRIVE, trash_counts=True, missing_class_images=0)
    assert with_images.peak_bytes - without.peak_bytes == memory.class_image_bytes(config, missing=200)
    assert "200 class images" in with_images.refusal()


def test_resuming_plans_only_what_is_still_to_come():
    config = colab_default("face", checkpointing_steps=200, output_dir="/tmp/run")
    fresh = disk_plan(config, sizes=SD15, free_bytes=100 * GB, missing_class_images=0)
    later = disk_plan(config, sizes=SD15, free_bytes=100 * GB, start_step=800, missing_class_images=0)
    assert later.state_steps == [1000] and fresh.state_steps == [200, 400, 600, 800, 1000]
    assert later.peak_bytes < fresh.peak_bytes


def test_only_colab_drive_keeps_deleted_files(tmp_path):
    assert storage.deletes_go_to_trash("/content/drive/MyDrive/dreambooth/runs/a")
    assert not storage.deletes_go_to_trash(tmp_path)
    assert not storage.deletes_go_to_trash("/content/dreambooth")


def test_parameter_counts_come_from_the_configs_alone(tiny_model, make_config):
    from dreambooth_nb.model.loading import count_parameters, load_components, parameter_counts

    counts = parameter_counts(make_config(train_text_encoder=True))
    parts = load_components(make_config(), device=torch.device("cpu"), precision="no")
    sizes = {name: count_parameters(parts.part(name)) for name in ("unet", "vae", "text_encoder")}
    assert counts == {**sizes, "trained": sizes["unet"] + sizes["text_encoder"]}


# --- Host memory while saving -----------------------------------------------------------------------------
SAVE_PROBE = textwrap.dedent("""
    import json, re, sys, torch
    from pathlib import Path
    from dreambooth_nb import storage

    def kib(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    # ≈ 200 MB of fp32 weights in 50 tensors, like a model's state dict
    tensors = {f"layer{i}.weight": torch.randn(1000, 1000) for i in range(50)}
    results = {}
    for dtype in (None, torch.float16):
        out = Path(sys.argv[1]) / str(dtype)
        out.mkdir()
        open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
        before = kib("VmRSS")
        storage.save_weights(tensors, out, filename="unet.safetensors", dtype=dtype, max_shard_bytes=20 * 2**20)
        results[str(dtype)] = (kib("VmHWM") - before) * 1024
        assert sum(1 for _ in storage.load_weights(out, filename="unet.safetensors")) == 10
    print(json.dumps(results))
""")


def test_saving_weights_adds_at_most_a_shard_to_host_memory(tmp_path):
    """Measured in a fresh process: writing 200 MB of weights (as is, and converted to fp16) never holds
    more than about one 20 MB shard extra — not a second copy of the model (3.44 GB for SD 1.5's UNet on a
    12.7 GB Colab VM). The bound allows the shard's bytes twice over (tensor copy + serialised buffer)."""
    script = tmp_path / "probe.py"
    script.write_text(SAVE_PROBE)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    extra = json.loads(result.stdout.strip().splitlines()[-1])
    for dtype, added in extra.items():
        assert added < 2 * 20 * 2**20 + 16 * 2**20, f"{dtype}: saving added {added / 2**20:.0f} MiB to the peak"
