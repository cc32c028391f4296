"""Train on one fixed batch and watch the loss: the tests that a family's objective and conditioning let its
denoiser learn (a loss that halves over forty steps, say) all run this."""

from __future__ import annotations

import torch

from dreambooth_nb.training.data import TrainingData
from dreambooth_nb.training.prompts import Prompts
from dreambooth_nb.training.train import compute_loss

CPU = torch.device("cpu")


def losses_on_one_batch(config, parts, optimizer, *, steps: int = 40, draw=None) -> list[float]:
    """The loss at each of `steps` optimizer steps on the first batch of `config`'s photos (latents encoded once,
    the first subject's prompt encoded once), on CPU. `draw`: the batch's timestep draw (default: the family's
    objective on the training scheduler)."""
    data = TrainingData.load(config)
    data.encode(vae=parts.vae, config=config.replace(cache_latents=True), device=CPU, dtype=torch.float32)
    batch = data.batch(0, config=config,
                       draw=draw or (lambda gen: parts.family.objective.draw(gen, parts.noise_scheduler)))
    prompts = Prompts([config.concepts[0].instance_prompt], family=parts.family, tokenizers=parts.tokenizers)
    prompts.encode_once(parts.text_encoders, device=CPU)
    losses = []
    for _ in range(steps):
        loss = compute_loss(batch, denoiser=parts.denoiser, family=parts.family, prompts=prompts, encoders=None,
                            scheduler=parts.noise_scheduler, config=config, device=CPU)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
