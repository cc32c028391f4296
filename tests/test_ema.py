"""The EMA of the trained weights, kept on the training device or offloaded to one host buffer."""

from __future__ import annotations

import torch

from dreambooth_nb import TrainConfig
from dreambooth_nb.training.ema import HostBuffer, make_ema, step_ema


def _module(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    module[0].bias.requires_grad_(False)  # a frozen tensor is not followed
    return module


def test_the_offloaded_ema_lives_in_one_buffer_that_every_update_comes_back_to():
    """One flat host buffer holds every averaged tensor (allocated once: no new host memory per step, which
    PyTorch's pinned-memory cache would round up to powers of two), and it averages as the EMA on the device
    does, bit for bit."""
    device = torch.device("cpu")
    offloaded_module, resident_module = _module(), _module()
    offloaded = make_ema(offloaded_module, config=TrainConfig(use_ema=True, offload_ema=True), device=device)
    resident = make_ema(resident_module, config=TrainConfig(use_ema=True), device=device)
    buffer = offloaded.host_buffer
    assert isinstance(buffer, HostBuffer) and buffer.nbytes == 4 * sum(
        p.numel() for p in offloaded_module.parameters() if p.requires_grad)
    start, end = buffer.flat.data_ptr(), buffer.flat.data_ptr() + buffer.nbytes
    pointers = [t.data_ptr() for t in offloaded.shadow_params]
    assert all(start <= p < end for p in pointers)
    for step in range(5):
        for module in (offloaded_module, resident_module):
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(0.1 * (step + 1))
            step_ema(offloaded if module is offloaded_module else resident, module,
                     config=TrainConfig(use_ema=True, offload_ema=module is offloaded_module), device=device)
    assert [t.data_ptr() for t in offloaded.shadow_params] == pointers
    for a, b in zip(offloaded.shadow_params, resident.shadow_params):
        assert torch.equal(a, b)
    assert not torch.equal(offloaded.shadow_params[0], offloaded_module[0].weight.detach())  # (it averages)


def test_a_host_buffer_lays_its_tensors_back_to_back():
    buffer = HostBuffer([torch.Size([2, 3]), torch.Size([5]), torch.Size([])], pin=False)
    assert [t.shape for t in buffer.tensors] == [torch.Size([2, 3]), torch.Size([5]), torch.Size([])]
    assert buffer.flat.numel() == 12 and not buffer.pinned
    buffer.tensors[1].fill_(7.0)
    assert buffer.flat[6:11].eq(7.0).all()
