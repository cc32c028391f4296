"""The Dreambooth training loop: one function, `train(config)`, readable top to bottom.

    photos → latents (cached or per step) → noise at a random timestep → the denoiser predicts the noise
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

from dreambooth_nb.units import gib
from dreambooth_nb import storage
from dreambooth_nb.config import TrainConfig, changed_settings
from dreambooth_nb.errors import ConfigError, TrainingStopped
from dreambooth_nb.model import loading, snapshots
from dreambooth_nb.model.base import BaseModel
from dreambooth_nb.model.methods import method_for
from dreambooth_nb.planning import memory, planner
from dreambooth_nb.progress import report
from dreambooth_nb.training import distributed
from dreambooth_nb.training.data import TrainingData
from dreambooth_nb.training.ema import make_ema, step_ema, trained_names
from dreambooth_nb.training.priors import generate_class_images, reference_images, render_reference_images
from dreambooth_nb.training.prompts import Prompts
from dreambooth_nb.training.validation import MAX_IMAGES, Validation


OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class History:
    """What the notebook plots: one entry per optimizer step, and the validation loss at each snapshot."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    """{"step", "fit", "prior"} per snapshot (`validation.py`); "prior" is absent without a class prompt."""

    def add(self, step: int, loss: float, lr: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        self.lrs.append(lr)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "losses": self.losses, "lrs": self.lrs, "validation": self.validation}

    @classmethod
    def from_dict(cls, data: dict) -> "History":
        return cls(data["steps"], data["losses"], data["lrs"], data.get("validation", []))


@dataclass
class Progress:
    """Where a run is, for the messages it stops with: what it was doing, and which optimizer runs."""

    stage: str = "starting"
    step: int = 0
    optimizer: str | None = None
    """Set when 8-bit Adam was asked for but could not run: why (the out-of-memory advice says so)."""
    planned_gpu_bytes: int | None = None
    """The memory plan's peak allocation, for the out-of-memory message to compare with."""


def train(config: TrainConfig, *, num_processes: int | None = None, on_step=None, on_validation=None,
          on_snapshot=None, progress_bar: bool = True) -> Path:
    """Run (or resume, or skip if finished) the training described by `config`.

    `num_processes`: data-parallel processes, one per GPU; None means every visible GPU (one on Colab), and
    several are launched as fresh processes (`distributed.py`).
    `on_step(step, loss, lr)` is called after every optimizer step (the notebook's live plot),
    `on_validation(step, losses)` at every snapshot with the validation losses (`validation.py`);
    `on_snapshot(step, snapshot)` after every snapshot is saved may stop the run: it returns None, or (the step
    of the snapshot to keep, why) — `results.early_stop` measures the snapshots for `stop_when="suggested"`.
    `progress_bar=False` leaves progress to them (the training panel has its own bar).
    Returns the folder of the final snapshot (of a run stopped early: the one it kept).
    """
    problem = loading.gpu_problem()  # (a torch without kernels for this GPU fails at its first launch otherwise)
    if problem:
        raise TrainingStopped(problem)
    if not distributed.in_worker():
        processes = distributed.visible_gpus() if num_processes is None else num_processes
        if processes != config.num_processes:
            config = distributed.for_processes(config, processes)
        if config.num_processes > 1:
            if on_snapshot is not None:
                raise ConfigError("stop_when: stopping at the suggested snapshot measures each snapshot in the "
                                  "training process, which is one GPU's for now; train on one GPU "
                                  "(num_processes=1, the panel's GPUs choice) or set stop_when='end'.")
            return distributed.launch(config, on_step=on_step, on_validation=on_validation)
    progress = Progress()
    try:
        final = _train(config, on_step=on_step, on_validation=on_validation, on_snapshot=on_snapshot,
                       progress_bar=progress_bar, progress=progress)
    except (OutOfMemoryError, RuntimeError) as error:
        failure = memory.cuda_failure(error)
        if failure is None:  # a bug, not the GPU: its traceback, untouched
            raise
        # Anywhere: loading, EMA, `prepare`, encoding the photos, a step, a save. The same advice, and the
        # memory freed, so that the advised rerun in the same notebook kernel starts from an empty GPU.
        _drop_frames(error)
        if failure == memory.OUT_OF_MEMORY:
            peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
            memory.record_out_of_memory(config)  # so that fitting this run again never chooses as much
            final = TrainingStopped(memory.out_of_memory_advice(
                config, peak_bytes=peak, stage=progress.stage, adam_fallback=progress.optimizer,
                planned_bytes=progress.planned_gpu_bytes))
        else:
            final = TrainingStopped(memory.cuda_error_advice(error, stage=progress.stage))
    except (TrainingStopped, KeyboardInterrupt) as stop:
        _drop_frames(stop)
        _free_memory()
        raise
    # Everything the run built goes now, not at some later garbage collection: accelerate's wrapped
    # `forward`s and the fp16 scaler's closures point back at the models, so a sweep's next run would
    # otherwise start with the last one's UNet and optimizer still on the GPU.
    _free_memory()
    if isinstance(final, TrainingStopped):
        raise final from None
    return final


