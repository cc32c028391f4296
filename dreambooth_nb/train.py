"""The Dreambooth training loop: one function, `train(config)`, readable top to bottom.

    photos → latents (cached or per step) → noise at a random timestep → UNet predicts the noise
    → MSE on the instance half + prior_loss_weight × MSE on the class half → AdamW step

Everything random is derived from (seed, sample position) (see `data.py`), and everything written is
atomic (see `storage.py`), so a run killed at any moment resumes to the very same weights.
"""

from __future__ import annotations

import gc
import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import memory, models, storage
from .config import TrainConfig
from .data import CLASS, INSTANCE, ImageFolder, LatentSource, encode_prompt, item_index, sample_generator, tokenize
from .errors import ConfigError, TrainingStopped

OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

# Settings that may change between a run and its resumption without changing what is being trained.
_RESUMABLE_CHANGES = {"resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit", "snapshot_steps",
                      "max_train_steps", "num_class_images", "sample_batch_size", "output_dir", "latent_cache_dir"}
# The memory savers the out-of-memory advice names (and mixed precision, which the NaN advice names): a run
# stopped for memory resumes with them. 8-bit Adam restarts the optimizer moments; see `load_state`.
_RESUMABLE_CHANGES |= {"gradient_checkpointing", "use_8bit_adam", "cache_latents", "pre_compute_text_embeddings",
                       "attention_backend", "mixed_precision"}


