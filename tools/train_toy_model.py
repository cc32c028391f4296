"""Train the project's embedded toy text-to-image model from scratch, on CPU, deterministically.

    python tools/train_toy_model.py --out dreambooth_nb/toy/toy_model

Phases (each timed and printed):
  0. render the data: a broad image distribution (VAE) and a captioned toy world (UNet + text encoder);
  a. train an AutoencoderKL (f=2: 32 px images <-> 16x16x4 latents) on the broad distribution, and set
     `scaling_factor` from the measured latent std of the captioned world;
  b. cache the captioned world's latent distributions, then train a UNet2DConditionModel (cross-attention)
     and a CLIP text encoder together from scratch: DDPM noise schedule, epsilon prediction,
     10 % empty captions for classifier-free guidance; a quarter of the captions name one of the world's
     rare identifier objects (`toyworld.IDENTIFIERS`), and a token-identity loss keeps every token,
     the never-seen `sks` too, recoverable from the text encoder's output (see `token_loss`);
  c. measure how often generations follow the prompt's colour and shape, and save the
     `StableDiffusionPipeline` (DDIM scheduler with the training betas) and a model card.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dreambooth_nb.toy import metrics, world as toyworld  # noqa: E402
from dreambooth_nb.toy.tiny import build_text_encoder, build_tokenizer, build_unet, build_vae  # noqa: E402

# The DDPM schedule the UNet is trained with; the saved DDIM scheduler uses the same betas. Linear betas
# (DDPM's own, as for 32 px CIFAR) leave almost no signal at t=T (alpha_bar_T ~ 4e-5), so sampling from
# pure noise matches training, which matters for learning flat colours.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon")

EVAL_CAPTIONS = [toyworld.caption_for(c, s) for c in toyworld.COLOURS for s in toyworld.SHAPES]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="dreambooth_nb/toy/toy_model", help="folder for the pipeline (replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads, fixed for reproducibility (the shipped model used 2; 1 is faster on a "
                        "busy 2-core machine but gives different weights)")
    p.add_argument("--vae-channels", type=int, nargs="+", default=[16, 32])
    p.add_argument("--vae-images", type=int, default=6000)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--unet-channels", type=int, nargs="+", default=[32, 64, 64])
    p.add_argument("--text-hidden", type=int, default=64)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--images", type=int, default=8000, help="captioned training images")
    p.add_argument("--steps", type=int, default=3000, help="UNet + text encoder steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="fraction of empty captions")
    p.add_argument("--p-identifier", type=float, default=0.25,
                   help="fraction of captions naming an identifier object (`a photo of vex square`)")
    p.add_argument("--token-loss", type=float, default=0.1, help="weight of the token-identity loss (0: off)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 7])
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--inference-steps", type=int, default=25)
    p.add_argument("--vae-from", type=Path, default=None,
                   help="reuse the VAE of this toy-model folder instead of training it (phase a skipped; the VAE "
                        "learns the broad distribution only, so caption changes leave it as it was); its report's "
                        "VAE numbers are carried over")
    p.add_argument("--update-card", action="store_true",
                   help="no training: load the pipeline in --out, rerun the final evaluation, add vocab.json + "
                        "merges.txt to its tokenizer, and rewrite training_report.json and README.md")
    return p.parse_args(argv)


def to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor (N, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous() / 127.5 - 1


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def train_vae(args, images: torch.Tensor, log) -> tuple:
    vae = build_vae(channels=tuple(args.vae_channels), seed=args.seed)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0, losses = time.time(), []
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = args.vae_lr * lr_at(step, args.vae_steps, 50)
        x = images[torch.randint(0, len(images), (args.vae_batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
        loss = rec + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(rec.item())
        if (step + 1) % 200 == 0 or step + 1 == args.vae_steps:
            log(f"  vae step {step + 1}/{args.vae_steps}  rec {np.mean(losses[-200:]):.4f}  "
                f"{(time.time() - t0) / (step + 1):.3f} s/step")
    vae.eval()
    return vae, float(np.mean(losses[-100:]))


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch: int = 256):
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(images[i:i + batch]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_checks(vae, log) -> dict:
    """Round-trip error on held-out world and broad images, and how much of the subject's colours survive."""
    world = to_tensor([im for im, _ in toyworld.sample_captioned(256, seed=999)])
    broad = to_tensor(toyworld.sample_broad(256, seed=999))
    subject = toyworld.subject_images(8, seed=99)
    out = {}
    for name, x in (("world", world), ("broad", broad)):
        out[f"{name}_mae"] = float((vae.decode(vae.encode(x).latent_dist.mean).sample - x).abs().mean() * 127.5)
    recon = vae.decode(vae.encode(to_tensor(subject)).latent_dist.mean).sample
    recon_images = [metrics._pixels(r) for r in ((recon.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()]
    out["subject_similarity"] = metrics.subject_similarity(recon_images, subject)
    out["subject_self_similarity"] = metrics.subject_similarity(subject, subject)
    log(f"  vae round trip: mean abs error {out['world_mae']:.1f}/255 (world), {out['broad_mae']:.1f}/255 (broad); "
        f"subject colour similarity {out['subject_similarity']:.2f} (originals with themselves: "
        f"{out['subject_self_similarity']:.2f})")
    return out


def make_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate(pipe, args) -> dict:
    pipe.unet.eval()
    pipe.text_encoder.eval()
    acc = metrics.prompt_accuracy(pipe, EVAL_CAPTIONS, args.eval_seeds, num_inference_steps=args.inference_steps,
                                  guidance_scale=args.guidance)
    pipe.unet.train()
    pipe.text_encoder.train()
    return acc


def token_loss(text_encoder, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of reading each input token back from the encoder's output, through the (tied) input
    embeddings, as a masked language model's decoder does.

    The diffusion loss alone gives a token that no caption uses (`sks`) no reason to stay apart from the
    article it replaces: the shipped model of issue 13's time encoded "a photo of sks circle" 4 % from
    "a photo of a circle", so Dreambooth's instance and prior losses pulled one condition two ways. CLIP's
    hidden states keep their tokens recoverable; this loss asks the same of the toy encoder, for every
    token of the vocabulary (all of them compete in the softmax, `sks` included).
    """
    logits = hidden @ text_encoder.get_input_embeddings().weight.T
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))


def train_unet(args, vae, tokenizer, log):
    from diffusers import DDPMScheduler

    data = toyworld.sample_captioned(args.images, seed=args.seed, p_identifier=args.p_identifier)
    t0 = time.time()
    mean, std = encode(vae, to_tensor([im for im, _ in data]))
    scaling = float(1.0 / (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))).std())
    vae.register_to_config(scaling_factor=scaling)
    captions = sorted({c for _, c in data}) + [""]
    caption_index = torch.tensor([captions.index(c) for _, c in data])
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    cache_s = time.time() - t0
    log(f"  cached {len(data)} latents {tuple(mean.shape[1:])} in {cache_s:.1f} s; "
        f"latent std {1 / scaling:.3f} -> scaling_factor {scaling:.4f}; {len(captions) - 1} distinct captions")

    text_encoder = build_text_encoder(tokenizer, hidden_size=args.text_hidden, layers=args.text_layers,
                                      seed=args.seed)
    unet = build_unet(channels=tuple(args.unet_channels), cross_attention_dim=args.text_hidden,
                      sample_size=mean.shape[-1], seed=args.seed)
    unet.train()
    text_encoder.train()
    pipe = make_pipeline(vae, text_encoder, tokenizer, unet)
    noise_scheduler = DDPMScheduler(**SCHEDULE)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(args.seed + 2)
    empty = len(captions) - 1
    history, losses, t0 = [], [], time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_at(step, args.steps, args.warmup)
        idx = torch.randint(0, len(data), (args.batch,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        which = caption_index[idx].clone()
        which[torch.rand(args.batch, generator=gen) < args.cfg_dropout] = empty
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        hidden = text_encoder(ids[which])[0]
        loss = (unet(noisy, t, hidden).sample - noise).pow(2).mean()
        if args.token_loss:
            loss = loss + args.token_loss * token_loss(text_encoder, hidden, ids[which])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log(f"  unet step {step + 1}/{args.steps}  loss {np.mean(losses[-100:]):.4f}  "
                f"{(time.time() - t0) / (step + 1):.3f} s/step")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            e0 = time.time()
            acc = evaluate(pipe, args)
            t0 += time.time() - e0  # keep s/step about training only
            history.append({"step": step + 1, "loss": float(np.mean(losses[-100:])), "colour": acc["colour"],
                            "shape": acc["shape"], "both": acc["both"]})
            log(f"  eval @ {step + 1}: colour {acc['colour']:.2f} (chance {acc['chance_colour']:.2f}), "
                f"shape {acc['shape']:.2f} (chance {acc['chance_shape']:.2f}), both {acc['both']:.2f}, "
                f"n={acc['n']}  [{time.time() - e0:.1f} s]")
    train_s = time.time() - t0
    unet.eval()
    text_encoder.eval()
    return pipe, {"cache_s": cache_s, "train_s": train_s, "history": history, "scaling_factor": scaling,
                  "final_loss": float(np.mean(losses[-100:])), "distinct_captions": len(captions) - 1}


def final_evaluation(pipe, args, log) -> dict:
    """Prompts that also name the background, and the subject's class prompt (no colour named)."""
    captions = [toyworld.caption_for(c, s, b) for c in toyworld.COLOURS for s in toyworld.SHAPES
                for b in toyworld.BACKGROUNDS]
    seeds = args.eval_seeds[:4]
    acc = metrics.prompt_accuracy(pipe, captions, seeds, num_inference_steps=args.inference_steps,
                                  guidance_scale=args.guidance)
    per_bg = {}
    for caption, _, _, _, seen in acc["records"]:
        wanted = toyworld.parse_caption(caption)["background"]
        per_bg.setdefault(wanted, []).append(seen == wanted)
    with_bg = {k: acc[k] for k in ("colour", "shape", "both", "background", "n")}
    with_bg["background_by_name"] = {k: float(np.mean(v)) for k, v in per_bg.items()}
    log(f"  captions naming the background ({acc['n']} generations): colour {acc['colour']:.2f}, "
        f"shape {acc['shape']:.2f}, background {acc['background']:.2f} (chance 0.33; "
        + ", ".join(f"{k} {v:.2f}" for k, v in with_bg["background_by_name"].items()) + ")")
    images = metrics.generate(pipe, [toyworld.SUBJECT_CLASS_PROMPT], args.eval_seeds,
                              num_inference_steps=args.inference_steps, guidance_scale=args.guidance)[0]
    shapes = [metrics.shape_of(im) for im in images]
    colours = [metrics.colour_of(im) for im in images]
    cls = {"prompt": toyworld.SUBJECT_CLASS_PROMPT, "shape": shapes.count(toyworld.SUBJECT_CLASS) / len(shapes),
           "colours": {c: colours.count(c) for c in sorted(set(colours), key=str)}}
    log(f"  {cls['prompt']!r}: {toyworld.SUBJECT_CLASS} in {cls['shape']:.2f} of {len(shapes)}; colours {cls['colours']}")
    return {"with_background": with_bg, "class_prompt": cls, "identifiers": identifier_evaluation(pipe, args, log)}


def identifier_evaluation(pipe, args, log) -> dict:
    """How far the text encoder puts the subject's prompt from its class prompt (and, for scale, a colour and
    an identifier), and whether each identifier's prompt draws its object."""
    reference = toyworld.SUBJECT_CLASS_PROMPT
    prompts = [toyworld.SUBJECT_INSTANCE_PROMPT, "a photo of a red circle", "a photo of zil circle"]
    distances = {p: metrics.prompt_distance(pipe.tokenizer, pipe.text_encoder, p, reference) for p in prompts}
    log(f"  distance from {reference!r}: " + ", ".join(f"{p!r} {d:.2f}" for p, d in distances.items()))
    seeds = args.eval_seeds[:2]
    captions = [toyworld.caption_for(None, spec[0], identifier=word) for word, spec in toyworld.IDENTIFIERS.items()]
    images = metrics.generate(pipe, captions, seeds, num_inference_steps=args.inference_steps,
                              guidance_scale=args.guidance)
    fidelity, own = {}, {}
    for (word, spec), row in zip(toyworld.IDENTIFIERS.items(), images):
        references = [toyworld.render_identified(word, rng=np.random.default_rng(s)) for s in range(4)]
        fidelity[word] = metrics.subject_fidelity(row, references, shape=spec[0])
        photos = [toyworld.render_identified(word, size=15, position=(14, 17), rng=np.random.default_rng(s))
                  for s in (10, 11)]  # the object itself, elsewhere: what a perfect model would score
        own[word] = metrics.subject_fidelity(photos, references, shape=spec[0])
    log(f"  identifier prompts draw their objects: mean similarity {np.mean(list(fidelity.values())):.2f} "
        f"({len(seeds)} seeds each; renders of the objects themselves: {np.mean(list(own.values())):.2f})")
    return {"reference": reference, "distance": distances, "object_similarity": fidelity,
            "object_self_similarity": own}


def update_card(out: Path, args, log) -> None:
    """Re-evaluate a saved pipeline and rewrite its report and model card (training numbers are kept)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    report = json.loads((out / "training_report.json").read_text())
    saved = report["args"]
    if saved["threads"] != args.threads or saved["seed"] != args.seed:
        log(f"note: {out} was trained with threads={saved['threads']} seed={saved['seed']}")
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    eval_args = argparse.Namespace(**{**saved, "eval_seeds": saved["eval_seeds"]})
    t = time.time()
    extra = final_evaluation(pipe, eval_args, log)
    report["times_s"]["eval"] = round(time.time() - t, 1)
    report["eval_rerun"] = True  # the final evaluation ran later, on its own, and is not in the total
    report.update(extra)
    write_slow_tokenizer_files(out / "tokenizer")
    report["size_bytes"] = folder_size(out)
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(model_card(report))
    log(f"updated {out / 'training_report.json'} and {out / 'README.md'}")


def reuse_vae(folder: Path, log) -> tuple:
    """(vae, its training loss, render and training seconds) of the toy model in `folder`, from its report."""
    from diffusers import AutoencoderKL

    report = json.loads((folder / "training_report.json").read_text())
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    log(f"[a] VAE reused from {folder} (trained there in {report['times_s']['vae'] / 60:.1f} min)")
    return vae, report["vae_train_loss"], report["times_s"]["render"], report["times_s"]["vae"]


def write_slow_tokenizer_files(folder: Path) -> None:
    """Add vocab.json + merges.txt next to tokenizer.json.

    transformers 5 saves only tokenizer.json; transformers 4.x (Colab) loads the pipeline's tokenizer as
    the Python `CLIPTokenizer`, which needs these two files.
    """
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if not (folder / "vocab.json").exists():
        (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    if not (folder / "merges.txt").exists():
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny weights/gradients as denormals slow CPU math a lot
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(args.out)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    if args.update_card:
        update_card(out, args, log)
        return

    times = {}
    start = time.time()
    log(f"threads={args.threads} seed={args.seed} torch {torch.__version__}")

    if args.vae_from:
        vae, vae_loss, times["render"], times["vae"] = reuse_vae(args.vae_from, log)
    else:
        t = time.time()
        broad = to_tensor(toyworld.sample_broad(args.vae_images, seed=args.seed))
        times["render"] = time.time() - t
        log(f"[0] rendered {args.vae_images} broad images in {times['render']:.1f} s")
        t = time.time()
        vae, vae_loss = train_vae(args, broad, log)
        times["vae"] = time.time() - t
        log(f"[a] VAE: {count(vae):,} parameters, {args.vae_steps} steps x {args.vae_batch}: {times['vae'] / 60:.1f} min")
    vae_report = vae_checks(vae, log)

    tokenizer = build_tokenizer(toyworld.VOCABULARY, model_max_length=16)
    t = time.time()
    pipe, unet_report = train_unet(args, vae, tokenizer, log)
    times["unet"] = time.time() - t
    log(f"[b] UNet {count(pipe.unet):,} + text encoder {count(pipe.text_encoder):,} parameters, "
        f"{args.steps} steps x {args.batch}: {times['unet'] / 60:.1f} min (latent cache {unet_report['cache_s']:.1f} s)")

    t = time.time()
    extra = final_evaluation(pipe, args, log)
    times["eval"] = time.time() - t
    log(f"[c] final evaluation: {times['eval']:.0f} s")

    t = time.time()
    final = unet_report["history"][-1]
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    write_slow_tokenizer_files(out / "tokenizer")
    size = folder_size(out)
    times["save"] = time.time() - t
    times["total"] = time.time() - start
    log(f"[d] saved to {out} ({size / 1e6:.2f} MB); total {times['total'] / 60:.1f} min")

    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "parameters": {"vae": count(vae), "unet": count(pipe.unet), "text_encoder": count(pipe.text_encoder)},
        "vae_train_loss": vae_loss, "vae": vae_report,
        **{k: v for k, v in unet_report.items() if k != "history"}, "history": unet_report["history"],
        "final": final, "with_background": extra["with_background"], "class_prompt": extra["class_prompt"],
        "identifiers": extra["identifiers"],
        "size_bytes": size, "eval_captions": EVAL_CAPTIONS,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(model_card(report))
    print(f"model card: {out / 'README.md'}")


def model_card(r: dict) -> str:
    a, p, tm, f = r["args"], r["parameters"], r["times_s"], r["final"]
    hist = "\n".join(f"| {h['step']} | {h['loss']:.4f} | {h['colour']:.2f} | {h['shape']:.2f} | {h['both']:.2f} |"
                     for h in r["history"])
    n_eval = len(r["eval_captions"]) * len(a["eval_seeds"])
    wb, cp = r["with_background"], r["class_prompt"]
    bg_by = ", ".join(f"{k} {v:.2f}" for k, v in wb["background_by_name"].items())
    weakest = min(wb["background_by_name"], key=wb["background_by_name"].get)
    eval_note = "; run afterwards with `--update-card`, not in the total" if r.get("eval_rerun") else ""
    vae_note = ("; reused from the model this one replaced (`--vae-from`), the same settings: its time, not in "
                "the total" if a.get("vae_from") else "")
    ids = r["identifiers"]
    dist = ", ".join(f"`{p!r}` **{d:.2f}**" for p, d in ids["distance"].items())
    id_mean = float(np.mean(list(ids["object_similarity"].values())))
    id_self = float(np.mean(list(ids["object_self_similarity"].values())))
    return f"""# Toy text-to-image model (embedded default)

A complete `StableDiffusionPipeline` (32 px images, 16x16x4 latents) trained **from scratch on CPU** on
the procedural toy world of `dreambooth_nb/toyworld.py`: red/green/blue/yellow circles, squares and
triangles on white/black/gray backgrounds, captioned like `"a photo of a red circle"` or
`"a photo of a blue triangle on a black background"`. It exists so that the notebooks' demo and the
learning tests use a model that has really learned something, with no download.

```python
from diffusers import StableDiffusionPipeline
from dreambooth_nb.toy.world import TOY_MODEL_DIR
pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_DIR)
image = pipe("a photo of a red circle", height=32, width=32, num_inference_steps=25,
             guidance_scale={a['guidance']}).images[0]
```

## How it was made

```
python tools/train_toy_model.py --out {a['out']} --threads {a['threads']}
```

Deterministic: fixed seeds (`--seed {a['seed']}`), `torch.set_num_threads({a['threads']})`, deterministic
algorithms. Re-running on the same kind of CPU and torch version gives the same weights; other CPUs or
thread counts may differ in the last bits. Times below were measured on a shared 2-core CPU machine.

| phase | what | time |
|---|---|---|
| 0 | render {a['vae_images']} broad images | {tm['render']:.0f} s |
| a | AutoencoderKL, channels {tuple(a['vae_channels'])}, f=2, 4 latent channels: {a['vae_steps']} steps, batch {a['vae_batch']}, AdamW lr {a['vae_lr']}, L1 + L2 + 1e-6 KL, on the **broad** distribution (any colour, stripes, checkers, gradients, noise, 20 % world images){vae_note} | {tm['vae'] / 60:.1f} min |
| b | cache latents of {a['images']} captioned images ({r['distinct_captions']} distinct captions), then UNet2DConditionModel (channels {tuple(a['unet_channels'])}, cross-attention dim {a['text_hidden']}) + CLIP text encoder ({a['text_layers']} layers, hidden {a['text_hidden']}) from scratch: {a['steps']} steps, batch {a['batch']}, AdamW lr {a['lr']} (warmup {a['warmup']}, cosine to 10 %), epsilon prediction, DDPM linear betas 1e-4..0.02 over 1000 steps, {a['cfg_dropout']:.0%} empty captions (classifier-free guidance), {a['p_identifier']:.0%} of the images an identifier's object ("a photo of vex square"), token-identity loss × {a['token_loss']:g} on the text encoder; includes the evaluations below | {tm['unet'] / 60:.1f} min |
| c | final evaluation (below){eval_note} | {tm['eval']:.0f} s |
| d | save | {tm['save']:.0f} s |
| | **total** | **{tm['total'] / 60:.1f} min** |

- Parameters: VAE {p['vae']:,}; UNet {p['unet']:,}; text encoder {p['text_encoder']:,}
  (total {sum(p.values()):,}). Saved as fp32 safetensors: {r['size_bytes'] / 1e6:.2f} MB.
- `vae.config.scaling_factor` = {r['scaling_factor']:.4f} (1 / the measured std of the world's latents).
- Scheduler: `DDIMScheduler` with the training betas (linear, 1e-4..0.02), `steps_offset=1`,
  `clip_sample=False`, `set_alpha_to_one=False`. Fine-tuning code reads the same betas with
  `DDPMScheduler.from_pretrained(TOY_MODEL_DIR, subfolder="scheduler")`.
- Tokenizer: a CLIP BPE tokenizer (`dreambooth_nb.toy.tiny.build_tokenizer`), `model_max_length=16`, with
  every word of `toyworld.VOCABULARY` as one token: the world's words, the rare identifiers, and `sks`,
  which no caption uses.
- VAE round trip (mean absolute error per channel, 0..255): {r['vae']['world_mae']:.1f} on held-out world
  images, {r['vae']['broad_mae']:.1f} on held-out broad images. The Dreambooth subject (purple-and-orange
  striped circle, never in the captioned world) survives the round trip with a foreground colour-histogram
  similarity of {r['vae']['subject_similarity']:.2f} (`metrics.subject_similarity`; originals against
  themselves: {r['vae']['subject_self_similarity']:.2f}).

## What it can do (measured)

`metrics.prompt_accuracy` on the {len(r['eval_captions'])} captions "a photo of a {{colour}} {{shape}}" (4 colours x 3
shapes) x {len(a['eval_seeds'])} seeds = {n_eval} generations, DDIM {a['inference_steps']} steps, guidance {a['guidance']},
classified by `metrics.colour_of` / `metrics.shape_of` (both 100 % correct on rendered ground truth):

| after step | loss | colour acc. | shape acc. | both |
|---|---|---|---|---|
{hist}

Final: **colour {f['colour']:.2f}** (chance 0.25), **shape {f['shape']:.2f}** (chance 0.33),
**both {f['both']:.2f}** (chance 0.08).

Captions that also name the background ("... on a {{white|black|gray}} background", 36 captions x
{wb['n'] // 36} seeds = {wb['n']} generations): colour {wb['colour']:.2f}, shape {wb['shape']:.2f}, background {wb['background']:.2f}
(chance 0.33; by background: {bg_by}); {weakest} is the weakest background (gray tends to come out
lighter). Higher guidance washes colours out on these longer prompts (measured on the model this one replaced, seeds
100-103: colour 0.89 -> 0.60 and shape 0.92 -> 0.68 from guidance 4 to 7.5); about {a['guidance']} works well.

The subject's class prompt `{cp['prompt']!r}` (no colour named) gives a {cp['prompt'].split()[-1]} for
{round(cp['shape'] * len(a['eval_seeds']))} of {len(a['eval_seeds'])} seeds, in a spread of colours {cp['colours']}: a class prior
for Dreambooth's prior preservation.

## Rare identifiers, and `sks` kept apart

As in CLIP's web captions, where a rare word names one particular thing, {a['p_identifier']:.0%} of the training
images show one of {len(r['identifiers']['object_similarity'])} identifier objects (`toyworld.IDENTIFIERS`: "a photo of vex square" is always the
same cyan-and-brown checkered square), and the text encoder also learns to give every input token back from
its output (a token-identity loss through the tied input embeddings, weight {a['token_loss']:g}), as CLIP's hidden
states do. So a word no caption uses, `sks`, still gets a condition of its own, where the diffusion loss
alone let the encoder fold it into the article it replaces.

Distance of the text encoder's output from that of `{r['identifiers']['reference']!r}` (`metrics.prompt_distance`,
‖h(a) − h(b)‖ / ‖h(b)‖ over the padded sequence): {dist}. (The model this one replaced, trained without
identifiers and that loss: `sks` 0.04, a colour 0.58.) The identifier prompts draw their objects with a mean
colour-and-shape similarity of {id_mean:.2f} (`metrics.subject_fidelity` against renders of each object; other
renders of the objects themselves score {id_self:.2f}). Before fine-tuning, `"a photo of sks circle"` draws a
circle whose look the untrained `sks` embedding leaves to chance: Dreambooth then binds it to the subject.

## What it cannot do

- Anything outside the toy world: it knows 4 colours, 3 shapes, 3 backgrounds; other words are
  character soup to its tokenizer and are ignored or confuse it. Sizes and positions are not promptable.
- It has never seen purple or orange paired with a caption, nor the token `sks` in one (patterns only on
  the identifiers' objects): that is the Dreambooth subject's job (`toyworld.subject_images`,
  `SUBJECT_INSTANCE_PROMPT`).
- Images are 32x32 and a little soft; edges and small triangles are not always crisp.
- It is a teaching model: its numbers show effects in miniature, not Stable Diffusion's quality.
"""


if __name__ == "__main__":
    main()
