"""Nothing crashes: a full disk, a diverging loss, a GPU out of memory and a bad config each stop training
with a message that says what to do, before any work is lost; and nothing on disk can execute code."""

from __future__ import annotations

import gc
import importlib
import os
import json
import re
import weakref
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

import dreambooth_nb
from dreambooth_nb import ConfigError, TrainConfig, TrainingStopped, train
from dreambooth_nb.model import loading as models, snapshots
from dreambooth_nb import storage

train_module = importlib.import_module("dreambooth_nb.training.train")


def unet_calls(monkeypatch, *, fail_at: int | None = None, error=None, output=None):
    """Patch the UNet's forward: call number `fail_at` (1-based) raises `error` or returns `output(sample)`.
    Returns the list of UNet modules seen (as weak references) so tests can check they get freed."""
    real_forward = UNet2DConditionModel.forward
    seen = []

    def forward(self, *args, **kwargs):
        seen.append(weakref.ref(self))
        if len(seen) == fail_at:
            if error is not None:
                raise error
            result = real_forward(self, *args, **kwargs)
            return type(result)(sample=output(result.sample))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    return seen


def assert_freed(refs) -> None:
    """The models of a stopped run are garbage, even while the exception is still referenced (a notebook
    keeps the last one): else a rerun in the same kernel finds the GPU still full."""
    gc.collect()
    alive = {id(r()) for r in refs if r() is not None}
    assert not alive, "the stopped run's UNet is still alive"


