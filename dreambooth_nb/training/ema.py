"""The exponential moving average of the denoiser's trained weights (`use_ema`), on the GPU or in host memory.

diffusers' `EMAModel` does the averaging. With `offload_ema` the average lives in host memory and visits the
GPU for each update, as diffusers' `--offload_ema` does, with one difference that matters on a 12.7 GB Colab
VM: the host copy is one buffer allocated and pinned once (`HostBuffer`), and every update comes back into
it. Moving the EMA back with `.to("cpu", non_blocking=True)` after each step, as `EMAModel.to` does, takes
new pinned memory every time from PyTorch's pinned-memory cache, which rounds every request up to a power of
two and keeps what it rounded: ≈ 8 GB pinned for SD 1.5's 3.44 GB average. The memory plan counts the one
buffer (`planner`: "EMA (offloaded)").
"""

from __future__ import annotations

import weakref

import torch


def trained_parameters(module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


def trained_names(module) -> list[str]:
    """The names of the parameters the EMA follows, in its order (see `make_ema`)."""
    return [name for name, p in module.named_parameters() if p.requires_grad]


class HostBuffer:
    """One flat fp32 buffer in host memory holding tensors of the given shapes back to back; pinned (page-locked,
    for asynchronous copies) where a GPU is present, by registering exactly its own bytes with CUDA — not through
    PyTorch's pinned-memory cache, which would round it up to a power of two (3.44 GB → 4 GiB)."""

    def __init__(self, shapes: list[torch.Size], *, pin: bool):
        sizes = [shape.numel() for shape in shapes]
        self.flat = torch.empty(sum(sizes), dtype=torch.float32)
        self.tensors = [view.view(shape) for view, shape in zip(self.flat.split(sizes), shapes)]
        self.pinned = False
        if pin and self.flat.numel():
            from torch.cuda import _pin_memory_utils  # (what torch's own checkpoint staging pins with)

            _pin_memory_utils.pin_memory(self.flat.data_ptr(), self.flat.numel() * self.flat.element_size())
            self.pinned = True
            # Unregistered when the buffer goes (with the EMA that holds it), before its memory is freed.
            weakref.finalize(self, _pin_memory_utils.unpin_memory, self.flat.data_ptr())

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


def make_ema(denoiser, *, config, device: torch.device):
    """The EMA of the denoiser's (the UNet's) trained weights (all of them, or its LoRA adapters), on the training device or
    (`offload_ema`) in one host buffer; None without `use_ema`."""
    if not config.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(trained_parameters(denoiser), decay=config.ema_decay)
    if config.offload_ema:
        buffer = HostBuffer([p.shape for p in ema.shadow_params], pin=device.type == "cuda")
        for host, start in zip(buffer.tensors, ema.shadow_params):
            host.copy_(start)
        ema.shadow_params = list(buffer.tensors)
        ema.host_buffer = buffer  # (lives as long as the EMA does)
    else:
        ema.to(device)
    return ema


@torch.no_grad()
def step_ema(ema, denoiser, *, config, device: torch.device) -> None:
    """One EMA update after an optimizer step. Offloaded on a GPU: the average goes to the GPU, is updated
    there, and is copied back into the same host buffer (the copies overlap nothing else; a step later reads
    that buffer only after they finished, as the wait at the end makes sure)."""
    params = trained_parameters(denoiser)
    if not (config.offload_ema and device.type == "cuda"):
        ema.step(params)  # where it lives: the GPU, or host memory on a CPU run
        return
    host = ema.shadow_params
    ema.shadow_params = [tensor.to(device, non_blocking=True) for tensor in host]
    try:
        ema.step(params)
        for target, updated in zip(host, ema.shadow_params):
            target.copy_(updated, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()  # the host copies are complete before anyone reads them
    finally:
        ema.shadow_params = host