@dataclass
class History:
    """What the notebook plots: one entry per optimizer step."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)

    def add(self, step: int, loss: float, lr: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        self.lrs.append(lr)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "losses": self.losses, "lrs": self.lrs}


def train(config: TrainConfig, *, on_step=None) -> Path:
    """Run (or resume, or skip if finished) the training described by `config`.

    `on_step(step, loss, lr)` is called after every optimizer step (the notebook's live plot).
    Returns the folder of the final inference-ready pipeline.
    """
    try:
        return _train(config, on_step=on_step)
    except (TrainingStopped, KeyboardInterrupt) as stop:
        # The traceback holds the loop's frames, and in them the models, the optimizer and the last
        # activations. A notebook keeps the last exception, so a rerun with the advised setting would find
        # the GPU still full: clear those frames (the message says it all; the stack adds nothing).
        error = stop
        while error is not None:
            traceback.clear_frames(error.__traceback__)
            error = error.__cause__ or error.__context__
        _free_memory()
        raise


def _train(config: TrainConfig, *, on_step=None) -> Path:
    config.validate()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for leftover in storage.remove_partial(out):
        print(f"Removed {leftover.name}: an incomplete save from an interrupted run.")
    resume_from = _resume_source(config)
    final = storage.snapshot_path(out, config.max_train_steps)
    if (final / "model_index.json").is_file():
        print(f"Training already finished: {final}")
        return final

    if config.with_prior_preservation:
        from .priors import generate_class_images

        generate_class_images(config)

    accelerator = _new_accelerator(config)
    device = accelerator.device
    parts = models.load_components(config, device=device)
    attention = models.set_attention(parts.unet, backend=config.attention_backend, device=device)
    models.enable_tf32(device)
    if config.gradient_checkpointing:
        models.enable_gradient_checkpointing(parts, train_text_encoder=config.train_text_encoder)

    # --- Data: images loaded (and checked) before any step, so a bad photo never stops training midway.
    frozen_dtype = models.weight_dtype(config.mixed_precision, device)
    flips = (False, True) if config.random_flip else (False,)
    folders = [ImageFolder.load(config.instance_data_dir, prompt=config.instance_prompt,
                                resolution=config.resolution)]
    if config.with_prior_preservation:
        folders.append(ImageFolder.load(config.class_data_dir, prompt=config.class_prompt,
                                        resolution=config.resolution))
    latents = [LatentSource(folder, vae=parts.vae, resolution=config.resolution, center_crop=config.center_crop,
                            cache=config.cache_latents, flips=flips, device=device, dtype=frozen_dtype,
                            cache_dir=config.latent_cache_dir, model_key=_model_key(config))
               for folder in folders]
    if config.cache_latents and device.type == "cuda":
        parts.vae.to("cpu")  # kept on CPU for saving snapshots; the GPU memory goes to training
        torch.cuda.empty_cache()
    token_ids = torch.cat([tokenize(folder.prompt, tokenizer=parts.tokenizer) for folder in folders])

    # --- Optimizer over the trained parts, each with its own learning rate.
    trained = [parts.unet] + ([parts.text_encoder] if config.train_text_encoder else [])
    groups = [{"params": [p for p in parts.unet.parameters() if p.requires_grad], "lr": config.learning_rate}]
    if config.train_text_encoder:
        groups.append({"params": list(parts.text_encoder.parameters()),
                       "lr": config.text_encoder_learning_rate or config.learning_rate})
    optimizer = make_optimizer(groups, config=config, device=device)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.max_train_steps)
    ema = None
    if config.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(parts.unet.parameters(), decay=config.ema_decay)
        ema.to(device)

    total_params = sum(models.count_parameters(m) for m in (parts.unet, parts.text_encoder, parts.vae))
    trained_params = sum(models.count_parameters(m, trainable_only=True) for m in trained)

    # --- Resume: weights, optimizer (8-bit state included), schedule, scaler, EMA, RNG, step, history.
    step, history = 0, History()
    if resume_from is not None:
        step, history = load_state(resume_from, parts=parts, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                   accelerator=accelerator, ema=ema, config=config)
        print(f"Resuming from {resume_from.name}: step {step} of {config.max_train_steps}.")
    storage.check_free_space(out, what="the training states and snapshots of this run", needed_bytes=memory.planned_disk_bytes(
        config, trained_params=trained_params, total_params=total_params, start_step=step))
    config.to_json(out / "config.json")

    prepared = accelerator.prepare(*trained, optimizer)
    unet, optimizer = prepared[0], prepared[-1]
    text_encoder = prepared[1] if config.train_text_encoder else parts.text_encoder
    te_training = config.train_text_encoder and not _text_encoder_stopped(config, step)
    if config.train_text_encoder and not te_training:
        _freeze(text_encoder)
    embeddings = None if te_training else _embed(token_ids, text_encoder, device)
    if config.pre_compute_text_embeddings and device.type == "cuda":
        parts.text_encoder.to("cpu")  # frozen and already used: free its GPU memory
        torch.cuda.empty_cache()

    print(f"Training {trained_params / 1e6:.1f} M parameters on {device} ({attention} attention, "
          f"{type(optimizer.optimizer).__name__}, mixed precision {config.mixed_precision}).")
    unet.train()
    micro_per_step = config.gradient_accumulation_steps
    bar = tqdm(total=config.max_train_steps, initial=step, desc="Training")
    while step < config.max_train_steps:
        step_losses = []
        for micro in range(step * micro_per_step, (step + 1) * micro_per_step):
            with accelerator.accumulate(*([unet, text_encoder] if te_training else [unet])):
                try:
                    batch = make_batch(micro, config=config, latents=latents, folders=folders,
                                       num_timesteps=parts.noise_scheduler.config.num_train_timesteps)
                    loss = compute_loss(batch, unet=unet, text_encoder=text_encoder if te_training else None,
                                        embeddings=embeddings, token_ids=token_ids, parts=parts, config=config,
                                        device=device)
                    _stop_if_not_finite(loss, step=step, config=config)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
                        norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                        if norm is not None and accelerator.scaler is None:  # (fp16's scaler skips such steps)
                            # A finite loss can still give NaN gradients: never let them into the weights,
                            # or the next state saved would be a broken "last good state".
                            _stop_if_not_finite(norm, step=step, config=config, what="gradient norm")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                except OutOfMemoryError:
                    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
                    raise TrainingStopped(memory.out_of_memory_advice(config, peak_bytes=peak)) from None
            step_losses.append(loss.detach().item())
        # An optimizer step happened: the schedule, EMA and step counter advance once, never per micro-batch.
        lr_scheduler.step()
        if ema is not None:
            ema.step(accelerator.unwrap_model(unet).parameters())
        step += 1
        lr = lr_scheduler.get_last_lr()[0]
        history.add(step, sum(step_losses) / len(step_losses), lr)
        bar.update(1)
        bar.set_postfix(loss=f"{history.losses[-1]:.4f}", lr=f"{lr:.2e}")

        if te_training and _text_encoder_stopped(config, step):
            te_training = False
            _freeze(text_encoder)
            embeddings = _embed(token_ids, text_encoder, device)
        # Snapshot before state: a kill between the two then resumes from the earlier state and redoes both.
        if step in config.snapshot_steps or step == config.max_train_steps:
            if step == config.max_train_steps:  # a finished run is never trained again: its history goes first
                storage.write_json(out / "history.json", history.to_dict())
            save_snapshot(storage.snapshot_path(out, step), parts=parts, unet=accelerator.unwrap_model(unet),
                          text_encoder=accelerator.unwrap_model(text_encoder), ema=ema, config=config)
        if step % config.checkpointing_steps == 0 and step < config.max_train_steps:
            save_state(storage.state_path(out, step), step=step, history=history, config=config,
                       unet=accelerator.unwrap_model(unet), text_encoder=accelerator.unwrap_model(text_encoder),
                       optimizer=optimizer, lr_scheduler=lr_scheduler, accelerator=accelerator, ema=ema)
            storage.rotate_states(out, keep=config.checkpoints_total_limit)
        if on_step is not None:
            on_step(step, history.losses[-1], lr)
    bar.close()
    storage.write_json(out / "history.json", history.to_dict())
    del unet, text_encoder, optimizer, parts, prepared
    _free_memory()
    return final


# --- One batch and its loss -------------------------------------------------------------------------------
def make_batch(micro: int, *, config: TrainConfig, latents: list[LatentSource], folders: list[ImageFolder],
               num_timesteps: int):
    """Latents, noise, timesteps and prompt ids for micro-batch `micro`: instance samples, then class samples."""
    rows = []
    for stream, (source, folder) in enumerate(zip(latents, folders)):
        for position in range(micro * config.train_batch_size, (micro + 1) * config.train_batch_size):
            gen = sample_generator(config.seed, stream, position)
            index = item_index(config.seed, stream, position, len(folder))
            flip = config.random_flip and bool(torch.rand((), generator=gen) < 0.5)
            latent = source.sample(index, flip=flip, gen=gen)
            noise = torch.randn(latent.shape, generator=gen)
            if config.offset_noise:
                noise = noise + config.offset_noise * torch.randn((latent.shape[0], 1, 1), generator=gen)
            timestep = torch.randint(0, num_timesteps, (), generator=gen)
            rows.append((latent, noise, timestep, stream))
    latent, noise, timestep, stream = (torch.stack([torch.as_tensor(r[i]) for r in rows]) for i in range(4))
    return {"latents": latent, "noise": noise, "timesteps": timestep, "stream": stream}


def compute_loss(batch, *, unet, text_encoder, embeddings, token_ids, parts, config: TrainConfig, device):
    """Diffusion loss: instance MSE + prior_loss_weight × class MSE (each averaged over its own half)."""
    scheduler = parts.noise_scheduler
    timesteps = batch["timesteps"].to(device)
    latents, noise = batch["latents"].to(device), batch["noise"].to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    stream = batch["stream"].to(device)
    if text_encoder is not None:
        hidden = text_encoder(token_ids.to(device)[stream])[0]
    else:
        hidden = embeddings[stream]
    prediction = unet(noisy, timesteps, hidden).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if config.snr_gamma is not None:
        per_sample = per_sample * _min_snr_weights(scheduler, timesteps, config.snr_gamma)
    instance = per_sample[stream == INSTANCE].mean()
    if config.with_prior_preservation:
        return instance + config.prior_loss_weight * per_sample[stream == CLASS].mean()
    return instance


def _min_snr_weights(scheduler, timesteps, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weighting (Hang et al. 2023): down-weights the easy, low-noise timesteps."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights / snr


# --- Optimizer ------------------------------------------------------------------------------------------
def make_optimizer(groups, *, config: TrainConfig, device: torch.device):
    """AdamW, 8-bit from bitsandbytes when asked and it really runs here; else torch's with a warning."""
    kwargs = dict(betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                  eps=config.adam_epsilon)
    if config.use_8bit_adam:
        ok, why = bitsandbytes_works(device)
        if ok:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, **kwargs)
        print(f"Warning: 8-bit Adam is not available ({why}); using torch AdamW, which needs ≈6 bytes "
              "more per trained parameter. On a 16 GB GPU also turn on gradient checkpointing.")
    return torch.optim.AdamW(groups, **kwargs)


