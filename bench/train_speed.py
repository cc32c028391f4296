"""Steps per second and peak memory of `dreambooth_nb.training.train` for each memory option, as ratios to a baseline.

    python bench/train_speed.py            # CPU: the tiny pipeline, 32 px (under 2 minutes)
    python bench/train_speed.py --cuda     # GPU: an SD 1.5-shaped random model at 512 px
    python bench/train_speed.py --cuda --sdxl   # GPU: an SDXL-shaped random model at 1024 px, LoRA
    python bench/train_speed.py --cuda --fit    # GPU: only the 16gb profile against `fit` for this GPU
    python bench/train_speed.py --processes 2 --resolution 128   # data-parallel: 2 processes × batch 1
                                # against 1 × batch 2 (CPU: gloo, one thread each; with --cuda: one GPU each)

With --cuda the table ends with the fixed 16gb profile at batch 4 (1 × 4 accumulated), full fine-tuning and
LoRA, each beside the same run with the savers `dreambooth_nb.fit` chooses for the GPU it runs on (the same
4 images per step): the fitted config's s/step beside the profile's.

Each option runs in its own subprocess (peak RSS only grows within a process); the table gives s/step,
peak memory (RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA) and both as ratios to the first row,
the baseline, measured by the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photo of sks dog"
CPU_OPTIONS = {
    "baseline (fp32, AdamW)": {},
    "8-bit AdamW": dict(use_8bit_adam=True),
    "gradient checkpointing": dict(gradient_checkpointing=True),
    "cached latents": dict(cache_latents=True),
    "bf16 autocast": dict(mixed_precision="bf16"),
    "all savers (16gb profile, bf16)": dict(use_8bit_adam=True, gradient_checkpointing=True, cache_latents=True,
                                            mixed_precision="bf16"),
    "all savers + text encoder": dict(use_8bit_adam=True, gradient_checkpointing=True, cache_latents=True,
                                      mixed_precision="bf16", train_text_encoder=True),
    "LoRA rank 4 (attention)": dict(method="lora"),
    "LoRA rank 4, all savers (bf16)": dict(method="lora", use_8bit_adam=True, gradient_checkpointing=True,
                                           cache_latents=True, mixed_precision="bf16"),
}
CUDA_OPTIONS = {
    "baseline (fp32, AdamW)": {},
    "fp16 autocast": dict(mixed_precision="fp16"),
    "fp16 + checkpointing": dict(mixed_precision="fp16", gradient_checkpointing=True),
    "fp16 + checkpointing + 8-bit AdamW": dict(mixed_precision="fp16", gradient_checkpointing=True, use_8bit_adam=True),
    "16gb profile (+ cached latents)": dict(mixed_precision="fp16", gradient_checkpointing=True,
                                            use_8bit_adam=True, cache_latents=True),
    "16gb profile + text encoder": dict(mixed_precision="fp16", gradient_checkpointing=True, use_8bit_adam=True,
                                        cache_latents=True, train_text_encoder=True),
    "16gb profile + text encoder, batch 4 (1 x 4 acc.)": dict(
        mixed_precision="fp16", gradient_checkpointing=True, use_8bit_adam=True, cache_latents=True,
        train_text_encoder=True, gradient_accumulation_steps=4),
    "LoRA rank 4, fp16 + cached latents": dict(method="lora", mixed_precision="fp16", cache_latents=True),
    "LoRA rank 4, 16gb profile": dict(method="lora", mixed_precision="fp16", gradient_checkpointing=True,
                                      use_8bit_adam=True, cache_latents=True),
    "LoRA rank 4, 16gb profile + text encoder": dict(method="lora", mixed_precision="fp16",
                                                     gradient_checkpointing=True, use_8bit_adam=True,
                                                     cache_latents=True, train_text_encoder=True),
}
SDXL_OPTIONS = {  # SDXL trains as a LoRA only (full fine-tuning does not fit 16 GB); the first row is the baseline
    "SDXL LoRA rank 4, fp16 + cached latents": dict(method="lora", mixed_precision="fp16", cache_latents=True),
    "SDXL LoRA rank 4, 16gb profile": dict(method="lora", mixed_precision="fp16", gradient_checkpointing=True,
                                           use_8bit_adam=True, cache_latents=True),
    "SDXL LoRA rank 4, 16gb profile + both text encoders": dict(
        method="lora", mixed_precision="fp16", gradient_checkpointing=True, use_8bit_adam=True, cache_latents=True,
        train_text_encoder=True),
}


# The fixed 16gb profile at the object preset's batch 4 (1 × 4 accumulated), to be compared with `fit`'s choice.
PROFILE_BATCH_4 = dict(mixed_precision="fp16", gradient_checkpointing=True, use_8bit_adam=True, cache_latents=True,
                       gradient_accumulation_steps=4)


def fitted_options(model: str, photos: str, resolution: int, methods=("full", "lora")) -> dict:
    """Rows for the 16gb profile (full fine-tuning and LoRA, batch 4) and the same runs fitted to this GPU."""
    from dreambooth_nb import fit_report, preset

    rows = {}
    for method in methods:
        profile = dict(PROFILE_BATCH_4, method=method)
        config = preset(pretrained_model_name_or_path=model, instance_data_dir=photos, instance_prompt=PROMPT,
                        resolution=resolution, learning_rate=1e-6, **profile)
        report = fit_report(config)
        fitted = {**profile, **{k: getattr(report.config, k) for k in ("gradient_checkpointing", "train_batch_size",
                                                                        "gradient_accumulation_steps", "use_8bit_adam",
                                                                        "cache_latents")}}
        label = "LoRA rank 4, " if method == "lora" else ""
        rows[f"{label}16gb profile, batch 1 x 4 acc."] = profile
        savers = (f"ckpt {'on' if fitted['gradient_checkpointing'] else 'off'}, batch {fitted['train_batch_size']} x "
                  f"{fitted['gradient_accumulation_steps']}, {'8' if fitted['use_8bit_adam'] else '32'}-bit Adam")
        rows[f"{label}fitted to {report.gpu}: {savers}"] = fitted
        print(report.headline(), flush=True)
    return rows


def run_one(model: str, photos: str, options: dict, *, steps: int, resolution: int) -> dict:
    """Train `steps` steps in this process and measure; called in a fresh subprocess per option."""
    import resource

    import torch

    from dreambooth_nb import preset, train

    cuda = torch.cuda.is_available()
    times = []
    options = dict(options)
    processes = options.pop("num_processes", 1)  # explicit: None would mean every visible GPU
    with tempfile.TemporaryDirectory() as out:
        config = preset(pretrained_model_name_or_path=model, instance_data_dir=photos, instance_prompt=PROMPT,
                        resolution=resolution, max_train_steps=steps, checkpointing_steps=10**6,
                        learning_rate=1e-6, output_dir=out, **options)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        train(config, num_processes=processes, on_step=lambda *_: times.append(time.perf_counter()))
    # The first steps include lazy initialisation: time the rest.
    warm = times[len(times) // 4:]
    result = {"s_per_step": (warm[-1] - warm[0]) / (len(warm) - 1),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if cuda:
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if processes > 1:  # the workers' memory is not this process's: not measured here
        result = {"s_per_step": result["s_per_step"], "peak_rss_mb": None, "peak_cuda_mb": None}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="SD 1.5-shaped model at 512 px on the GPU")
    parser.add_argument("--sdxl", action="store_true", help="with --cuda: an SDXL-shaped model at 1024 px, LoRA rows")
    parser.add_argument("--fit", nargs="?", const="full,lora", default=None, metavar="METHODS",
                        help="with --cuda: only the 16gb profile and fit's choice (for full,lora or one of them)")
    parser.add_argument("--processes", type=int, default=None, metavar="N",
                        help="only data-parallel speed: N processes × batch 1 against 1 process × batch N")
    parser.add_argument("--steps", type=int, default=None, help="steps per option (default 12 CPU, 8 CUDA)")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default 32 CPU, 512 / 1024 CUDA)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON of (model, photos, options, steps, res)
    args = parser.parse_args()
    args.cuda = args.cuda or args.sdxl
    if args.one:
        job = json.loads(args.one)
        print("RESULT " + json.dumps(run_one(job["model"], job["photos"], job["options"], steps=job["steps"],
                                             resolution=job["resolution"])))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from PIL import Image
    import numpy as np

    from dreambooth_nb.toy.tiny import build_sd15_shaped_pipeline, build_sdxl_shaped_pipeline, build_tiny_pipeline

    options = SDXL_OPTIONS if args.sdxl else CUDA_OPTIONS if args.cuda else CPU_OPTIONS
    steps = args.steps or (8 if args.cuda else 12)
    resolution = args.resolution or (1024 if args.sdxl else 512 if args.cuda else 32)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        photos = work / "photos"
        photos.mkdir()
        rng = np.random.RandomState(0)
        for i in range(4):
            Image.fromarray((rng.rand(resolution + 8, resolution, 3) * 255).astype("uint8")).save(photos / f"{i}.png")
        print("Building the model ...", flush=True)
        builder = build_sdxl_shaped_pipeline if args.sdxl else build_sd15_shaped_pipeline if args.cuda else \
            build_tiny_pipeline
        model = builder(work / "model")
        if args.cuda and not args.sdxl:  # the fixed profile beside the savers fit chooses for this GPU
            methods = tuple((args.fit or "full,lora").split(","))
            options = {**({} if args.fit else options), **fitted_options(str(model), str(photos), resolution, methods)}
        if args.processes:  # the same samples per step either way: one process with batch N, N with batch 1
            profile = dict(mixed_precision="fp16", cache_latents=True) if args.cuda else {}
            options = {f"1 process, batch {args.processes}": dict(profile, train_batch_size=args.processes),
                       f"{args.processes} processes x batch 1": dict(profile, num_processes=args.processes)}
        env = {**os.environ, "TQDM_DISABLE": "1"}
        if not args.cuda:
            env.setdefault("OMP_NUM_THREADS", "1")  # steadier numbers on a shared 2-core machine
        rows = []
        for name, opts in options.items():
            job = json.dumps({"model": str(model), "photos": str(photos), "options": opts, "steps": steps,
                              "resolution": resolution})
            proc = subprocess.run([sys.executable, __file__, "--one", job], capture_output=True, text=True, env=env)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"{name}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
                continue
            rows.append((name, json.loads(line[len("RESULT "):])))
            print(f"  done: {name}", flush=True)
    if not rows:
        sys.exit("every option failed")
    mem_key = "peak_cuda_mb" if args.cuda else "peak_rss_mb"
    base = rows[0][1]
    device = (f"CUDA, SDXL-shaped UNet at {resolution} px" if args.sdxl else f"CUDA, SD 1.5-shaped UNet at {resolution} px"
              if args.cuda else f"CPU, tiny pipeline at {resolution} px")
    print(f"\n{device}, batch 1 unless named, {steps} steps per option; ratios are to the first row")
    print(f"{'option':52s} {'s/step':>8s} {'ratio':>6s} {mem_key:>13s} {'ratio':>6s}")
    for name, r in rows:
        memory = (f"{r[mem_key]:13.0f} {r[mem_key] / base[mem_key]:6.2f}" if r.get(mem_key) is not None
                  else f"{'(in workers)':>13s} {'':>6s}")
        print(f"{name:52s} {r['s_per_step']:8.3f} {r['s_per_step'] / base['s_per_step']:6.2f} {memory}")
    if args.processes and len(rows) == 2:
        print(f"\nspeed-up of {args.processes} processes over 1 (same samples per step): "
              f"{rows[0][1]['s_per_step'] / rows[1][1]['s_per_step']:.2f}x")


if __name__ == "__main__":
    main()
