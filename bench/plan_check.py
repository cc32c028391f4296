"""The memory planner against the published T4 table, and what it says for the goal cases.

    python bench/plan_check.py          # CPU, offline, about a minute

Published: ShivamShrirao/diffusers, examples/dreambooth/README.md, the table of "GB VRAM usage" per option
on a Tesla T4 (SD 1.4, whose UNet is SD 1.5's; 512 px; 8-bit Adam unless said; xformers; latents cached).
The planner's `gpu_peak_bytes` is the comparable number (what the card shows: allocated, the caching
allocator's kept blocks, the CUDA context).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth_nb import TrainConfig, preset  # noqa: E402
import dreambooth_nb.planning.planner as planner  # noqa: E402
from dreambooth_nb.planning.planner import GIB, plan  # noqa: E402

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SAVERS = dict(mixed_precision="fp16", use_8bit_adam=True, gradient_checkpointing=True, cache_latents=True)
PUBLISHED = [  # (label, settings, GB)
    ("fp16, batch 1, checkpointing", {}, 9.92),
    ("fp32, batch 1, checkpointing", dict(mixed_precision="no"), 10.08),
    ("fp16, batch 2, checkpointing", dict(train_batch_size=2), 10.4),
    ("fp16, batch 1", dict(gradient_checkpointing=False), 11.17),
    ("fp32, batch 1", dict(gradient_checkpointing=False, mixed_precision="no"), 11.17),
    ("fp16, batch 1 × 2, checkpointing", dict(gradient_accumulation_steps=2), 11.56),
    ("fp16, batch 2", dict(train_batch_size=2, gradient_checkpointing=False), 13.67),
    ("fp16, batch 1 × 2", dict(gradient_accumulation_steps=2, gradient_checkpointing=False), 13.7),
    ("fp16, batch 1, checkpointing, 32-bit AdamW", dict(use_8bit_adam=False), 15.79),
]


def sd15(**settings) -> TrainConfig:
    return preset(**{"pretrained_model_name_or_path": SD15, "resolution": 512, **SAVERS, **settings})


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def main() -> None:
    start = time.perf_counter()
    print("SD 1.5, 512 px, on a T4: plan vs published (GB = 1e9 bytes). 'reference': the plan of the code that was"
          "\nmeasured (torch's autocast weight cache on); 'ours': this package, which turns that cache off.")
    print(f"{'option':44s} {'published':>9s} {'reference':>9s} {'error':>6s} {'ours':>6s} {'allocated':>9s}  verdict")
    for label, settings, published in PUBLISHED:
        planner.AUTOCAST_WEIGHT_CACHE = True
        reference = plan(sd15(**settings), gpu="T4", advise=False).gpu_peak_bytes / 1e9
        planner.AUTOCAST_WEIGHT_CACHE = False
        ours = plan(sd15(**settings), gpu="T4", advise=False)
        print(f"{label:44s} {published:9.2f} {reference:9.2f} {reference / published - 1:+6.0%} "
              f"{ours.gpu_peak_bytes / 1e9:6.2f} {ours.gpu_allocated_bytes / 1e9:9.2f}  "
              f"{'fits' if ours.fits else 'does not fit'} ({ours.gpu_phase})")
    print(f"(first plans included: {time.perf_counter() - start:.0f} s)\n")

    goal = dict(with_prior_preservation=True, class_prompt="a photo of a dog", class_data_dir="class-images",
                gradient_accumulation_steps=4)
    for label, config in [
        ("Goal: UNet only (≤ 9.5 GiB)", sd15(**goal)),
        ("Goal: UNet + text encoder (≤ 11 GiB)", sd15(**goal, train_text_encoder=True)),
        ("SDXL LoRA rank 4, 1024 px (< 14 GiB)", sd15(method="lora", pretrained_model_name_or_path=SDXL,
                                                      resolution=1024)),
    ]:
        result = plan(config, gpu="T4")
        print(f"{label}: allocated {gib(result.gpu_allocated_bytes)} GiB, needs {gib(result.gpu_required_bytes)}, "
              f"card shows {gib(result.gpu_peak_bytes)}")
        print(result, end="\n\n")


if __name__ == "__main__":
    main()