def bitsandbytes_works(device: torch.device) -> tuple[bool, str]:
    """Run one real 8-bit AdamW step: bitsandbytes can import and still fail at its first kernel call."""
    try:
        import bitsandbytes as bnb

        probe = torch.nn.Parameter(torch.zeros(4096, device=device))
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
        return True, "bitsandbytes works"
    except Exception as err:
        return False, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


# --- Saving and loading ---------------------------------------------------------------------------------
def save_snapshot(path: Path, *, parts: models.Components, unet, text_encoder, ema, config: TrainConfig) -> None:
    """An inference-ready pipeline (`StableDiffusionPipeline.from_pretrained(path)`), fp16 if training was."""
    from diffusers import StableDiffusionPipeline

    dtype = torch.float16 if config.mixed_precision != "no" else torch.float32
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    try:
        pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=text_encoder, tokenizer=parts.tokenizer,
                                       unet=unet, scheduler=parts.inference_scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        with storage.atomic_folder(path) as tmp:
            pipe.save_config(tmp)
            parts.tokenizer.save_pretrained(tmp / "tokenizer")
            parts.inference_scheduler.save_pretrained(tmp / "scheduler")
            _save_module(unet, tmp / "unet", dtype=dtype)
            _save_module(text_encoder, tmp / "text_encoder", dtype=dtype)
            _save_module(parts.vae, tmp / "vae", dtype=dtype)
    finally:
        if ema is not None:
            ema.restore(unet.parameters())


