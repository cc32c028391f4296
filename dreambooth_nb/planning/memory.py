"""Memory and disk arithmetic: what a run will write and where, and which memory saver to turn on next.

The numbers are the ones in the project notes for SD 1.5: fp32 master weights and gradients take
4 + 4 bytes per trained parameter; AdamW adds 8 bytes (32-bit) or ≈2 bytes (8-bit bitsandbytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dreambooth_nb.units import disk_size, gib
from dreambooth_nb.config import PRESETS, lr_label
from dreambooth_nb.dataset.classes import class_images
from dreambooth_nb.model.loading import parameter_counts
from dreambooth_nb.model.methods import method_for
from dreambooth_nb.storage import write_json

# Bytes of optimizer state per trained parameter.
ADAMW_BYTES = 8.0
ADAMW_8BIT_BYTES = 2.03  # two uint8 moments + a float32 absmax per 256-element block; tensors under 4096 elements stay 32-bit
PNG_BYTES_PER_PIXEL = 1.6  # a generated 512 px class image is ≈420 KB as PNG (measured on SD 1.5 renders)
DEFAULT_CHECKPOINTING = 100  # steps between states when the disk allows it
DISK_MARGIN = 0.05  # of the free space, never planned: logs, rounding, other writers
DRIVE_MARGIN = 0.20  # on Google Drive: its quota is shared with Gmail and Google Photos, which keep growing,
# and a quota reached mid-save drops that save; a free 15 GB Drive so plans at most 12 GB


@dataclass
class RunSizes:
    """Parameter counts of the run's model: what its states and snapshots are made of."""

    total: int
    """The base model's parameters: denoiser, text encoder(s) and VAE (what a complete snapshot holds)."""
    trained: int
    """What the run trains: the denoiser (+ text encoders) for full fine-tuning, the adapters for LoRA."""


def run_sizes(config, *, base=None) -> RunSizes:
    """The base model's sizes from its configs (no weights are downloaded); `base`: the run's `BaseModel`."""
    counts = parameter_counts(config, base=base)
    trained = counts.pop("trained")
    return RunSizes(total=sum(counts.values()), trained=trained)


def state_bytes(config, *, trained_params: int) -> int:
    """Size of one training state on disk: fp32 trained weights, optimizer state, EMA copy."""
    per_param = 4 + (ADAMW_8BIT_BYTES if config.use_8bit_adam else ADAMW_BYTES) + (4 if config.use_ema else 0)
    return int(trained_params * per_param)


def _weight_bytes(config) -> int:
    """Bytes per weight in a snapshot: fp16 unless training ran in full precision."""
    return 4 if config.mixed_precision == "no" else 2


def snapshot_bytes(config, *, sizes: RunSizes, complete: bool) -> int:
    """What the method's snapshot holds (`Method.snapshot_bytes`): an intermediate one the trained parts, the
    final one the complete pipeline; a LoRA snapshot (every one) its adapters, twice (diffusers' and kohya's)."""
    return method_for(config).snapshot_bytes(trained=sizes.trained, total=sizes.total, complete=complete,
                                             weight_bytes=_weight_bytes(config))


def class_image_bytes(config, *, missing: int) -> int:
    return int(missing * config.resolution**2 * PNG_BYTES_PER_PIXEL)


