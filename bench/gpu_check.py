"""The GPU check: the one script to run on a lent GPU machine, ≤ 8 minutes, capped at a T4's 15 GiB.

    python bench/gpu_check.py            # prints a table; with $OUT set, also writes $OUT/gpu_check.json
    python bench/gpu_check.py --skip-tests --cases "16gb, UNet;fit(gpu='T4'): checkpointing off"   # a short lease
    python bench/gpu_check.py --skip-tests --cases "FLUX.1-dev QLoRA, 512 px, fit;SD3.5 Medium LoRA, 1024 px, 16gb"
    python bench/gpu_check.py --skip-tests --cases "fit + each snapshot measured (stop_when='suggested')"

The last line is the one for a lease of about 8 minutes: both full-size models built and saved, then both
cases (≈ 6 minutes on an H100 by estimate, not yet measured; the build times are printed). All the cases
together take longer.

1. `pytest tests/test_gpu.py` (fp16 masters, 8-bit Adam and xformers on CUDA, EMA on the GPU and offloaded
   and pinned once, resume, frozen parts off the GPU), under the same 15 GiB cap.
2. An SD 1.5-shaped random model (shapes, hence memory and FLOPs, of the real one; its weights cannot be
   downloaded there) trained at 512 px — and an SDXL-shaped one at 1024 px with a LoRA and a stand-in for the
   fp16-fix VAE — for 30 steps per case, each case in a fresh process so that its peak is its own: the
   `16gb` profile UNet only and with the text encoder, what `fit(gpu="T4")` picks for the object preset
   (checkpointing off, batch 4: the fast path), LoRA in fp16, EMA offloaded with a resume in the same
   process, and two runs in a row in one process (the second must start from an empty GPU). For each: the
   peak `torch.cuda.max_memory_allocated` and `max_memory_reserved` beside the memory plan
   (`dreambooth_nb.plan`: its allocated peak and what it requires with its fragmentation margin), s/step,
   and whether every loss stayed finite. The reserved/allocated ratios are what the plan's assumed 10 %
   fragmentation margin (`planner.FRAGMENTATION`) is to be replaced with.
3. SD 3.5 Medium and FLUX.1-dev at full size with random weights (`bench/full_size.py`: built on the GPU in
   fp16 from the shipped configs and saved, 16.3 and 33.7 GB, each only when a selected case needs it),
   fp16, for 10 optimizer steps each: SD 3.5 Medium's LoRA at 1024 px as preset("object", "sd3", "16gb")
   gives it (batch 1 × 4), and FLUX.1-dev's LoRA as `fit(gpu="T4")` fits preset("object", "flux", "16gb")
   (its 4-bit base: QLoRA), whose s per optimizer step the table sets beside the published T4 figure.
   Neither has a class prompt: rendering the base model's class images (the prior validation loss) would
   be a minute of inference at this size, and is not training.

The cap (`torch.cuda.set_per_process_memory_fraction`) makes any GPU behave like a T4 for memory: a case
that would not fit a T4 fails here with an out-of-memory error instead of passing on an 80 GB card. The JSON
is written after every case, so a lease that ends midway still brings back what was measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T4_GIB = 15.0
STEPS = 30
FULL_SIZE_STEPS = 10  # SD 3.5 Medium and FLUX.1-dev: 4 samples a step at full size, and their models to build
# The cases without presets (SD 1.5- and SDXL-shaped): 512 px unless they say, full fine-tuning's learning rate,
# a class prompt (the base model's renders of it, for the prior validation loss, take seconds at these sizes).
SHAPED_RUN = dict(resolution=512, learning_rate=1e-6, class_prompt="a photo of a dog", num_class_images=4)
PROFILE = dict(use_8bit_adam=True, gradient_checkpointing=True, mixed_precision="fp16", cache_latents=True)
FP16_FIX_VAE = "vae-fp16-fix"  # a folder beside the SDXL-shaped model's own parts
FIT = "fit(gpu='T4'): checkpointing off"
SD3 = "SD3.5 Medium LoRA, 1024 px, 16gb"
FLUX = "FLUX.1-dev QLoRA, 512 px, fit"
WATCHED = "fit + each snapshot measured (stop_when='suggested')"
WATCH_INTERVAL = 100
"""Steps between snapshots that early stop is costed against: 4 over the object preset's 400 steps (a suggestion
needs a later snapshot to be confirmed, so halfway-and-end is too few)."""
FLUX_PUBLISHED = ("published T4: ≈20 s/optimizer step at 512×768, batch 1 × 4, 8-bit Adam, cached latents and "
                  "embeddings (Hugging Face, 'Fine-tune FLUX.1-dev on consumer hardware with QLoRA', 2025-06-19)")
CASES = {
    "16gb, UNet": dict(PROFILE),
    "16gb, UNet + text encoder": dict(PROFILE, train_text_encoder=True),
    FIT: dict(PROFILE, train_batch_size=1, gradient_accumulation_steps=4, fit=True),  # the object preset's 4 per step
    # Issue 26: what measuring a snapshot beside training costs: its time against the FLOP count's prediction
    # (`planning.compute`), and its memory against the plan's "measuring a snapshot" phase. The judge is the tiny
    # random one (DINOv2 + CLIP cannot be downloaded there): the renders, the bulk of the cost, are the
    # comparison's own (EvalSpec.for_config).
    WATCHED: dict(PROFILE, train_batch_size=1, gradient_accumulation_steps=4, fit=True, watch=True,
                  stop_when="suggested"),
    "16gb + prior, batch 1 x 4 accumulated": dict(PROFILE, with_prior_preservation=True, gradient_accumulation_steps=4),
    "16gb + EMA offloaded, resumed": dict(PROFILE, use_ema=True, offload_ema=True),
    "two runs in one process": dict(PROFILE),
    "LoRA rank 4, 16gb": dict(PROFILE, method="lora"),
    "SDXL LoRA rank 4, 1024 px, 16gb": dict(PROFILE, method="lora", model="sdxl", resolution=1024, snr_gamma=5.0),
    # The presets' own settings (LoRA, resolution, LR, batch 1 × 4), in fp16 as on a T4 ("16gb" says "auto").
    SD3: dict(presets=("object", "sd3", "16gb"), model="sd3", mixed_precision="fp16", max_train_steps=FULL_SIZE_STEPS),
    FLUX: dict(presets=("object", "flux", "16gb"), model="flux", mixed_precision="fp16", fit=True,
               max_train_steps=FULL_SIZE_STEPS, published=FLUX_PUBLISHED),
}


def cap_memory() -> None:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, T4_GIB * 2**30 / total))


def run_case(name: str, model: str, photos: str, classes: str, out: str) -> dict:
    """One case in this (fresh) process, on the pipeline folder `model`; returns its measurements."""
    import torch

    from dreambooth_nb import preset, train

    cap_memory()
    options = dict(CASES[name])
    if options.pop("model", "sd15") == "sdxl":  # with a local stand-in for the fp16-fix VAE (the Hub is out of reach)
        options["vae_model_name_or_path"] = str(Path(model) / FP16_FIX_VAE)
    fitted, presets, published = options.pop("fit", False), options.pop("presets", ()), options.pop("published", None)
    watch = options.pop("watch", False)
    base = dict(pretrained_model_name_or_path=model, instance_data_dir=photos, instance_prompt="a photo of sks dog",
                max_train_steps=STEPS, checkpointing_steps=10**6, output_dir=out)
    if not presets:
        base.update(SHAPED_RUN, class_data_dir=classes)

    def config(**changes):
        return preset(*presets, **{**base, **options, **changes})

    losses, times = [], []

    def on_step(step, loss, lr):
        losses.append(loss)
        times.append(time.perf_counter())

    result = {"case": name}
    if fitted:
        from dreambooth_nb import fit

        chosen = fit(config(), gpu="T4")
        options.update({k: getattr(chosen, k) for k in ("gradient_checkpointing", "train_batch_size",
                                                        "gradient_accumulation_steps", "use_8bit_adam",
                                                        "load_in_4bit")})
        result["fitted"] = (f"checkpointing {'on' if chosen.gradient_checkpointing else 'off'}, batch "
                            f"{chosen.train_batch_size} x {chosen.gradient_accumulation_steps}, "
                            f"{'8' if chosen.use_8bit_adam else '32'}-bit Adam"
                            + (", 4-bit base" if chosen.load_in_4bit else ""))
    torch.cuda.reset_peak_memory_stats()
    if name.endswith("resumed"):
        train(config(max_train_steps=STEPS // 2, checkpointing_steps=STEPS // 2 - 1), on_step=on_step)
        train(config(), on_step=on_step)  # resumes from the state of step 14
    elif name == "two runs in one process":
        train(config(output_dir=out + "-first"), on_step=on_step)
        result["allocated_between_runs_mib"] = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        times.clear()
        train(config(), on_step=on_step)
    elif watch:
        result.update(watched(config(snapshot_steps=[STEPS // 3, 2 * STEPS // 3]), on_step=on_step))
    else:
        train(config(), on_step=on_step)
    from dreambooth_nb import plan

    warm = times[len(times) // 4:-1]  # (the last step's time holds the validation loss and the final save)
    final = config()
    planned = plan(final, gpu="T4", advise=False)
    result.update(planned_gib=planned.gpu_allocated_bytes / 2**30,
                  planned_required_gib=planned.gpu_required_bytes / 2**30,
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                  reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                  # (`on_step`: once per optimizer step; the median leaves out the steps a snapshot was measured at)
                  s_per_step=statistics.median(b - a for a, b in zip(warm, warm[1:])) if len(warm) > 1 else 0.0,
                  batch=f"{final.train_batch_size} x {final.gradient_accumulation_steps}",
                  finite=all(math.isfinite(x) for x in losses), steps=len(losses))
    if published:
        result["published"] = published
    return result


def watched(config, *, on_step) -> dict:
    """Train `config` with every snapshot measured as `stop_when="suggested"` measures it (never stopping), and
    time each measuring: the first includes the base model's renders, made once per project."""
    from dreambooth_nb.results.early_stop import Watcher, measuring_share
    from dreambooth_nb.results.quality import EmbeddingJudge
    from dreambooth_nb.training.train import train as train_steps

    watcher, seconds = Watcher(config, judge=EmbeddingJudge.tiny()), []

    def on_snapshot(step, snapshot):
        started = time.perf_counter()
        watcher(step, snapshot)
        seconds.append(time.perf_counter() - started)

    train_steps(config, on_step=on_step, on_snapshot=on_snapshot)
    share = measuring_share(config, watcher.spec)  # (the FLOP count's prediction, per WATCH_INTERVAL steps below)
    return {"measure_seconds": seconds, "renders_per_snapshot": len(watcher.spec.prompts) * len(watcher.spec.seeds),
            "render_steps": watcher.spec.num_inference_steps,
            "predicted_share": share.fraction * share.interval / WATCH_INTERVAL}


