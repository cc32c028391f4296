"""What early stop costs: measuring a snapshot against the training between two snapshots, for each preset.

    python bench/measuring_cost.py            # ≈ 5 min on 2 CPU cores (the fits trace their candidates); no weights, no GPU

For each preset as notebook 1 sets it on a T4 (the preset, the 16 GB profile, `fit(gpu="T4")`, a snapshot every
quarter as `stop_when="suggested"` saves them): the FLOPs of rendering one snapshot as notebook 4 and early
stop do (`EvalSpec.for_config`: 4 prompts × 2 seeds, 50 steps, the family's guidance) against those of the
training steps between two snapshots — the ratio is the share of time on any card where both keep it busy
(`planning.compute`) — and whether the run still fits a T4 with the snapshot's pipeline beside training (the
memory plan's "measuring a snapshot" phase; `fit` re-chosen for it). Early stop would be on by default at a
share ≤ 10 % (`compute.ON_BY_DEFAULT_AT`).
"""

from __future__ import annotations

import time

from dreambooth_nb import fit, preset
from dreambooth_nb.config import default_snapshot_steps
from dreambooth_nb.planning.compute import ON_BY_DEFAULT_AT
from dreambooth_nb.planning.planner import plan
from dreambooth_nb.results.early_stop import measuring_share
from dreambooth_nb.results.evaluate import EvalSpec
from dreambooth_nb.units import gib

CASES = {  # (preset names, subject)
    "SD 1.5 full, object": (("object",), "mug"),
    "SD 1.5 full, face (prior)": (("face",), "person"),
    "SD 1.5 LoRA, object": (("object", "lora"), "mug"),
    "SDXL LoRA, object": (("object", "sdxl"), "mug"),
    "SD 3.5 Medium LoRA, object": (("object", "sd3"), "mug"),
    "FLUX.1-dev QLoRA, object": (("object", "flux"), "mug"),
}


def main() -> None:
    started = time.monotonic()
    print("| preset (fit to a T4) | steps, snapshot every | batch | measuring a snapshot | share of the training "
          "between snapshots (FLOPs) | on by default (≤ 10 %) | fits a T4 while measuring |")
    print("|---|---|---|---|---|---|---|")
    for name, (names, noun) in CASES.items():
        config = preset(*names, "16gb", instance_data_dir="photos", instance_prompt=f"a photo of sks {noun}",
                        class_prompt=f"a photo of a {noun}")
        config = config.replace(snapshot_steps=default_snapshot_steps(config.max_train_steps, stop_when="suggested"))
        trained = fit(config, gpu="T4")
        spec = EvalSpec.for_config(trained)
        share = measuring_share(trained, spec, device="cuda")
        watched = fit(config.replace(stop_when="suggested"), gpu="T4")
        memory = plan(watched, gpu="T4", advise=False)
        fits = f"yes ({gib(memory.gpu_required_bytes)} GiB, {memory.gpu_phase})" if memory.fits else \
            f"no: {gib(memory.gpu_required_bytes)} GiB at {memory.gpu_phase}"
        if watched.load_in_4bit and not trained.load_in_4bit:
            fits += " with the base in 4 bits"
        print(f"| {name} | {trained.max_train_steps}, {share.interval:g} | {trained.train_batch_size} × "
              f"{trained.gradient_accumulation_steps}{' + prior' if trained.with_prior_preservation else ''} | "
              f"{share.images} images × {share.inference_steps} steps | {share.fraction:.0%} | "
              f"{'yes' if share.fraction <= ON_BY_DEFAULT_AT else 'no'} | {fits} |")
    print(f"\nTotal {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