@dataclass
class DiskPlan:
    """What a run will write into its output folder, when, and whether it fits the free space."""

    checkpointing_steps: int | None
    """The interval between training states (None: no state before the end)."""
    state_steps: list[int]
    peak_bytes: int
    """The most the run's new files occupy at one time (on Drive the deleted ones count: see `trash_counts`)."""
    free_bytes: int | None
    trash_counts: bool
    """Deleted files still count against the quota (Colab's Google Drive: they sit in Drive's Trash)."""
    items: list[tuple[str, int]] = field(default_factory=list)
    """(what, bytes) of every file group the run writes, in order."""
    trash_bytes: int = 0
    """Bytes of states this run deletes; on Drive they stay in the Trash and count for 30 days."""
    where: str = ""

    @property
    def margin(self) -> float:
        return DRIVE_MARGIN if self.trash_counts else DISK_MARGIN

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.peak_bytes <= self.free_bytes * (1 - self.margin)

    def lines(self) -> list[str]:
        return [f"  {what}: {disk_size(size)}" for what, size in self.items]

    def summary(self) -> str:
        every = f"every {self.checkpointing_steps} steps" if self.checkpointing_steps else "none before the end"
        free = f" of {disk_size(self.free_bytes)} free" if self.free_bytes is not None else ""
        text = [f"Disk plan for {self.where}: at most {disk_size(self.peak_bytes)}{free}; training states {every} "
                f"(a disconnect loses at most {self.checkpointing_steps or 'all the'} steps)."]
        if self.trash_counts and self.trash_bytes:
            text.append(f"  Deleted states go to Google Drive's Trash and still count against your quota for "
                        f"30 days: this run puts {disk_size(self.trash_bytes)} there (included above).")
        return "\n".join(text)

    def refusal(self) -> str:
        free = disk_size(self.free_bytes) if self.free_bytes is not None else "?"
        advice = ("Free some space (on Google Drive: also empty the Trash at drive.google.com/drive/trash — "
                  "deleted files keep counting against the quota there), save fewer snapshot_steps, or choose "
                  "another output_dir." if self.trash_counts else
                  "Free some space, save fewer snapshot_steps, lower checkpoints_total_limit, or choose "
                  "another output_dir.")
        return (f"Not enough disk space in {self.where}: this run writes up to {disk_size(self.peak_bytes)} and only "
                f"{free} are free (keeping {self.margin:.0%} spare). The plan:\n" + "\n".join(self.lines()) +
                f"\n{advice}")

    def trash_note(self) -> str:
        return (f"This run deleted {disk_size(self.trash_bytes)} of old training states. On Google Drive they stay in "
                "the Trash for 30 days and count against your quota until then: empty it at "
                "drive.google.com/drive/trash to get the space back now.")


def disk_plan(config, *, sizes: RunSizes, start_step: int = 0, free_bytes: int | None = None,
              trash_counts: bool = False, missing_class_images: int | None = None) -> DiskPlan:
    """The disk plan of `config`: its `checkpointing_steps`, or (None) the most frequent states that fit.

    Simulates the run from `start_step`: a snapshot at each snapshot step (the final one complete), a state
    every `checkpointing_steps` steps, the oldest states deleted beyond `checkpoints_total_limit` — after
    the new one is complete, so both exist for a while. Where deletions do not free space (`trash_counts`:
    Google Drive keeps deleted files in its Trash, counted against the quota for 30 days — Google Drive
    Help, "How storage works in Google Drive": "Even items moved to Trash take up storage space", and
    "Delete and restore files": items in the bin are deleted forever after 30 days), every state written
    counts. Automatic checkpointing tries every 100 steps, then 200, ... and finally none before the end.
    """
    if missing_class_images is None:
        missing_class_images = _missing_class_images(config)
    candidates = [config.checkpointing_steps] if config.checkpointing_steps else \
        [k for k in range(DEFAULT_CHECKPOINTING, config.max_train_steps, DEFAULT_CHECKPOINTING)] + [None]
    plan = None
    for interval in candidates:
        plan = _simulate(config, sizes=sizes, interval=interval, start_step=start_step, free_bytes=free_bytes,
                         trash_counts=trash_counts, missing_class_images=missing_class_images)
        if plan.fits:
            break
    return plan


