"""The gradients the optimizer receives, step by step: for tests that compare two ways of training."""

from __future__ import annotations

import importlib

import torch


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that keeps a copy of the (clipped) gradient it applies at every optimizer step."""

    def __init__(self, groups):
        super().__init__(groups)
        self.applied: list[torch.Tensor] = []

    def step(self, closure=None):
        grads = [p.grad.flatten() for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.applied.append(torch.cat(grads).clone())
        return super().step(closure)


def gradients_of(config, monkeypatch) -> list[torch.Tensor]:
    """Train `config` with `RecordingSGD` in place of its optimizer; the gradient of every optimizer step."""
    train_module = importlib.import_module("dreambooth_nb.training.train")
    made = []

    def recording(groups, *, config, device):
        made.append(RecordingSGD(groups))
        return made[-1], None

    monkeypatch.setattr(train_module, "make_optimizer", recording)
    train_module.train(config)
    return made[-1].applied