STOPPED_FILE = "stopped.json"
"""Written when a run stopped at its suggested snapshot (`stop_when`): the step it stopped at, the step it kept,
why. Training it again with stop_when="suggested" returns that snapshot; with "end" it resumes and goes on."""


def stopped_early(output_dir) -> dict | None:
    """{"step", "kept", "why"} of a run that stopped early, or None."""
    path = Path(output_dir) / STOPPED_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    storage.check_format(data, source=str(path), what="Delete it to train the run on.")
    return data


def _drop_frames(error: BaseException | None) -> None:
    """The traceback holds the loop's frames, and in them the models, the optimizer and the last activations.
    A notebook keeps the last exception, so a rerun with the advised setting would find the GPU still full:
    clear those frames (the message says it all; the stack adds nothing)."""
    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def _train(config: TrainConfig, *, on_step, on_validation, on_snapshot=None, progress_bar: bool,
           progress: Progress) -> Path:
    config.validate()
    out = Path(config.output_dir)
    precision = loading.resolve_precision(config.mixed_precision, loading.default_device())
    base = BaseModel.of(config)  # the base model, looked up once for the whole run
    accelerator = _new_accelerator(config, precision=precision)  # (with several processes: the process group)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if main:  # one writer: every file of the run is written by rank 0 while the others wait
        out.mkdir(parents=True, exist_ok=True)
        for leftover in storage.remove_partial(out):
            print(f"Removed {leftover.name}: an incomplete save from an interrupted run.")
    accelerator.wait_for_everyone()
    resume_from = _resume_source(config)
    final = storage.snapshot_path(out, config.max_train_steps)
    if snapshots.is_snapshot(final):
        print(f"Training already finished: {final}")
        return final
    stopped = stopped_early(out) if config.stop_when == "suggested" else None
    if stopped is not None:
        print(f"Training stopped early at step {stopped['step']}: {stopped['why']}")
        return storage.snapshot_path(out, stopped["kept"])

    method = method_for(config)
    method.check(base.family)  # e.g. full fine-tuning of SDXL: refused before any download
    base.family.check(config)  # what the family cannot train (e.g. min-SNR weighting of a flow)
    loading.check_4bit(config, device=accelerator.device)

    # --- Before anything is downloaded or encoded: will what this run writes fit the disk?
    start_step = json.loads((resume_from / storage.STATE_MARKER).read_text())["step"] if resume_from else 0
    disk = memory.disk_plan(config, sizes=memory.run_sizes(config, base=base), start_step=start_step,
                            free_bytes=storage.free_bytes(out), trash_counts=storage.deletes_go_to_trash(out))
    if not disk.fits:
        raise TrainingStopped(disk.refusal())
    print(disk.summary())
    checkpointing_steps = disk.checkpointing_steps
    _check_memory(config, device=accelerator.device, progress=progress)

    reference = []
    if config.with_prior_preservation:
        progress.stage = "generating the class images"
        generate_class_images(config, shard=(rank, world), device=accelerator.device)  # each rank its share
        accelerator.wait_for_everyone()
    else:  # the class as the base model draws it, for the prior validation loss: each rank renders its share

        progress.stage = "rendering the validation images"
        render_reference_images(config, shard=(rank, world), device=accelerator.device)
        accelerator.wait_for_everyone()
        reference = reference_images(config) if main else []

    # --- Data: images loaded (and checked) before any step, so a bad photo never stops training midway; before
    # the model, so an automatic subject mask's segmenter never shares the GPU with it. (Each process masks the
    # photos it lacks masks for; the first to finish caches them for the others and for every later run.)
    progress.stage = "loading the photos"
    data = TrainingData.load(config, reference=reference, device=accelerator.device)

    progress.stage = "loading the model"
    device = accelerator.device
    # Frozen text encoders encode every prompt before the denoiser loads, so the two never share the GPU
    # (SD3's T5-XXL is 9.5 GB in fp16, its transformer 4.5 GB: together more than a T4 holds).
    encode_first = not config.train_text_encoder
    parts = loading.load_components(config, device=device, precision=precision, method=method, base=base,
                                    with_denoiser=not encode_first)
    loading.enable_tf32(device)

    progress.stage = "encoding the photos"
    for warning in data.long_prompts(parts.tokenizers, limits=parts.family.tokens_read(parts.tokenizers)):
        print(f"Warning: {warning}")
    data.encode(vae=parts.vae, config=config, device=device, dtype=loading.weight_dtype(precision, device),
                model_key=_model_key(config, base=base))
    if config.cache_latents:
        _off_the_gpu(parts.vae)  # kept in host memory for the final snapshot; the GPU memory goes to training
    prompts = Prompts(data.texts, family=parts.family, tokenizers=parts.tokenizers)
    if encode_first:
        progress.stage = "encoding the prompts"
        # A LoRA's snapshots never hold the encoders: they go now (no copy in host memory); a full fine-tuning
        # run keeps them in host memory for its final, complete snapshot.
        keep = method.final_snapshot_complete
        prompts.encode_once(parts.text_encoders, device=device, keep=keep)
        if not keep:
            parts.release_text_encoders()
            _free_memory()
        progress.stage = "loading the model"
        loading.load_denoiser(parts, config, device=device, precision=precision, method=method, base=base)
    attention = loading.set_attention(parts.denoiser, backend=config.attention_backend, device=device)
    trained = method.setup(parts)  # which parameters train: whole parts, or LoRA adapters on them
    if config.gradient_checkpointing:
        loading.enable_gradient_checkpointing(parts, train_text_encoder=config.train_text_encoder)
    validation = Validation(pairs=data.validation_pairs(count=MAX_IMAGES), prompts=prompts, family=parts.family,
                            scheduler=parts.noise_scheduler, seed=config.seed, resolution=config.resolution)

    # --- Optimizer over the trained parts, one named group each with its own learning rate.
    progress.stage = "setting up the optimizer"
    groups = [{"name": name, "params": [p for p in module.parameters() if p.requires_grad],
               "lr": config.learning_rate if name == parts.family.denoiser
               else config.text_encoder_learning_rate or config.learning_rate}
              for name, module in trained.items()]
    optimizer, _ = make_optimizer(groups, config=config, device=device)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.max_train_steps)
    ema = make_ema(parts.denoiser, config=config, device=device)

    # --- Resume: weights, optimizer (8-bit state included), schedule, scaler, EMA, RNG, step, history.
    step, history = 0, History()
    if resume_from is not None:
        progress.stage = "loading the saved state"
        step, history = load_state(resume_from, parts=parts, method=method, optimizer=optimizer,
                                   lr_scheduler=lr_scheduler, accelerator=accelerator, ema=ema, config=config)
        print(f"Resuming from {resume_from.name}: step {step} of {config.max_train_steps}.")
    if main:
        config.to_json(out / "config.json")

    progress.stage = "preparing the models"
    prepared = {}
    for name, module in trained.items():
        # DDP searches each step for parameters without a gradient only in the parts that have some
        # (`Family.encoders_with_unused_parts`); elsewhere the search is a wasted pass, and DDP warns about it.
        accelerator.ddp_handler.find_unused_parameters = name in parts.family.encoders_with_unused_parts
        prepared[name] = accelerator.prepare(module)
    optimizer = accelerator.prepare(optimizer)
    denoiser = prepared[parts.family.denoiser]
    encoders = [prepared.get(name, getattr(parts, name)) for name in parts.family.text_encoders
                if name in prepared or getattr(parts, name) is not None]  # (a LoRA's frozen ones are gone)
    # Outside the training step (validation, encoding once frozen) only the plain modules: a DDP-wrapped
    # forward is a collective, and rank 0 alone measuring the validation loss through one would wait forever.
    plain_encoders = [accelerator.unwrap_model(encoder) for encoder in encoders]
    te_training = config.train_text_encoder and not _text_encoder_stopped(config, step)
    if te_training:
        for encoder in encoders:  # also what makes their checkpointing act (transformers checks `training`)
            encoder.train()
    elif not prompts.encoded:  # the text encoders trained until a resumed run's stop step: every prompt once now
        prompts.encode_once(plain_encoders, device=device)

    states = f"a state every {checkpointing_steps} steps" if checkpointing_steps else "no state before the end"
    if world > 1:
        states += f"; {world} processes, effective batch {config.effective_batch}"
    print(f"Training {_count(trained):,} parameters ({method.name}, {parts.family.name}) on {device} ({attention} "
          f"attention, {type(optimizer.optimizer).__name__}, mixed precision {precision}); {states}.")
    denoiser.train()
    micro_per_step = config.gradient_accumulation_steps
    # (`disable` only when asked: passing False would override TQDM_DISABLE, which tests and CI set)
    bar = tqdm(total=config.max_train_steps, initial=step, desc="Training", **({} if progress_bar else {"disable": True}))
    stopping = None
    while step < config.max_train_steps:
        progress.stage, progress.step = "training", step + 1
        step_losses = []
        for micro in range(step * micro_per_step, (step + 1) * micro_per_step):
            with accelerator.accumulate(*([denoiser, *encoders] if te_training else [denoiser])):
                batch = data.batch(micro, config=config, rank=rank, world=world,
                                   draw=lambda gen: parts.family.objective.draw(gen, parts.noise_scheduler))
                loss = compute_loss(batch, denoiser=denoiser, family=parts.family, prompts=prompts,
                                    encoders=encoders if te_training else None, scheduler=parts.noise_scheduler,
                                    config=config, device=device)
                _stop_if_not_finite(loss, step=step, config=config)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    params = [p for m in (denoiser, *encoders) for p in m.parameters() if p.requires_grad]
                    norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    if norm is not None and accelerator.scaler is None:  # (fp16's scaler skips such steps)
                        # A finite loss can still give NaN gradients: never let them into the weights,
                        # or the next state saved would be a broken "last good state".
                        _stop_if_not_finite(norm, step=step, config=config, what="gradient norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_losses.append(loss.detach().item())
        # An optimizer step happened: the schedule, EMA and step counter advance once, never per micro-batch.
        lr_scheduler.step()
        if ema is not None:
            step_ema(ema, accelerator.unwrap_model(denoiser), config=config, device=device)
        step += 1
        lr = lr_scheduler.get_last_lr()[0]
        history.add(step, sum(step_losses) / len(step_losses), lr)
        bar.update(1)
        bar.set_postfix(loss=f"{history.losses[-1]:.4f}", lr=f"{lr:.2e}")

        if te_training and _text_encoder_stopped(config, step):
            te_training = False
            for encoder in plain_encoders:
                _freeze(encoder)
            prompts.encode_once(plain_encoders, device=device)
        trained_now = {name: accelerator.unwrap_model(module) for name, module in prepared.items()}
        # Snapshot before state: a kill between the two then resumes from the earlier state and redoes both.
        if (step in config.snapshot_steps or step == config.max_train_steps) and main:
            progress.stage = f"measuring the validation loss of step {step}"
            losses = validation(trained_now[parts.family.denoiser], encoders=plain_encoders if te_training else None,
                                device=device,
                                autocast=accelerator.autocast)
            history.validation.append({"step": step, **losses})
            print(f"Step {step}: validation loss " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
            if on_validation is not None:
                on_validation(step, losses)
            progress.stage = f"saving the snapshot of step {step}"
            if step == config.max_train_steps:  # a finished run is never trained again: its history goes first
                storage.write_json(out / "history.json", history.to_dict())
            save_snapshot(storage.snapshot_path(out, step), step=step, parts=parts, method=method,
                          trained=trained_now, ema=ema, precision=precision)
            if on_snapshot is not None and step < config.max_train_steps:
                progress.stage = f"measuring the snapshot of step {step}"
                stopping = on_snapshot(step, storage.snapshot_path(out, step))
        if checkpointing_steps and step % checkpointing_steps == 0 and step < config.max_train_steps:
            progress.stage = f"saving the training state of step {step}"
            rng = gather_rng(accelerator)  # every rank's generators (a collective: all ranks take part)
            if main:
                save_state(storage.state_path(out, step), step=step, history=history, config=config, method=method,
                           trained=trained_now, denoiser=parts.family.denoiser, optimizer=optimizer,
                           lr_scheduler=lr_scheduler, accelerator=accelerator, ema=ema, rng=rng)
                storage.rotate_states(out, keep=config.checkpoints_total_limit)
        accelerator.wait_for_everyone()
        if on_step is not None and main:
            on_step(step, history.losses[-1], lr)
        report("training", step, config.max_train_steps)  # (a panel's Stop ends the run here, a state kept)
        if stopping is not None:  # (`on_snapshot` said so: the snapshot to keep, and why)
            kept, why = stopping
            storage.write_json(out / "history.json", history.to_dict())
            storage.write_json(out / STOPPED_FILE, {"format": storage.FORMAT, "step": step, "kept": kept, "why": why})
            print(f"Stopped at step {step}: {why}")
            final = storage.snapshot_path(out, kept)
            break
    bar.close()
    if disk.trash_bytes and main:
        print(disk.trash_note())
    accelerator.free_memory()  # its references to the models and the optimizer; `train` collects the rest
    return final


# --- One batch's loss ------------------------------------------------------------------------------------
def compute_loss(batch, *, denoiser, family, prompts, encoders, scheduler, config: TrainConfig, device):
    """The family's objective (`model.objectives`): instance MSE + prior_loss_weight × class MSE (each averaged
    over its own half).

    `encoders` are the text encoders while they train (None once they are frozen: `prompts` then holds
    every prompt's encoding)."""
    objective = family.objective
    indices = batch["timesteps"].to(device)
    latents, noise = batch["latents"].to(device), batch["noise"].to(device)
    noisy, timesteps, target = objective.noisy_and_target(scheduler, latents, noise, indices)
    hidden, added = prompts.conditioning(batch, encoders=encoders, device=device, resolution=config.resolution)
    prediction = family.predict(denoiser, noisy, timesteps, hidden, added)
    mask_weights = batch["mask_weights"].to(device) if "mask_weights" in batch else None
    per_sample = per_sample_loss(prediction, target, mask_weights=mask_weights)
    weights = objective.weights(scheduler, indices, snr_gamma=config.snr_gamma)
    if weights is not None:
        per_sample = per_sample * weights
    prior = batch["is_prior"].to(device)
    instance = per_sample[~prior].mean()
    if config.with_prior_preservation:
        return instance + config.prior_loss_weight * per_sample[prior].mean()
    return instance


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, *, mask_weights: torch.Tensor | None = None):
    """Each sample's mean squared error; with `mask_weights` ((B, 1, h, w) on the latent grid, the same for every
    channel: `masked_loss`) each error weighted before the mean. Not renormalised by the weights' mean: a subject
    pixel then pulls exactly as hard as without a mask — the study's learning rates still hold for the subject —
    and only the background pulls less (renormalising would raise the subject's effective learning rate by
    1 / mean weight, ×2.7 for a subject filling a third of the photo: on the toy model that overfit within 150
    steps). A mask of ones is exactly the unmasked loss."""
    error = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if mask_weights is None:
        return error.mean(dim=(1, 2, 3))
    return (error * mask_weights).mean(dim=(1, 2, 3))


# --- Optimizer --------------------------------------------------------------------------------
def make_optimizer(groups, *, config: TrainConfig, device: torch.device):
    """AdamW, 8-bit from bitsandbytes when asked and it really runs here; else torch's with a warning.

    Returns (optimizer, why 8-bit Adam could not run — or None).
    """
    kwargs = dict(betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                  eps=config.adam_epsilon)
    why = None
    if config.use_8bit_adam:
        ok, why = loading.bitsandbytes_works(device)
        if ok:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, **kwargs), None
        print(f"Warning: 8-bit Adam is not available ({why}); using torch AdamW, which needs ≈6 bytes "
              "more per trained parameter. On a 16 GB GPU also turn on gradient checkpointing.")
    # Fused on CUDA: one kernel, no temporaries (the default foreach path builds an fp32 temporary per
    # trained tensor at the step: 3.2 GiB for SD 1.5's UNet).
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, **kwargs, **fused), why