# --- 5. Disk space ----------------------------------------------------------------------------------------
def test_not_enough_disk_stops_before_anything_is_loaded_with_the_plan(make_config, monkeypatch, tmp_path):
    """The disk check comes first: before the model is loaded, before class images are generated, and its
    message lists what would be written, with the free space."""
    config = make_config(max_train_steps=4, checkpointing_steps=2, snapshot_steps=[2], with_prior_preservation=True,
                         class_prompt="a photo of a dog", class_data_dir=str(tmp_path / "class"), num_class_images=3)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 1_234_567, 1_234_567))
    monkeypatch.setattr(train_module.loading, "load_components", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr("dreambooth_nb.training.priors.generate_class_images", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(TrainingStopped) as info:
        train(config)
    message = str(info.value)
    written = re.search(r"this run writes up to (\d+\.\d) MB and only 1\.2 MB are free", message)
    assert written and float(written.group(1)) > 1.2, message
    assert str(config.output_dir) in message
    for item in ("3 class images", "training state of step 2", "snapshot of step 2 (trained weights)",
                 "snapshot of step 4 (complete pipeline)"):
        assert item in message, item
    out = Path(config.output_dir)
    assert storage.list_states(out) == [] and storage.list_snapshots(out) == []


@pytest.mark.parametrize("fail_on", ["state", "snapshot", "history"])
def test_a_disk_filling_up_midway_stops_cleanly_and_resumes(make_config, tmp_path, monkeypatch, fail_on):
    """Drive quotas and shared disks fill up during a run: the save in progress is dropped whole, earlier
    ones stay, training stops with a message (not an OSError trace), and a rerun resumes exactly."""
    import errno

    config = make_config(max_train_steps=5, checkpointing_steps=2, snapshot_steps=[3])
    real_fsync, history_writes = os.fsync, []

    def fsync(fd):  # where a full disk (or a FUSE mount like Drive) reports it: writing the data out
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".tmp-history.json" in name:
            history_writes.append(name)
        if (fail_on == "state" and ".tmp-state-000004" in name) or \
                (fail_on == "snapshot" and ".tmp-step-000003" in name) or \
                (fail_on == "history" and len(history_writes) == 2 and ".tmp-history.json" in name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    with pytest.raises(TrainingStopped, match="No space left") as info:
        train(config)
    assert "resumes from the last complete state" in str(info.value)
    out = Path(config.output_dir)
    assert [p for p in out.rglob(".tmp-*")] == []
    assert storage.latest_state(out).name == ("state-000004" if fail_on == "history" else "state-000002")
    monkeypatch.undo()
    final = train(config)
    unbroken = train(config.replace(output_dir=str(tmp_path / "unbroken")))
    a, b = load_file(final / "unet" / "diffusion_pytorch_model.safetensors"), \
        load_file(unbroken / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert snapshots.is_snapshot(storage.snapshot_path(out, 3))


# --- 6. A diverging loss ----------------------------------------------------------------------------------
def test_nan_loss_stops_at_once_and_keeps_the_last_good_state(make_config, monkeypatch):
    config = make_config(max_train_steps=6, checkpointing_steps=2)
    seen = unet_calls(monkeypatch, fail_at=4, output=lambda sample: sample * float("nan"))
    steps = []
    with pytest.raises(TrainingStopped) as info:
        train(config, on_step=lambda step, loss, lr: steps.append(step))
    message = str(info.value)
    assert steps == [1, 2, 3] and len(seen) == 4  # stopped at once: no backward, no optimizer step
    assert "nan" in message and "step 4" in message and "learning_rate" in message
    assert "state-000002" in message
    state = storage.latest_state(config.output_dir)
    assert state.name == "state-000002"
    weights = load_file(state / "unet.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert_freed(seen)


def test_nan_gradients_with_a_finite_loss_never_reach_a_saved_state(make_config, monkeypatch):
    """A finite loss can still backpropagate NaN: those weights must not be saved as the 'good' state."""
    config = make_config(max_train_steps=6, checkpointing_steps=1, checkpoints_total_limit=1)

    def nan_gradient(sample):
        sample.register_hook(lambda grad: grad * float("nan"))
        return sample

    seen = unet_calls(monkeypatch, fail_at=3, output=nan_gradient)
    with pytest.raises(TrainingStopped) as info:
        train(config)
    message = str(info.value)
    assert "step 3" in message and "learning_rate" in message and "state-000002" in message, message
    state = storage.latest_state(config.output_dir)
    assert state.name == "state-000002"
    assert all(torch.isfinite(w).all() for w in load_file(state / "unet.safetensors").values())
    assert_freed(seen)


# --- 7. Out of GPU memory ---------------------------------------------------------------------------------
ALL_ON = dict(gradient_checkpointing=True, use_8bit_adam=True, cache_latents=True)
LADDER = [  # (settings when memory ran out, the saver the message must name next, that saver as settings)
    ({}, "gradient_checkpointing=True", dict(gradient_checkpointing=True)),
    (dict(gradient_checkpointing=True), "use_8bit_adam=True", dict(use_8bit_adam=True)),
    (dict(gradient_checkpointing=True, use_8bit_adam=True), "cache_latents=True", dict(cache_latents=True)),
    (dict(ALL_ON, use_ema=True), "offload_ema=True", dict(offload_ema=True)),
    (dict(ALL_ON, train_batch_size=2), "train_batch_size=1 with gradient_accumulation_steps=2",
     dict(train_batch_size=1, gradient_accumulation_steps=2)),
    (dict(ALL_ON, train_text_encoder=True), "train_text_encoder=False", dict(train_text_encoder=False)),
    (dict(ALL_ON), "method='lora'", None),  # a new run, not a resume: the message says so
    # (a 4-bit base loads on a CUDA GPU only: the advice is checked, not followed, here)
    (dict(ALL_ON, method="lora", learning_rate=1e-4), "load_in_4bit=True", None),
]


@pytest.mark.parametrize("settings,saver,fix", LADDER, ids=[s for _, s, _ in LADDER])
def test_out_of_memory_names_the_next_saver_and_the_advice_resumes(make_config, monkeypatch, capsys,
                                                                    settings, saver, fix):
    config = make_config(max_train_steps=3, checkpointing_steps=2, **settings)
    seen = unet_calls(monkeypatch, fail_at=3, error=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    with pytest.raises(TrainingStopped) as info:
        train(config)
    message = str(info.value)
    assert "ran out of memory" in message and "peak unknown" in message  # no CUDA here: no peak to measure
    if saver.startswith("method="):
        assert f"Train a LoRA instead: {saver}" in message and "new output_dir" in message
    else:
        assert f"Turn on {saver}" in message and "resumes from the last saved state" in message
    assert storage.latest_state(config.output_dir).name == "state-000002"
    assert_freed(seen)
    monkeypatch.undo()
    if fix is None:
        return
    capsys.readouterr()
    final = train(config.replace(**fix))  # the advice, followed, continues the same run
    printed = capsys.readouterr().out
    assert "Resuming from state-000002" in printed
    assert (final / "model_index.json").is_file()  # the final snapshot: a complete pipeline
    if fix == dict(use_8bit_adam=True):
        assert "The optimizer changed (AdamW → AdamW8bit)" in printed
    if fix == dict(train_text_encoder=False):  # the encoder keeps what it learned, frozen from then on
        learned = load_file(storage.state_path(config.output_dir, 2) / "text_encoder.safetensors")  # (one shard here)
        saved = load_file(final / "text_encoder" / "model.safetensors")
        base = load_file(Path(config.pretrained_model_name_or_path) / "text_encoder" / "model.safetensors")
        assert all(torch.equal(saved[k], learned[k]) for k in learned)
        assert not all(torch.equal(base[k], learned[k]) for k in learned)


def test_the_memory_savers_come_in_the_documented_order():
    from dreambooth_nb.planning.memory import next_memory_saver

    config = TrainConfig(train_batch_size=2, train_text_encoder=True, use_ema=True)
    order = []
    while (saver := next_memory_saver(config)) is not None:
        order.append(next(iter(saver.changes)))
        name = order[-1]
        config = config.replace(**({"train_batch_size": 1} if name == "train_batch_size" else
                                   {"method": "lora", "learning_rate": 1e-4} if name == "method" else
                                   {name: not getattr(config, name)}))
    assert order == ["gradient_checkpointing", "use_8bit_adam", "cache_latents", "offload_ema", "train_batch_size",
                     "train_text_encoder", "method", "load_in_4bit"]


def test_with_every_saver_on_the_advice_says_so():
    from dreambooth_nb.planning.memory import out_of_memory_advice

    config = TrainConfig(**ALL_ON, method="lora", learning_rate=1e-4, load_in_4bit=True)
    message = out_of_memory_advice(config, peak_bytes=None)
    assert "Every memory saver is already on; lower resolution" in message and "LoRA" not in message


@pytest.mark.parametrize("where,stage", [
    ("loading.load_components", "loading the model"),
    ("TrainingData.encode", "encoding the photos"),
    ("make_ema", "setting up the optimizer"),
    ("save_snapshot", "saving the snapshot of step 2"),
])
def test_out_of_memory_outside_the_step_gives_the_same_advice_and_frees_memory(make_config, monkeypatch, where,
                                                                               stage):
    """Loading, encoding, EMA, `prepare` and saving run out of memory too: the same one-line advice, saying
    where, and nothing of the run left alive (the advised rerun starts from an empty GPU)."""
    seen = unet_calls(monkeypatch)
    target = train_module
    *path, name = where.split(".")
    for part in path:
        target = getattr(target, part)
    real = getattr(target, name)

    def explode(*args, **kwargs):
        real(*args, **kwargs)  # (the work is done, its memory allocated, then it runs out)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(target, name, explode)
    with pytest.raises(TrainingStopped, match=f"ran out of memory while {stage}.*Turn on gradient_checkpointing"):
        train(make_config(max_train_steps=2, use_ema=True, cache_latents=True))
    assert_freed(seen)


def test_the_advice_says_when_8bit_adam_could_not_run(make_config, monkeypatch):
    """8-bit Adam on in the config but bitsandbytes failing: the advice must not claim it is on."""
    monkeypatch.setattr(models, "bitsandbytes_works", lambda device: (False, "RuntimeError: no kernel"))
    unet_calls(monkeypatch, fail_at=1, error=torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(TrainingStopped) as info:
        train(make_config(max_train_steps=2, **ALL_ON))
    message = str(info.value)
    assert "8-bit Adam could not run here (RuntimeError: no kernel), so 32-bit AdamW was used" in message
    assert "Every memory saver is already on" not in message


def test_a_finished_train_call_leaves_nothing_of_its_models(make_config, tmp_path, monkeypatch):
    """Two runs in one process (a sweep, a rerun), with mixed precision: when the first `train()` returns,
    its UNet is gone — no waiting for a later garbage collection (accelerate's wrapped forward points back
    at the model)."""
    seen = unet_calls(monkeypatch)
    train(make_config(max_train_steps=2, mixed_precision="bf16", use_8bit_adam=True,
                      output_dir=str(tmp_path / "first")))
    first = list(seen)
    assert first and all(ref() is None for ref in first), "the first run's UNet outlived train()"
    train(make_config(max_train_steps=2, mixed_precision="bf16", output_dir=str(tmp_path / "second")))
    assert len(seen) > len(first)


def test_an_interrupted_run_frees_its_models(make_config, monkeypatch):
    """Stopping a notebook cell (KeyboardInterrupt) must not keep the models alive in the traceback."""
    seen = unet_calls(monkeypatch)

    def stop(step, loss, lr):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:  # kept, as a notebook keeps the last exception
        train(make_config(max_train_steps=3), on_step=stop)
    assert seen and info.value is not None
    assert_freed(seen)


# --- 8. Config JSON ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("data,key", [
    ({"max_train_step": 400}, "max_train_step"),
    ({"learning_rate": 2e-6, "use_8bit_adm": True}, "use_8bit_adm"),
    ({"checkpoints_total_limit": "2"}, "checkpoints_total_limit"),
    ({"resume_from_checkpoint": 5}, "resume_from_checkpoint"),
    ({"gradient_accumulation_steps": True}, "gradient_accumulation_steps"),
    ({"snapshot_steps": 400}, "snapshot_steps"),
    ({"mixed_precision": None}, "mixed_precision"),
])
def test_config_json_rejects_unknown_keys_and_wrong_types_naming_the_key(tmp_path, data, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        TrainConfig.from_dict(data)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"format": storage.FORMAT, **data}))
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        TrainConfig.from_json(path)
    assert str(path) in str(info.value)


def test_a_run_refuses_a_config_json_with_a_typo_before_loading_anything(tmp_path, make_config, monkeypatch):
    data = json.loads(make_config().to_json())
    data["checkpointing_step"] = data.pop("checkpointing_steps")
    (tmp_path / "config.json").write_text(json.dumps(data))
    monkeypatch.setattr(train_module.loading, "load_components", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError, match="checkpointing_step"):
        train(TrainConfig.from_json(tmp_path / "config.json"))


# --- 9. Nothing on disk can execute code ------------------------------------------------------------------
def test_every_torch_load_in_the_package_is_weights_only():
    package = Path(dreambooth_nb.__file__).parent
    calls = []
    for source in sorted(package.rglob("*.py")):
        text = source.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):  # the call's text up to its closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            calls.append((source.name, text[match.start():end + 1]))
    assert calls, "no torch.load found: the check is looking in the wrong place"
    unsafe = [(name, call) for name, call in calls if not re.search(r"weights_only\s*=\s*True", call)]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    assert not [p for p in package.rglob("*.py") if re.search(r"\bpickle\.loads?\(", p.read_text())]


def test_states_are_safetensors_and_plain_tensors(make_config):
    config = make_config(max_train_steps=3, checkpointing_steps=2, use_ema=True, train_text_encoder=True)
    train(config)
    state = storage.latest_state(config.output_dir)
    assert load_file(state / "unet.safetensors") and load_file(state / "text_encoder.safetensors")
    assert load_file(state / "ema.safetensors") and json.loads((state / "ema.json").read_text())
    for name in ("optimizer.pt", "lr_scheduler.pt", "rng.pt"):
        torch.load(state / name, weights_only=True)  # loads without unpickling any code
    snapshot = storage.snapshot_path(config.output_dir, 3)
    assert sorted(p.name for p in snapshot.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".ckpt")) == []


def test_a_plan_that_does_not_fit_the_gpu_stops_before_any_download_unless_overridden(make_config, monkeypatch,
                                                                                       capsys):
    """On a GPU, `train` plans first (configs only) and refuses settings whose plan exceeds the card, with
    the plan and its advice; check_memory_plan=False trains anyway. (The plan's numbers: tests/test_plan.py.)"""
    from dreambooth_nb import plan as plan_function
    from dreambooth_nb.planning.planner import MemoryPlan

    too_big = plan_function(make_config(), gpu=0.001)  # a real plan, for a card of 1 MiB
    assert not too_big.fits and isinstance(too_big, MemoryPlan)
    monkeypatch.setattr(importlib.import_module("dreambooth_nb.planning.planner"), "plan", lambda config, gpu=None: too_big)
    with pytest.raises(TrainingStopped, match=r"(?s)will not fit this GPU.*check_memory_plan=False"):
        train_module._check_memory_plan(make_config(), progress=train_module.Progress())
    progress = train_module.Progress()
    train_module._check_memory_plan(make_config(check_memory_plan=False), progress=progress)
    assert progress.planned_gpu_bytes == too_big.gpu_allocated_bytes and "Memory plan:" in capsys.readouterr().out


def test_the_out_of_memory_message_compares_the_peak_with_the_plan():
    from dreambooth_nb.planning.memory import out_of_memory_advice

    message = out_of_memory_advice(TrainConfig(), peak_bytes=13 * 2**30, planned_bytes=9 * 2**30)
    assert "peak 13.0 GiB allocated; the memory plan expected 9.0 GiB at the peak" in message


# --- The GPU failing in other words ------------------------------------------------------------------------
@pytest.mark.parametrize("error,kind", [
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), "memory"),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), "memory"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "cuda"),
])
def test_cuda_errors_that_are_not_out_of_memory_errors_take_the_cleanup_path(make_config, monkeypatch, error,
                                                                             kind):
    """cuBLAS and cuDNN report running out near the limit as a plain RuntimeError; other CUDA errors too. Each
    ends with one message (the advice where memory ran out) and the run's models freed, not a traceback that
    keeps them on the GPU."""
    seen = unet_calls(monkeypatch, fail_at=2, error=error)
    with pytest.raises(TrainingStopped) as info:
        train(make_config(max_train_steps=3, **ALL_ON))
    message = str(info.value)
    if kind == "memory":
        assert "ran out of memory while training" in message
    else:
        assert "A CUDA error stopped training while training: CUDA error: an illegal memory access" in message
        assert "restart it" in message
    assert info.value.__cause__ is None and info.value.__traceback__ is not None
    assert_freed(seen)


