"""Masked loss on the toy model: does weighting the background down stop the model from copying it?

    python bench/masked_loss.py                        # 3.5 min on 2 CPU cores
    python bench/masked_loss.py --background 0.1 --out masked-loss-0.1

Teaches the shipped toy model (`dreambooth_nb/toy_model`, 32 px) the toy world's subject — the purple-and-orange
striped circle — from photos that all show it on the *same* grey background, once with the plain loss and once
with `masked_loss` (the ground-truth subject masks the photos were painted through, `photo.mask.png`;
background weight `--background`). Each run's snapshots are rendered (DDIM, 25 steps, guidance 4, the same
seeds) for the subject on the two other backgrounds the toy world names ("… on a black background", "… on a
white background") and measured with the toy world's own classifiers (`dreambooth_nb.toy.metrics`):

* background copied: the fraction of those renders whose background is grey (the photos') instead of the one
  asked for (`metrics.background_name_of`, the median border colour);
* background followed: the fraction whose background is the one asked for;
* subject fidelity: the renders of "a photo of sks circle" look like the photos (`metrics.subject_fidelity`),
  so that a lower copy rate is not bought by not learning the subject.

Prints one table (Markdown) and the ratio of the copy rates, masked / plain, at each step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONTEXTS = ("black", "white")
TRAINING_BACKGROUND = "gray"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("masked-loss-output"), help="output folder (reused)")
    parser.add_argument("--lr", type=float, default=3e-4, help="high, as in the study's overfitting runs")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 200, 300], help="snapshot steps (the last ends)")
    parser.add_argument("--seeds", type=int, default=16, help="renders per prompt")
    parser.add_argument("--photos", type=int, default=5)
    parser.add_argument("--background", type=float, default=0.3, help="mask_background_weight")
    parser.add_argument("--inference-steps", type=int, default=25, help="DDIM steps per render")
    return parser.parse_args(argv)


def write_photos(folder: Path, n: int) -> None:
    """`n` photos of the subject on grey, sizes and places jittered as `world.subject_images`, each with its mask."""
    import numpy as np

    from dreambooth_nb.dataset.masks import mask_file
    from dreambooth_nb.toy import world

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(10_000)
    for i in range(n):
        size = int(rng.integers(18, 23))
        c = world.IMAGE_SIZE / 2
        position = (c + float(rng.uniform(-3, 3)), c + float(rng.uniform(-3, 3)))
        photo, mask = world.subject_photo_with_mask(background=TRAINING_BACKGROUND, size=size, position=position,
                                                    rng=rng)
        photo.save(folder / f"subject-{i}.png")
        mask.save(mask_file(folder / f"subject-{i}.png"))


def measure(snapshot: Path, photos: list, *, seeds: list[int], inference_steps: int = 25) -> dict:
    from PIL import Image

    from dreambooth_nb.results.evaluate import EvalSpec, render
    from dreambooth_nb.toy import metrics, world

    contexts = [f"{world.SUBJECT_INSTANCE_PROMPT} on a {bg} background" for bg in CONTEXTS]
    spec = EvalSpec(prompts=[world.SUBJECT_INSTANCE_PROMPT, *contexts], seeds=seeds, num_inference_steps=inference_steps,
                    guidance_scale=4.0)
    rendered = render(snapshot, spec)
    by_prompt = {}
    for r in rendered:
        with Image.open(r.image) as image:
            by_prompt.setdefault(r.prompt, []).append(image.convert("RGB"))
    seen = [(bg, metrics.background_name_of(image)) for bg, prompt in zip(CONTEXTS, contexts)
            for image in by_prompt[prompt]]
    return {"copied": sum(got == TRAINING_BACKGROUND for _, got in seen) / len(seen),
            "followed": sum(got == want for want, got in seen) / len(seen),
            "fidelity": metrics.subject_fidelity(by_prompt[world.SUBJECT_INSTANCE_PROMPT], photos)}


def experiment(out: Path, *, lr: float, steps: list[int], seeds: int, photos: int = 5, background: float,
               inference_steps: int = 25) -> dict:
    """{"plain": {step: measures}, "masked": {step: measures}}: the two runs, trained (or found) in `out`."""
    from PIL import Image

    from dreambooth_nb import preset, storage, train
    from dreambooth_nb.toy import world

    photos_dir = out / "photos"
    write_photos(photos_dir, photos)
    pictures = [Image.open(p).convert("RGB") for p in sorted(photos_dir.glob("subject-*.png"))
                if not p.name.endswith(".mask.png")]
    results = {}
    for label, masked in (("plain", False), ("masked", True)):
        config = preset(pretrained_model_name_or_path=str(world.TOY_MODEL_DIR), instance_data_dir=str(photos_dir),
                        instance_prompt=world.SUBJECT_INSTANCE_PROMPT, class_prompt=world.SUBJECT_CLASS_PROMPT,
                        resolution=32, learning_rate=lr, train_batch_size=4, max_train_steps=max(steps),
                        cache_latents=True, checkpointing_steps=max(steps), snapshot_steps=steps,
                        masked_loss=masked, mask_background_weight=background, output_dir=str(out / label))
        train(config, progress_bar=False)
        results[label] = {step: measure(snapshot, pictures, seeds=list(range(seeds)), inference_steps=inference_steps)
                          for step, snapshot in storage.list_snapshots(config.output_dir) if step in steps}
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    results = experiment(args.out, lr=args.lr, steps=args.steps, seeds=args.seeds, photos=args.photos,
                         background=args.background, inference_steps=args.inference_steps)
    print(f"\nToy model, LR {args.lr:g}, batch 4, {args.photos} photos all on a grey background; {args.seeds} seeds × "
          f"{len(CONTEXTS)} other backgrounds per cell, {args.inference_steps} DDIM steps ({time.time() - started:.0f} s)."
          "\n")
    print("| loss | step | background copied (grey) | background followed | subject fidelity |")
    print("|---|---|---|---|---|")
    labels = {"plain": "plain", "masked": f"masked, background weight {args.background:g}"}
    for label, by_step in results.items():
        for step, m in sorted(by_step.items()):
            print(f"| {labels[label]} | {step} | {m['copied']:.2f} | {m['followed']:.2f} | {m['fidelity']:.2f} |")
    print()
    plain, masked = results["plain"], results["masked"]
    for step in sorted(plain):
        ratio = masked[step]["copied"] / plain[step]["copied"] if plain[step]["copied"] else float("nan")
        print(f"step {step}: copy rate masked / plain = {masked[step]['copied']:.2f} / {plain[step]['copied']:.2f}"
              f" = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