def _simulate(config, *, sizes, interval, start_step, free_bytes, trash_counts, missing_class_images) -> DiskPlan:
    state = state_bytes(config, trained_params=sizes.trained)
    items = []
    used = peak = trash = 0
    if missing_class_images:
        used = peak = class_image_bytes(config, missing=missing_class_images)
        folders = ", ".join(sorted({s.class_data_dir for s in config.concepts if s.class_data_dir}))
        items.append((f"{missing_class_images} class images (in {folders})", used))
    kept: list[int] = []
    state_steps = []
    snapshot_steps = sorted({s for s in config.snapshot_steps if s > start_step} | {config.max_train_steps})
    events = sorted(set(snapshot_steps) | ({s for s in range(start_step + 1, config.max_train_steps)
                                            if interval and s % interval == 0}))
    method = method_for(config)
    for step in events:
        if step in snapshot_steps:
            complete = step == config.max_train_steps and method.final_snapshot_complete
            size = snapshot_bytes(config, sizes=sizes, complete=complete)
            what = method.snapshot_contents(complete=complete)
            items.append((f"snapshot of step {step} ({what})", size))
            used += size
            peak = max(peak, used)
        if interval and step % interval == 0 and step < config.max_train_steps:
            items.append((f"training state of step {step}", state))
            state_steps.append(step)
            kept.append(step)
            used += state
            peak = max(peak, used)
            limit = config.checkpoints_total_limit
            while limit is not None and len(kept) > limit:
                kept.pop(0)
                trash += state
                if not trash_counts:
                    used -= state
    return DiskPlan(checkpointing_steps=interval, state_steps=state_steps, peak_bytes=peak, free_bytes=free_bytes,
                    trash_counts=trash_counts, items=items, trash_bytes=trash, where=str(config.output_dir))


def _missing_class_images(config) -> int:
    """Class images still to generate, all subjects together (a folder two subjects share counted once)."""
    if not config.with_prior_preservation:
        return 0
    missing: dict[str, int] = {}
    for subject in config.concepts:
        if subject.class_data_dir:
            count = len(class_images(subject, resolution=config.resolution, decode=False).to_generate)
            missing[subject.class_data_dir] = max(count, missing.get(subject.class_data_dir, 0))
    return sum(missing.values())


# --- Out of memory ------------------------------------------------------------------------------------
OUT_OF_MEMORY, CUDA_ERROR = "out of memory", "CUDA error"
OUT_OF_MEMORY_FILE = "out-of-memory.json"
# Allocation failures that reach Python as a plain RuntimeError (cuBLAS and cuDNN allocate their workspaces
# outside PyTorch's allocator, and report running out near the limit in their own words).
_ALLOCATION_FAILURES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                        "cudaErrorMemoryAllocation", "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")
_CUDA_FAILURES = ("CUDA error", "CUDA driver error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "NCCL error",
                  "CUDA kernel errors", "no kernel image is available")