def _save_module(module, folder: Path, *, dtype: torch.dtype) -> None:
    """Config + safetensors weights cast tensor by tensor (no second copy of the model on the GPU)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    if hasattr(module, "save_config"):  # diffusers model
        module.save_config(folder)
        weights = "diffusion_pytorch_model.safetensors"
    else:  # transformers model
        module.config.save_pretrained(folder)
        weights = "model.safetensors"
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, folder / weights, metadata={"format": "pt"})


def save_state(path: Path, *, step: int, history: History, config: TrainConfig, unet, text_encoder, optimizer,
               lr_scheduler, accelerator, ema) -> None:
    """Everything needed to continue bit for bit; written atomically, then the marker last."""
    from safetensors.torch import save_file

    with storage.atomic_folder(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}, tmp / "unet.safetensors")
        if config.train_text_encoder:
            save_file({k: v.detach().cpu().contiguous() for k, v in text_encoder.state_dict().items()},
                      tmp / "text_encoder.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        if ema is not None:
            torch.save(ema.state_dict(), tmp / "ema.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        storage.write_json(tmp / storage.STATE_MARKER,
                           {"step": step, "history": history.to_dict(), "config": config.to_dict(),
                            "optimizer": type(getattr(optimizer, "optimizer", optimizer)).__name__})
    storage.write_json(Path(config.output_dir) / "history.json", history.to_dict())


def load_state(path: Path, *, parts, optimizer, lr_scheduler, accelerator, ema, config) -> tuple[int, History]:
    from safetensors.torch import load_file

    def load(name):  # weights_only: a state file can never execute code
        return torch.load(path / name, map_location="cpu", weights_only=True)

    meta = json.loads((path / storage.STATE_MARKER).read_text())
    parts.unet.load_state_dict(load_file(path / "unet.safetensors"))
    if (path / "text_encoder.safetensors").is_file():  # trained so far; it may be frozen from now on
        parts.text_encoder.load_state_dict(load_file(path / "text_encoder.safetensors"))
    saved, groups = load("optimizer.pt"), len(optimizer.param_groups)
    kind = type(getattr(optimizer, "optimizer", optimizer)).__name__
    if meta.get("optimizer", kind) != kind:  # e.g. 8-bit Adam turned on after running out of memory
        print(f"The optimizer changed ({meta['optimizer']} → {kind}): its moments start afresh; the weights, "
              "the schedule and the step count carry on.")
    else:
        if len(saved["param_groups"]) > groups:  # the text encoder's group is gone: keep the UNet's moments
            saved["param_groups"] = saved["param_groups"][:groups]
            kept = {i for group in saved["param_groups"] for i in group["params"]}
            saved["state"] = {i: v for i, v in saved["state"].items() if i in kept}
        optimizer.load_state_dict(saved)
    schedule = load("lr_scheduler.pt")
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        if isinstance(schedule.get(key), list):
            schedule[key] = schedule[key][:groups]
    lr_scheduler.load_state_dict(schedule)
    for group, lr in zip(optimizer.param_groups, lr_scheduler.get_last_lr()):
        group["lr"] = lr  # (already so, unless the optimizer's own state could not be loaded)
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(load("scaler.pt"))
    if ema is not None:
        ema.load_state_dict(load("ema.pt"))
    rng = load("rng.pt")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    history = meta["history"]
    return meta["step"], History(history["steps"], history["losses"], history["lrs"])


# --- Small helpers --------------------------------------------------------------------------------------
def _resume_source(config: TrainConfig) -> Path | None:
    """The state to resume from, after checking that it belongs to the same training."""
    out = Path(config.output_dir)
    if config.resume_from_checkpoint is None:
        if storage.list_states(out) or storage.list_snapshots(out):
            raise ConfigError(f"output_dir: {out} already holds a training run. Resume it with "
                              "resume_from_checkpoint='latest', choose a new output_dir, or delete the folder.")
        return None
    state = storage.latest_state(out) if config.resume_from_checkpoint == "latest" \
        else Path(config.resume_from_checkpoint)
    saved = out / "config.json"
    if saved.is_file() and (state is not None or storage.list_snapshots(out)):
        before = json.loads(saved.read_text())
        changed = sorted(k for k, v in config.to_dict().items()
                         if k not in _RESUMABLE_CHANGES and before.get(k) != v)
        if before.get("train_batch_size", 0) * before.get("gradient_accumulation_steps", 0) == \
                config.train_batch_size * config.gradient_accumulation_steps:  # same samples per step
            changed = [k for k in changed if k not in ("train_batch_size", "gradient_accumulation_steps")]
        if before.get("train_text_encoder") and not config.train_text_encoder:  # frozen as trained so far
            changed = [k for k in changed if k not in ("train_text_encoder", "text_encoder_learning_rate",
                                                       "stop_text_encoder_training")]
        if changed:
            raise ConfigError(f"output_dir: {out} holds a run with other settings ({', '.join(changed)} changed). "
                              "Choose a new output_dir for the new settings, or restore them to resume.")
    return state


def _new_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # A notebook trains several times in one kernel (sweeps, a changed setting): accelerate's state is a
    # process-wide singleton that refuses a new mixed-precision mode, so start from a clean one each run.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(mixed_precision=config.mixed_precision,
                       gradient_accumulation_steps=config.gradient_accumulation_steps)


def _model_key(config: TrainConfig) -> str:
    """Identifies the VAE that encoded a cached latent."""
    model = config.pretrained_model_name_or_path
    where = str(Path(model).resolve()) if models.is_local(model) else model
    return f"{where}@{config.revision}/{config.variant}"


def _text_encoder_stopped(config: TrainConfig, step: int) -> bool:
    return config.stop_text_encoder_training is not None and step >= config.stop_text_encoder_training


def _freeze(text_encoder) -> None:
    # Without gradients its parameters are skipped by AdamW (8-bit too): no update, no weight decay.
    text_encoder.requires_grad_(False)
    text_encoder.eval()


@torch.no_grad()
def _embed(token_ids, text_encoder, device) -> torch.Tensor:
    return text_encoder(token_ids.to(device))[0].float()


def _stop_if_not_finite(loss: torch.Tensor, *, step: int, config: TrainConfig, what: str = "loss") -> None:
    if torch.isfinite(loss):
        return
    last = storage.latest_state(config.output_dir)
    kept = f"The last good state is kept: {last}." if last else "No state had been saved yet."
    resume = "If your GPU supports bf16 (Ampere or newer), set mixed_precision='bf16' and run again: it " \
        "resumes from that state. Otherwise s" if config.mixed_precision == "fp16" else "S"
    raise TrainingStopped(f"The {what} became {loss.item()} at step {step + 1}: training diverged. {kept} "
                          f"{resume}tart a new run with a lower learning_rate (now {config.learning_rate:g}) in a "
                          "new output_dir, and check the photos.")


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
