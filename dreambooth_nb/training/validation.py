"""A validation loss that means something: the same (image, noise, timestep) triples at every snapshot.

The training loss tracks whichever timestep each step drew, not how well the model does; these two numbers
are comparable across snapshots because nothing random changes between them:

    fit    the diffusion loss on your photos (each with its prompt; several subjects in turn): falls as the
           subject is learned, and keeps falling once the model starts to memorise them
    prior  the same on images of the class (class prompt): the class images of prior preservation, or, when
           it is off, a few renders of the class prompt by the base model made before training — it rises
           when training pulls the class towards the subject (language drift)

Each image is its VAE mean (no sampling), each pair's noise comes from its own generator seeded by (seed,
image, timestep), and the timesteps spread over the schedule (10 % to 90 % of the noise). Cheap: a few
dozen denoiser evaluations per snapshot, no image generation. The noise, the target and the call are the
family's (`Family.objective`, `Family.predict`), as in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)  # of the schedule, from nearly clean to nearly pure noise
MAX_IMAGES = 8  # per half: enough to average, few enough to stay cheap
REFERENCE_IMAGES = 4  # base-model renders of the class prompt when prior preservation is off


class Validation:
    """`pairs`: per half ("fit", "prior"), its (VAE mean latent, prompt id) pairs (`TrainingData.validation_pairs`)."""

    def __init__(self, *, pairs: dict[str, list[tuple[torch.Tensor, int]]], prompts, family, scheduler, seed: int,
                 resolution: int):
        self.prompts, self.family, self.scheduler, self.resolution = prompts, family, scheduler, resolution
        self.halves = {half: pairs[half][:MAX_IMAGES] for half in ("fit", "prior") if pairs.get(half)}
        self.timesteps = family.objective.at(FRACTIONS, scheduler)  # (indices into the schedule)
        self.seed = seed

    def _noise(self, half: str, image: int, latent: torch.Tensor) -> torch.Tensor:
        """One fixed noise per (image, timestep), the same at every snapshot and on resume."""
        gens = [torch.Generator().manual_seed(hash_seed(self.seed, half, image, int(t))) for t in self.timesteps]
        return torch.stack([torch.randn(latent.shape, generator=gen) for gen in gens])

    @torch.no_grad()
    def __call__(self, denoiser, *, encoders, device: torch.device, autocast) -> dict[str, float]:
        """The mean loss of each half for the current weights (`autocast`: the training's mixed precision)."""
        was_training = denoiser.training
        denoiser.eval()
        results = {}
        try:
            for half, pairs in self.halves.items():
                losses = []
                for index, (latent, prompt) in enumerate(pairs):
                    noise = self._noise(half, index, latent)
                    batch = {"prompt": torch.full((len(self.timesteps),), prompt),
                             "original_size": torch.tensor([[self.resolution, self.resolution]] * len(self.timesteps)),
                             "crop": torch.zeros(len(self.timesteps), 2, dtype=torch.long)}
                    x0 = latent.expand(len(self.timesteps), *latent.shape).to(device)
                    noisy, timesteps, target = self.family.objective.noisy_and_target(
                        self.scheduler, x0, noise.to(device), self.timesteps.to(device))
                    with autocast():
                        hidden, added = self.prompts.conditioning(batch, encoders=encoders, device=device,
                                                                  resolution=self.resolution)
                        prediction = self.family.predict(denoiser, noisy, timesteps, hidden, added)
                    losses.append(F.mse_loss(prediction.float(), target.float()).item())
                results[half] = sum(losses) / len(losses)
        finally:
            denoiser.train(was_training)
        return results


def hash_seed(*parts) -> int:
    """A generator seed from its parts, the same in every process and run (Python's `hash` is salted)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") % 2**63