# --- Saving and loading ---------------------------------------------------------------------------------
def save_snapshot(path: Path, *, step: int, parts: loading.Components, method, trained: dict, ema,
                  precision: str) -> None:
    """The trained weights of `step` (fp16 if training used mixed precision), as the method saves them.
    `trained`: the trained parts by name, unwrapped."""
    dtype = torch.float16 if precision != "no" else torch.float32
    weights = {name: method.saved_tensors(module) for name, module in trained.items()}
    weights[parts.family.denoiser] = _denoiser_weights(trained[parts.family.denoiser], ema, method=method)
    method.save_snapshot(path, step=step, parts=parts, weights=weights, dtype=dtype)


def _denoiser_weights(denoiser, ema, *, method) -> dict:
    """The denoiser's saved tensors by name, the EMA's where there is one: read in place, never a second full
    copy (`EMAModel.store` would make one in host memory: 3.44 GB for SD 1.5 on a 12.7 GB Colab VM)."""
    tensors = method.saved_tensors(denoiser)
    if ema is not None:
        tensors.update(zip(trained_names(denoiser), ema.shadow_params))
    return tensors


def save_state(path: Path, *, step: int, history: History, config: TrainConfig, method, trained: dict,
               denoiser: str, optimizer, lr_scheduler, accelerator, ema, rng: dict) -> None:
    """Everything needed to continue bit for bit; written atomically, then the marker last.

    Weights go out a shard at a time (`storage.save_weights`) and `torch.save` copies one tensor at a time
    to the host, so a save adds at most one shard to host memory, whatever the model's size.
    """
    with storage.atomic_folder(path) as tmp:
        for name, module in trained.items():  # the denoiser, then the text encoder(s) when trained
            storage.save_weights(method.saved_tensors(module), tmp, filename=f"{name}.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        if ema is not None:
            counters = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            storage.write_json(tmp / "ema.json", counters)
            storage.save_weights(dict(zip(trained_names(trained[denoiser]), ema.shadow_params)), tmp,
                                 filename="ema.safetensors")
        torch.save(rng, tmp / "rng.pt")
        storage.write_json(tmp / storage.STATE_MARKER,
                           {"format": storage.FORMAT, "step": step, "history": history.to_dict(),
                            "config": config.to_dict(),
                            "optimizer": type(getattr(optimizer, "optimizer", optimizer)).__name__})
    storage.write_json(Path(config.output_dir) / "history.json", history.to_dict())


def load_state(path: Path, *, parts, method, optimizer, lr_scheduler, accelerator, ema, config) -> tuple[int, History]:
    def load(name):  # weights_only: a state file can never execute code; mmap: no second copy in RAM
        return torch.load(path / name, map_location="cpu", weights_only=True, mmap=True)

    meta = json.loads((path / storage.STATE_MARKER).read_text())
    storage.check_format(meta, source=str(path), what="Delete that state folder, or train into a new output_dir.")
    _load_weights(parts.denoiser, path, f"{parts.family.denoiser}.safetensors",
                  expected=method.saved_tensors(parts.denoiser))
    for name in parts.family.text_encoders:  # trained so far; maybe frozen from now on
        if storage.weights_exist(path, filename=f"{name}.safetensors"):
            encoder = getattr(parts, name)
            _load_weights(encoder, path, f"{name}.safetensors", expected=method.saved_tensors(encoder))
    saved = load("optimizer.pt")
    kind = type(getattr(optimizer, "optimizer", optimizer)).__name__
    if meta.get("optimizer", kind) != kind:  # e.g. 8-bit Adam turned on after running out of memory
        print(f"The optimizer changed ({meta['optimizer']} → {kind}): its moments start afresh; the weights, "
              "the schedule and the step count carry on.")
    else:
        optimizer.load_state_dict(_matching_groups(saved, optimizer))
    groups = len(optimizer.param_groups)
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
        ema.load_state_dict(json.loads((path / "ema.json").read_text()))
        by_name = dict(zip(trained_names(parts.denoiser), ema.shadow_params))
        for shard in storage.load_weights(path, filename="ema.safetensors"):
            for name, tensor in shard.items():
                if name in by_name:
                    by_name[name].copy_(tensor)  # in place: the EMA stays where `make_ema` put it
    restore_rng(load("rng.pt"), rank=accelerator.process_index)
    history = meta["history"]
    return meta["step"], History.from_dict(history)


def gather_rng(accelerator) -> dict:
    """Every rank's random generators, for the state rank 0 saves: {"torch": [per rank], "cuda": [per rank]}.
    (The sample stream has its own generators; these serve what draws from the global ones: LoRA dropout.)"""
    mine = {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(accelerator.device) if accelerator.device.type == "cuda" else None}
    if accelerator.num_processes == 1:
        everyone = [mine]
    else:
        import torch.distributed as dist

        everyone = [None] * accelerator.num_processes
        dist.all_gather_object(everyone, mine)
    return {"torch": [r["torch"] for r in everyone], "cuda": [r["cuda"] for r in everyone if r["cuda"] is not None]}


def restore_rng(rng: dict, *, rank: int = 0) -> None:
    """The random generators as saved for this rank; a rank the saved run did not have (more processes now)
    takes rank 0's (a run saved on a 2-GPU Kaggle machine resumes on a 1-GPU Colab)."""
    torch.set_rng_state(rng["torch"][rank if rank < len(rng["torch"]) else 0])
    cuda_states = rng.get("cuda") or []
    if cuda_states and torch.cuda.is_available():  # one CUDA state per rank, for that rank's own device
        torch.cuda.set_rng_state(cuda_states[rank if rank < len(cuda_states) else 0], torch.cuda.current_device())


def _load_weights(module, folder: Path, filename: str, *, expected: dict) -> None:
    """Load saved weights shard by shard into `module`, checking that every `expected` tensor was there."""
    missing = set(expected)
    for shard in storage.load_weights(folder, filename=filename):
        module.load_state_dict(shard, strict=False)
        missing -= set(shard)
    if missing:
        raise TrainingStopped(f"{folder}: the saved state lacks {len(missing)} tensors of {filename} (e.g. "
                              f"{sorted(missing)[0]}). Delete that state folder; training resumes from an earlier one.")


def _matching_groups(saved: dict, optimizer) -> dict:
    """The saved optimizer state for the current groups, matched by name (a text encoder frozen since keeps
    the UNet's moments and drops its own)."""
    current = [group.get("name") for group in optimizer.param_groups]
    by_name = {group.get("name"): group for group in saved["param_groups"]}
    kept = [by_name[name] for name in current if name in by_name]
    if len(kept) != len(current):
        missing = [name for name in current if name not in by_name]
        raise TrainingStopped(f"The saved optimizer has no group {missing}: this state belongs to another "
                              "setting; choose a new output_dir.")
    ids = {i for group in kept for i in group["params"]}
    return {"param_groups": kept, "state": {i: v for i, v in saved["state"].items() if i in ids}}


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
        storage.check_format(before, source=str(saved), what="A run written then cannot be resumed by this version: "
                                                              "choose a new output_dir.")
        changed = changed_settings(before, config)
        if changed:
            raise ConfigError(f"output_dir: {out} holds a run with other settings ({', '.join(changed)} changed). "
                              "Choose a new output_dir for the new settings, or restore them to resume.")
    return state


def _check_memory(config: TrainConfig, *, device: torch.device, progress: Progress) -> None:
    """On a GPU, plan the memory of what will really run and refuse what will not fit. 8-bit Adam is probed
    first: where bitsandbytes cannot run, 32-bit AdamW will, and needs ≈6 bytes more per trained parameter
    (+5.2 GB for SD 1.5's UNet), so that is what is planned."""
    if config.use_8bit_adam:
        eight_bit, why = loading.bitsandbytes_works(device)
        progress.optimizer = None if eight_bit else why
    if device.type == "cuda":
        planned = config.replace(use_8bit_adam=False) if progress.optimizer else config
        _check_memory_plan(planned, progress=progress, adam_fallback=progress.optimizer)


def _check_memory_plan(config: TrainConfig, *, progress: Progress, adam_fallback: str | None = None) -> None:
    """Plan the GPU memory from the model's configs (no download) and refuse what will not fit. `config` is
    what will run: with 32-bit AdamW where 8-bit Adam was asked for but cannot run (`adam_fallback`: why)."""
    progress.stage = "planning the GPU memory"
    memory_plan = planner.plan(config)
    progress.planned_gpu_bytes = memory_plan.gpu_allocated_bytes
    print(f"Memory plan: {gib(memory_plan.gpu_required_bytes, digits=1)} GiB needed of "
          f"{gib(memory_plan.gpu_total_bytes, digits=1)} GiB on {memory_plan.gpu}"
          + (f" (with 32-bit AdamW: 8-bit Adam cannot run here, {adam_fallback})." if adam_fallback else "."))
    if not memory_plan.fits and config.check_memory_plan:
        fallback = (f"8-bit Adam cannot run here ({adam_fallback}), so 32-bit AdamW was planned: fix bitsandbytes "
                    "(on Colab: Runtime > Restart session) or turn on what the plan advises. ") if adam_fallback else ""
        raise TrainingStopped(f"These settings will not fit this GPU: {memory_plan!r}\n{fallback}Turn on what the "
                              "plan advises (To fit: …) and run training again, or set check_memory_plan=False to "
                              "train anyway.")


def _new_accelerator(config: TrainConfig, *, precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import AutocastKwargs, DistributedDataParallelKwargs, InitProcessGroupKwargs

    # A notebook trains several times in one kernel (sweeps, a changed setting): accelerate's state is a
    # process-wide singleton that refuses a new mixed-precision mode, so start from a clean one each run.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    # No autocast weight cache: it would keep an fp16 twin of every trained weight through each forward
    # (1.6 GiB for SD 1.5) and saves nothing here (each weight is cast once per forward; checkpointing
    # recasts it in the backward anyway). The memory planner counts the same way (planner.AUTOCAST_WEIGHT_CACHE).
    # Several processes: the gradients are views into DDP's all-reduce buckets, not a second fp32 copy of every
    # gradient beside them (DDP's default keeps both: +3.2 GiB per GPU for SD 1.5's UNet, which a T4 does not
    # have; the memory plan counts the same way). `find_unused_parameters` is set per part at `prepare`.
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=planner.DDP_BUCKET_VIEWS)
    # A rank that waits longer than this for another at a collective ends the run (`distributed.TIMEOUT`).
    group = InitProcessGroupKwargs(timeout=distributed.TIMEOUT)
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
                       kwargs_handlers=[AutocastKwargs(cache_enabled=False), ddp, group])


