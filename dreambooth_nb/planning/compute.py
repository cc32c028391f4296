"""What measuring a snapshot costs against the training between two snapshots, in floating-point operations.

    share = measuring_share(config, images=8, inference_steps=50, guidance_scale=7.5)
    share.fraction      # ≈ 0.6 for the object preset on SD 1.5 with a snapshot every 100 steps
    print(share)        # the same, in words

`stop_when="suggested"` renders every snapshot it measures (`results.early_stop`): that is inference beside
training, and its price is what decides whether early stop is worth having on by default. Both sides are
counted on fake tensors from the model's configs (`trace.step_flops`, `trace.trace_render`): the matrix
products, convolutions and attention of a training micro-step (forward, backward, checkpointing's recompute)
and of a render's sampling steps and VAE decodes. At these sizes a GPU spends its time on exactly those, in
training and in inference alike (a 16-bit UNet at 512 px keeps a T4 busy either way), so the ratio of the
counts is the ratio of the times on any card, a T4 or an H100. Left out of both counts: loading the snapshot's
pipeline from disk and the judge's encoders (measuring: would make it dearer), the optimizer step and, with
`cache_latents=False`, the VAE encoding the photos each step (training: would make measuring relatively
cheaper; the presets and `fit` cache the latents). `bench/gpu_check.py` measures the times themselves where a
GPU is lent.
"""

from __future__ import annotations

from dataclasses import dataclass

from dreambooth_nb.planning import planner
from dreambooth_nb.planning.trace import (read_model_configs, render_passes, render_resolution, step_flops,
                                         trace_render)

ON_BY_DEFAULT_AT = 0.10
"""Early stop would be on by default where measuring a snapshot costs at most this share of the training
between two snapshots (the rule of the issue that asked for it); the README says where it stands."""


@dataclass(frozen=True)
class MeasuringShare:
    """FLOPs of measuring one snapshot and of the training steps between two snapshots (their mean interval)."""

    measure_flops: int
    train_flops: int
    interval: float
    images: int
    inference_steps: int

    @property
    def fraction(self) -> float:
        return self.measure_flops / self.train_flops

    def __str__(self) -> str:
        return (f"measuring a snapshot ({self.images} images × {self.inference_steps} sampling steps) costs "
                f"≈ {self.fraction:.0%} of the {self.interval:g} training steps between snapshots (by FLOPs)")


def snapshot_interval(config) -> float:
    """The mean number of optimizer steps between the snapshots a run saves (the last step is always one)."""
    saved = {s for s in config.snapshot_steps if 0 < s <= config.max_train_steps} | {config.max_train_steps}
    return config.max_train_steps / len(saved)


def measuring_share(config, *, images: int, inference_steps: int, guidance_scale: float,
                    resolution: int | None = None, gpu=None) -> MeasuringShare:
    """The FLOPs of rendering `images` images of `inference_steps` steps (as `EvalSpec` says: its prompts ×
    seeds, its steps, guidance and resolution) against those of training `config` between two snapshots,
    with the precision and batch it would have on `gpu` (see `planner.resolve_gpu`: None is the GPU here, a
    T4 where there is none)."""
    card, _ = planner.resolve_gpu(gpu)
    configs = read_model_configs(config.pretrained_model_name_or_path, revision=config.revision)
    setup = planner.setup_for(config, card)
    micro_step = step_flops(planner.trace_key(configs, setup))
    render = trace_render(configs, resolution=render_resolution(configs, resolution),
                          passes=render_passes(configs, guidance_scale))
    interval = snapshot_interval(config)
    return MeasuringShare(measure_flops=images * (inference_steps * render.step_flops + render.decode_flops),
                          train_flops=int(interval * setup.accumulation * micro_step), interval=interval,
                          images=images, inference_steps=inference_steps)
