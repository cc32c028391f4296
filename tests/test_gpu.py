"""GPU-only paths, run for real when a CUDA device is present (the project's lent GPU machine).

On the CPU-only CI these are skipped: fp16 autocast, the CUDA memory report and xformers need a GPU.
`python bench/gpu_check.py` runs them (capped at a T4's 15 GiB) and measures the same paths at SD 1.5 size.
"""

import pytest
import torch
from safetensors.torch import load_file

import importlib

from dreambooth_nb import TrainingStopped, train
from dreambooth_nb.model.loading import bf16_supported, bitsandbytes_works, resolve_precision, xformers_works

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_fp16_training_keeps_fp32_masters_and_saves_fp16_snapshots(make_config):
    final = train(make_config(mixed_precision="fp16", train_text_encoder=True, max_train_steps=3,
                              use_8bit_adam=True, gradient_checkpointing=True))
    unet = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in unet.values()} == {torch.float16}
    assert all(torch.isfinite(t.float()).all() for t in unet.values())


@cuda
def test_bitsandbytes_runs_on_the_gpu():
    ok, why = bitsandbytes_works(torch.device("cuda"))
    assert ok, why


@cuda
def test_xformers_probe_answers_and_training_runs_either_way(make_config, capsys):
    ok, why = xformers_works(torch.device("cuda"))
    train(make_config(attention_backend="xformers", mixed_precision="fp16", max_train_steps=2))
    out = capsys.readouterr().out
    assert ("xformers attention" in out) if ok else ("using PyTorch SDPA instead" in out and "sdpa attention" in out)


@cuda
def test_out_of_memory_message_gives_the_measured_peak(make_config, monkeypatch):
    import importlib

    train_module = importlib.import_module("dreambooth_nb.training.train")
    real = train_module.compute_loss

    def explode(*args, **kwargs):
        real(*args, **kwargs)
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(train_module, "compute_loss", explode)
    with pytest.raises(TrainingStopped, match=r"peak \d+\.\d GiB allocated.*gradient_checkpointing=True"):
        train(make_config(mixed_precision="fp16", max_train_steps=2))


@cuda
@pytest.mark.parametrize("offload", [False, True])
def test_ema_resumes_on_the_gpu_and_offloaded(make_config, offload):
    """The EMA weights come back where they live (GPU, or host memory with offload_ema) after a resume."""
    config = make_config(mixed_precision="fp16", use_ema=True, offload_ema=offload, max_train_steps=2,
                         checkpointing_steps=1)
    train(config)
    final = train(config.replace(max_train_steps=4))  # resumes from the state of step 1... then 2, 3
    unet = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in unet.values())


@cuda
def test_a_frozen_text_encoder_leaves_the_gpu(make_config, monkeypatch):
    train_module = importlib.import_module("dreambooth_nb.training.train")
    real, where = train_module.compute_loss, []

    parts = []
    real_load = train_module.loading.load_components
    monkeypatch.setattr(train_module.loading, "load_components", lambda *a, **k: parts.append(real_load(*a, **k)) or parts[-1])

    def spy(batch, **kwargs):
        where.append((next(parts[0].text_encoder.parameters()).device.type,
                      next(parts[0].vae.parameters()).device.type))
        return real(batch, **kwargs)

    monkeypatch.setattr(train_module, "compute_loss", spy)
    train(make_config(mixed_precision="fp16", cache_latents=True, max_train_steps=2))
    assert where == [("cpu", "cpu")] * 2


@cuda
def test_bf16_counts_as_supported_only_where_it_is_native():
    device = torch.device("cuda")
    native = torch.cuda.get_device_capability(device)[0] >= 8
    assert bf16_supported(device) is native
    assert resolve_precision("auto", device) == ("bf16" if native else "fp16")


@cuda
def test_the_offloaded_ema_is_pinned_once_and_takes_no_pinned_memory_per_step():
    """The EMA's host copy is one buffer registered with CUDA once; the updates come back into it and take
    nothing from PyTorch's pinned-memory cache (which rounds each request up to a power of two and keeps it:
    ≈ 8 GB pinned for SD 1.5's 3.44 GB EMA when every step moved it back with `.to("cpu", non_blocking=True)`)."""
    from dreambooth_nb import TrainConfig
    from dreambooth_nb.training.ema import make_ema, step_ema

    device = torch.device("cuda")
    module = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 333)).to(device)
    config = TrainConfig(use_ema=True, offload_ema=True)
    ema = make_ema(module, config=config, device=device)
    assert ema.host_buffer.pinned and all(t.device.type == "cpu" for t in ema.shadow_params)
    step_ema(ema, module, config=config, device=device)
    cached = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    for _ in range(5):
        with torch.no_grad():
            module[0].weight.add_(1.0)
        step_ema(ema, module, config=config, device=device)
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == cached
    assert all(t.device.type == "cpu" for t in ema.shadow_params)