def _model_key(config: TrainConfig, *, base: BaseModel) -> str:
    """Identifies the VAE that encoded a cached latent (a single file: its converted folder, keyed by its content)."""
    where = str(Path(base.path).resolve()) if base.local else base.path
    return f"{where}@{config.revision}/{config.variant}"


def _count(trained: dict) -> int:
    return sum(loading.count_parameters(m, trainable_only=True) for m in trained.values())


def _text_encoder_stopped(config: TrainConfig, step: int) -> bool:
    return config.stop_text_encoder_training is not None and step >= config.stop_text_encoder_training


def _freeze(text_encoder) -> None:
    # Without gradients its parameters are skipped by AdamW (8-bit too): no update, no weight decay.
    text_encoder.requires_grad_(False)
    text_encoder.eval()


def _off_the_gpu(module) -> None:
    if next(module.parameters()).is_cuda:
        module.to("cpu")
        torch.cuda.empty_cache()


def _stop_if_not_finite(loss: torch.Tensor, *, step: int, config: TrainConfig, what: str = "loss") -> None:
    if torch.isfinite(loss):
        return
    last = storage.latest_state(config.output_dir)
    kept = f"The last good state is kept: {last}." if last else "No state had been saved yet."
    resume = "If your GPU supports bf16 (Ampere or newer), set mixed_precision='bf16' and run again: it " \
        "resumes from that state. Otherwise s" if config.mixed_precision in ("fp16", "auto") else "S"
    raise TrainingStopped(f"The {what} became {loss.item()} at step {step + 1}: training diverged. {kept} "
                          f"{resume}tart a new run with a lower learning_rate (now {config.learning_rate:g}) in a "
                          "new output_dir, and check the photos.")


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # after a device-side error the GPU refuses every call: nothing more to free
            pass
