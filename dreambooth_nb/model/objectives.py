"""What a model family learns to predict: the noise a sample gets at a point of its schedule, and the target.

Two objectives cover the families this suite trains:

- `Diffusion` (Stable Diffusion 1.x/2.x, SDXL): a DDPM schedule, `x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε`; the model
  predicts ε, or v where the scheduler says `v_prediction` (SD 2.x 768); min-SNR-γ weighting optional.
- `Flow` (Stable Diffusion 3.x, FLUX.1): rectified flow, `x_t = (1 − σ)·x_0 + σ·ε`; the model predicts the
  velocity `ε − x_0`; σ is drawn logit-normal (the SD3 paper's choice, and diffusers' default in its SD3 and
  Flux Dreambooth scripts), on the scheduler's own shifted sigmas.

A sample's point on the schedule is an *index* into the training scheduler's timesteps, drawn from that sample's
own generator (`training.data`): for a DDPM schedule index and timestep are the same number; a flow schedule
maps the index to its timestep and σ. Training, the validation loss and the memory trace all ask the family's
objective, so none of them knows which one it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreambooth_nb.errors import ConfigError

SAMPLERS = ("ddim", "pndm", "dpm", "euler")
"""The inference samplers a comparison may name (`EvalSpec.scheduler`); a DDPM family has each, a flow its own
Euler sampler whatever the name (`Flow.sampler`)."""


@dataclass(frozen=True)
class Diffusion:
    """ε- or v-prediction on a DDPM schedule (the scheduler's `prediction_type` says which)."""

    scheduler_class: str = "DDPMScheduler"
    """The diffusers scheduler that adds noise in training, loaded from the base model's scheduler config."""
    choices: tuple = (("DDIM (recommended)", "ddim"), ("PNDM (SD 1.5's default)", "pndm"), ("DPM-Solver++", "dpm"),
                      ("Euler", "euler"))
    """The samplers a comparison panel offers, (label, `EvalSpec.scheduler` name), the default first."""

    def check(self, config) -> None:
        """Settings this objective cannot honour (none for diffusion)."""

    def draw(self, generator: torch.Generator, scheduler) -> torch.Tensor:
        """One sample's index into the schedule: uniform over the training timesteps."""
        return torch.randint(0, scheduler.config.num_train_timesteps, (), generator=generator)

    def at(self, fractions, scheduler) -> torch.Tensor:
        """Indices at these fractions of the schedule, from nearly clean (0) to nearly pure noise (1)."""
        steps = scheduler.config.num_train_timesteps
        return torch.tensor([int(f * steps) for f in fractions])

    def noisy_and_target(self, scheduler, latents, noise, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, the timesteps the model is given, the prediction's target)."""
        noisy = scheduler.add_noise(latents, noise, indices)
        if scheduler.config.prediction_type == "v_prediction":
            return noisy, indices, scheduler.get_velocity(latents, noise, indices)
        return noisy, indices, noise

    def sampler(self, name: str, config):
        """The inference sampler `name` ("ddim", "pndm", "dpm") from a pipeline's scheduler config: the same
        noise schedule, another solver (the study: DDIM or ~100 steps against noisy renders)."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

        if name == "ddim":
            return DDIMScheduler.from_config(config)
        if name == "pndm":
            return PNDMScheduler.from_config(config, skip_prk_steps=True)  # as Stable Diffusion ships it
        if name == "dpm":
            return DPMSolverMultistepScheduler.from_config(config)
        if name == "euler":
            return EulerDiscreteScheduler.from_config(config)
        raise ConfigError(f"EvalSpec.scheduler: {name!r} is unknown; choose one of {', '.join(SAMPLERS)}.")

    def weights(self, scheduler, indices, *, snr_gamma: float | None) -> torch.Tensor | None:
        """Per-sample loss weights, or None: min-SNR-γ (Hang et al. 2023) down-weights the easy, low-noise steps."""
        if snr_gamma is None:
            return None
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, indices)
        weights = torch.minimum(snr, torch.full_like(snr, snr_gamma))
        if scheduler.config.prediction_type == "v_prediction":
            return weights / (snr + 1)
        return weights / snr


@dataclass(frozen=True)
class Flow:
    """Rectified flow with logit-normal σ sampling (`logit_mean`, `logit_std`: diffusers' defaults, 0 and 1)."""

    scheduler_class: str = "FlowMatchEulerDiscreteScheduler"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    choices: tuple = (("Euler (flow matching: the model's own)", "euler"),)

    def check(self, config) -> None:
        if config.snr_gamma is not None:
            raise ConfigError("snr_gamma: min-SNR weighting is for ε/v-prediction models (SD 1.x/2.x, SDXL); this "
                              "model trains a flow (x_t = (1 − σ)·x_0 + σ·ε), where σ is already drawn logit-normal. "
                              "Set snr_gamma=None.")
        if config.offset_noise:
            raise ConfigError("offset_noise: offset noise shifts a DDPM model's mean brightness; a flow model's "
                              "noise is its target, so an offset would teach it a wrong velocity. Set offset_noise=0.")

    def draw(self, generator: torch.Generator, scheduler) -> torch.Tensor:
        steps = scheduler.config.num_train_timesteps
        u = torch.sigmoid(torch.randn((), generator=generator) * self.logit_std + self.logit_mean)
        return (u * steps).long().clamp(max=steps - 1)

    def at(self, fractions, scheduler) -> torch.Tensor:
        # The flow schedule runs from pure noise (index 0) to clean: fraction f of the noise is index (1 − f)·N.
        steps = scheduler.config.num_train_timesteps
        return torch.tensor([min(int((1 - f) * steps), steps - 1) for f in fractions])

    def noisy_and_target(self, scheduler, latents, noise, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        indices = indices.cpu()
        sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, *[1] * (latents.ndim - 1))
        noisy = (1 - sigmas) * latents + sigmas * noise
        return noisy, scheduler.timesteps[indices].to(latents.device), noise - latents

    def weights(self, scheduler, indices, *, snr_gamma: float | None) -> torch.Tensor | None:
        return None  # (σ is drawn by its weight already: logit-normal sampling *is* the weighting)

    def sampler(self, name: str, config):
        """A flow is sampled with its own Euler solver whatever `name` says: DDIM, PNDM and DPM++ as built here
        assume a DDPM schedule and would draw noise from a flow model (the study's DDIM advice is for those)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(config)