def build_model(kind: str, folder: Path) -> Path:
    """The random pipeline that the cases of `kind` ("sd15", "sdxl", "sd3", "flux") train, saved to `folder`."""
    from bench.full_size import KNOWN, build_full_size_pipeline
    from dreambooth_nb.toy.tiny import build_sd15_shaped_pipeline, build_sdxl_shaped_pipeline

    if kind in KNOWN:
        return build_full_size_pipeline(KNOWN[kind], folder, device="cuda")
    if kind == "sd15":
        return build_sd15_shaped_pipeline(folder)
    from diffusers import AutoencoderKL

    path = build_sdxl_shaped_pipeline(folder)
    # The fp16-fix VAE's shape: SDXL's VAE that needs no fp32 upcast.
    vae_config = {**AutoencoderKL.load_config(path / "vae"), "force_upcast": False}
    AutoencoderKL.from_config(vae_config).save_pretrained(path / FP16_FIX_VAE)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: JSON job for one case
    parser.add_argument("--skip-tests", action="store_true", help="only the training cases")
    parser.add_argument("--cases", help="only these cases, by exact name, ';'-separated, in this order (a short "
                                        "lease); default: all")
    args = parser.parse_args()
    cases = [name.strip() for name in args.cases.split(";")] if args.cases else list(CASES)
    unknown = [name for name in cases if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; the cases are {list(CASES)}")
    sys.path.insert(0, str(ROOT))
    if args.case:
        job = json.loads(args.case)
        print("RESULT " + json.dumps(run_case(**job)), flush=True)
        return 0

    import torch

    if not torch.cuda.is_available():
        print("No CUDA GPU here: this check runs on a lent GPU machine (see README, Development).")
        return 1
    from dreambooth_nb.planning.planner import FRAGMENTATION

    props = torch.cuda.get_device_properties(0)
    header = f"{props.name}, {props.total_memory / 2**30:.1f} GiB (capped at {T4_GIB:g} GiB), torch {torch.__version__}"
    print(header, flush=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "DREAMBOOTH_NB_GPU_CAP_GIB": str(T4_GIB)}
    report = {"gpu": header, "tests": None, "builds": {}, "cases": []}
    started = time.monotonic()
    if not args.skip_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                               cwd=ROOT, env=env, capture_output=True, text=True)
        tail = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr[-500:]
        report["tests"] = tail
        print(f"tests/test_gpu.py: {tail} ({time.monotonic() - started:.0f} s)", flush=True)
        if tests.returncode:
            print(tests.stdout[-6000:])

    from PIL import Image
    import numpy as np

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        photos, classes = work / "photos", work / "classes"
        photos.mkdir()
        classes.mkdir()
        rng = np.random.RandomState(0)
        for i in range(4):
            Image.fromarray((rng.rand(1152, 1024, 3) * 255).astype("uint8")).save(photos / f"{i}.png")
            Image.fromarray((rng.rand(512, 512, 3) * 255).astype("uint8")).save(classes / f"class-{i:05d}.png")
        kinds = [CASES[name].get("model", "sd15") for name in cases]
        models = {}
        for number, (name, kind) in enumerate(zip(cases, kinds)):
            if kind not in models:  # built before its first case only: FLUX.1-dev's is 33.7 GB
                t0 = time.monotonic()
                models[kind] = build_model(kind, work / kind)
                size = sum(f.stat().st_size for f in models[kind].rglob("*") if f.is_file()) / 1e9
                report["builds"][kind] = {"seconds": time.monotonic() - t0, "gb": size}
                print(f"{kind} model built and saved in {time.monotonic() - t0:.0f} s ({size:.1f} GB)", flush=True)
            out = work / name.replace(" ", "_").replace(",", "")
            job = json.dumps({"name": name, "model": str(models[kind]), "photos": str(photos), "classes": str(classes),
                              "out": str(out)})
            proc = subprocess.run([sys.executable, __file__, "--case", job], env=env, capture_output=True, text=True)
            # The disk (64 GB on the lent machine) holds one full-size model and no finished case's snapshots.
            for folder in (out, Path(f"{out}-first")):
                shutil.rmtree(folder, ignore_errors=True)
            if kind not in kinds[number + 1:]:
                shutil.rmtree(models.pop(kind))
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                error = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
                report["cases"].append({"case": name, "error": error})
                print(f"{name}: FAILED: {error}", flush=True)
                continue
            report["cases"].append(json.loads(line[len("RESULT "):]))
            print(f"{name}: done ({time.monotonic() - started:.0f} s): {line[len('RESULT '):]}", flush=True)
            if os.environ.get("OUT"):  # after every case: a lease that ends midway still brings these back
                Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(report, indent=2))

    print(f"\n{header}; SD 1.5-shaped at 512 px unless the case says otherwise; {STEPS} "
          f"steps per case, {FULL_SIZE_STEPS} at full size; s/step: per optimizer step\n")
    print("| case | peak allocated | planned allocated | plan error | peak reserved | reserved / allocated | "
          "plan requires (margin + context) | s/step | loss finite | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for case in report["cases"]:
        if "error" in case:
            print(f"| {case['case']} | — | — | — | — | — | — | — | — | failed: {case['error']} |")
            continue
        notes = [case["fitted"] if "fitted" in case else f"batch {case['batch']}"]
        if "published" in case:
            notes.append(f"{case['s_per_step']:.2f} s per optimizer step (batch {case['batch']}) on the {props.name}: "
                         f"a T4's memory (the cap), not a T4's speed; {case['published']}")
        if "measure_seconds" in case:
            first, *later = case["measure_seconds"]
            each = later[-1] if later else first
            notes.append(f"measuring a snapshot ({case['renders_per_snapshot']} renders × {case['render_steps']} steps "
                         f"+ the judge): {each:.1f} s (the first, with the base model's renders: {first:.1f} s) = "
                         f"{each / (WATCH_INTERVAL * case['s_per_step']):.1%} of {WATCH_INTERVAL} steps' training; "
                         f"by FLOPs {case['predicted_share']:.1%} (`planning.compute`; on by default at ≤ 10 %); "
                         "the peak includes the renders beside training, as the plan does")
        if "allocated_between_runs_mib" in case:
            notes.append(f"{case['allocated_between_runs_mib']:.0f} MiB still allocated between the runs")
        error = case["planned_gib"] / case["peak_gib"] - 1
        ratio = case["reserved_gib"] / case["peak_gib"]
        ratios.append(ratio)
        print(f"| {case['case']} | {case['peak_gib']:.2f} GiB | {case['planned_gib']:.2f} GiB | {error:+.1%} | "
              f"{case['reserved_gib']:.2f} GiB | {ratio:.3f} | {case['planned_required_gib']:.2f} GiB | "
              f"{case['s_per_step']:.3f} | {'yes' if case['finite'] else 'NO'} | {'; '.join(notes)} |")
    if ratios:
        report["fragmentation_measured"] = max(ratios) - 1
        print(f"\nReserved / allocated: at most {max(ratios):.3f} (the plan assumes {1 + FRAGMENTATION:.2f}, "
              "planner.FRAGMENTATION).")
    print(f"\nTotal {time.monotonic() - started:.0f} s")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(report, indent=2))
    return 0 if all("error" not in c and c["finite"] for c in report["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