def test_a_bug_keeps_its_traceback(make_config, monkeypatch):
    """A RuntimeError that is not the GPU's is a bug: it is raised as it is, not worded as advice."""
    unet_calls(monkeypatch, fail_at=1, error=RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        train(make_config(max_train_steps=2))


def test_8bit_adam_is_probed_before_the_memory_plan(make_config, monkeypatch, capsys):
    """Where bitsandbytes cannot run, 32-bit AdamW will (≈6 bytes more per parameter): that is what is planned,
    and the refusal says why."""
    from dreambooth_nb import plan

    monkeypatch.setattr(models, "bitsandbytes_works", lambda device: (False, "RuntimeError: no kernel"))
    config = make_config(use_8bit_adam=True)
    progress = train_module.Progress()
    train_module._check_memory(config, device=torch.device("cuda"), progress=progress)  # (plans; runs nothing)
    assert progress.planned_gpu_bytes == plan(config.replace(use_8bit_adam=False)).gpu_allocated_bytes
    assert progress.planned_gpu_bytes > plan(config).gpu_allocated_bytes
    assert "with 32-bit AdamW: 8-bit Adam cannot run here, RuntimeError: no kernel" in capsys.readouterr().out
    assert progress.optimizer == "RuntimeError: no kernel"
    monkeypatch.setattr(importlib.import_module("dreambooth_nb.planning.planner"), "plan",
                        lambda config, gpu=None: plan(config, gpu=0.001))
    with pytest.raises(TrainingStopped, match=r"8-bit Adam cannot run here \(RuntimeError: no kernel\), so 32-bit"):
        train_module._check_memory(config, device=torch.device("cuda"), progress=train_module.Progress())


@pytest.mark.parametrize("capability,arch_list,runs", [
    ((6, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"], False),  # Kaggle's P100
    ((7, 5), ["sm_75", "sm_80", "sm_86", "sm_90"], True),  # a T4
    ((8, 9), ["sm_75", "sm_80", "sm_86"], True),  # an L4 runs sm_86 code (same major, lower minor)
    ((12, 0), ["sm_80", "sm_90", "compute_90"], True),  # a newer GPU compiles the PTX
    ((7, 0), ["sm_75", "sm_80"], False),  # a V100 cannot run sm_75 code
])
def test_a_torch_without_kernels_for_the_gpu_is_said_in_one_line(capability, arch_list, runs):
    problem = models.unsupported_gpu(name="Tesla P100-PCIE-16GB", capability=capability, arch_list=arch_list,
                                     torch_version="2.9.0+cu128")
    assert (problem is None) == runs
    if not runs:
        assert "\n" not in problem and f"compute capability {capability[0]}.{capability[1]}" in problem
        assert "GPU T4 x2" in problem


def test_training_refuses_a_gpu_this_torch_cannot_drive(make_config, monkeypatch):
    monkeypatch.setattr(models, "gpu_problem", lambda: "This torch cannot run on the Tesla P100.")
    monkeypatch.setattr(train_module.loading, "load_components", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(TrainingStopped, match="cannot run on the Tesla P100"):
        train(make_config())


def test_the_setup_report_leads_with_a_gpu_torch_cannot_drive():
    from dreambooth_nb.notebook.platform import Environment

    env = Environment(platform="kaggle", device="cuda", gpu_name="Tesla P100-PCIE-16GB", torch_version="2.9.0",
                      problem="This torch (2.9.0) cannot run on the Tesla P100-PCIE-16GB (compute capability 6.0).")
    assert env.summary().splitlines()[0].startswith("This torch (2.9.0) cannot run on the Tesla P100")