def cuda_failure(error: BaseException) -> str | None:
    """OUT_OF_MEMORY, CUDA_ERROR (another failure of the GPU or its libraries), or None (not the GPU's)."""
    import torch

    if isinstance(error, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return OUT_OF_MEMORY
    if not isinstance(error, RuntimeError):
        return None
    text = str(error)
    if any(marker in text for marker in _CUDA_FAILURES + ("CUDA out of memory",)) \
            and any(marker in text for marker in _ALLOCATION_FAILURES):
        return OUT_OF_MEMORY
    if any(marker in text for marker in _CUDA_FAILURES):
        return CUDA_ERROR
    return None


def cuda_error_advice(error: BaseException, *, stage: str) -> str:
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return (f"A CUDA error stopped training while {stage}: {first}. Saved states and snapshots are intact. The GPU "
            "may be unusable in this session after such an error: restart it (Colab: Runtime > Restart session; "
            "Kaggle: Run > Restart & clear cell outputs), then run training again; it resumes from the last "
            "saved state.")


def record_out_of_memory(config) -> None:
    """Note in the run's folder the settings that ran out of memory on this GPU (`OUT_OF_MEMORY_FILE`): the
    fit of this run then only chooses settings planned below them (`fitting.fit_report`), so pressing Train
    again never repeats what just failed. Best effort: a full disk must not hide the advice."""
    import torch

    if not torch.cuda.is_available():
        return
    props = torch.cuda.get_device_properties(0)
    try:
        write_json(Path(config.output_dir) / OUT_OF_MEMORY_FILE,
                   {"gpu": props.name, "total_bytes": props.total_memory, "config": config.to_dict()})
    except OSError:
        pass


def out_of_memory_record(output_dir) -> dict | None:
    """{"gpu": name, "total_bytes": its memory, "config": the settings that ran out of memory} of a run, or None."""
    import json

    path = Path(output_dir) / OUT_OF_MEMORY_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Saver:
    """A memory saver to turn on: the settings it changes, and why (what it saves, what it costs)."""

    changes: dict
    why: str
    alternative: str = ""
    """Another way to the same saving, said after it ("or use_ema=False")."""

    @property
    def changes_method(self) -> bool:
        """Whether it changes what is trained (a new run), not only how (a saver a run may resume with)."""
        return "method" in self.changes

    def __str__(self) -> str:
        settings = " with ".join(f"{name}={_setting(value)}" for name, value in self.changes.items())
        return f"{settings} ({self.why})" + (f", {self.alternative}" if self.alternative else "")


def _setting(value) -> str:
    """A setting as it is typed: 'lora', True, 4, 1e-4."""
    if isinstance(value, float):
        return lr_label(value)
    return repr(value)


def next_memory_saver(config) -> Saver | None:
    """The next memory saver to enable, in order of cost to quality and speed (cheapest first)."""
    if not config.gradient_checkpointing:
        return Saver({"gradient_checkpointing": True}, "≈6× less activation memory, ~30 % slower")
    if not config.use_8bit_adam:
        return Saver({"use_8bit_adam": True}, "saves ≈5 GB of optimizer state on SD 1.5")
    if not config.cache_latents:
        return Saver({"cache_latents": True}, "the VAE leaves the GPU after encoding the photos once")
    if config.use_ema and not config.offload_ema:
        return Saver({"offload_ema": True}, "the EMA copy of the UNet moves to host memory: 3.44 GB on SD 1.5",
                     alternative="or use_ema=False")
    if config.train_batch_size > 1:
        return Saver({"train_batch_size": 1,
                      "gradient_accumulation_steps": config.train_batch_size * config.gradient_accumulation_steps},
                     "same effective batch")
    if config.stop_when == "suggested":
        return Saver({"stop_when": "end"}, "no snapshot's pipeline beside training; notebook 4 measures the "
                     "snapshots after it and suggests the same one")
    if config.train_text_encoder:
        return Saver({"train_text_encoder": False}, "saves ≈1 GB; quality drops a little")
    method = method_for(config)
    if method.frozen_base and not config.load_in_4bit:
        return Saver({"load_in_4bit": True}, "the frozen base in 4 bits (NF4, QLoRA): about a quarter of its "
                     "16-bit memory, slower steps")
    lighter = method.lighter
    if lighter:  # (the lighter method's preset rate: LoRA trains at ≈50× full fine-tuning's)
        return Saver({"method": lighter, "learning_rate": PRESETS[lighter]["learning_rate"]},
                     "trains ≈0.8 M adapter weights instead of 860 M")
    return None


def out_of_memory_advice(config, *, peak_bytes: int | None, stage: str = "training",
                         adam_fallback: str | None = None, planned_bytes: int | None = None) -> str:
    peak = f"peak {gib(peak_bytes, digits=1)} GiB allocated" if peak_bytes else "peak unknown"
    if planned_bytes:
        peak += f"; the memory plan expected {gib(planned_bytes, digits=1)} GiB at the peak"
    if adam_fallback:
        # 8-bit Adam was on in the config but could not run: the ≈5 GB it saves was never saved.
        advice = (f"8-bit Adam could not run here ({adam_fallback}), so 32-bit AdamW was used and needs ≈6 bytes "
                  "more per trained parameter: fix bitsandbytes (on Colab: Runtime > Restart session, then run "
                  "the notebook again) or turn on the next saver. ")
        saver = next_memory_saver(config)  # (8-bit Adam counts as on: turning it on again would not help)
        advice += f"Next saver: {saver}." if saver else ""
        return f"The GPU ran out of memory while {stage} ({peak}). {advice}".strip()
    saver = next_memory_saver(config)
    if saver is None:
        advice = "Every memory saver is already on; lower resolution or use a GPU with more memory."
    elif saver.changes_method:
        advice = (f"Every memory saver is already on. Train a LoRA instead: {saver}, as a new run in a new "
                  "output_dir (a LoRA cannot continue a full fine-tuning run).")
    else:
        advice = f"Turn on {saver} and run training again; it resumes from the last saved state."
    return f"The GPU ran out of memory while {stage} ({peak}). {advice}"
