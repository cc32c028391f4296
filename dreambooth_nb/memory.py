"""Memory and disk arithmetic: what a run will write, and which memory saver to turn on next.

The numbers are the ones in the project notes for SD 1.5: fp32 master weights and gradients take
4 + 4 bytes per trained parameter; AdamW adds 8 bytes (32-bit) or ≈2 bytes (8-bit bitsandbytes).
"""

from __future__ import annotations

# Bytes of optimizer state per trained parameter.
ADAMW_BYTES = 8.0
ADAMW_8BIT_BYTES = 2.03  # two uint8 moments + per-block absmax; tensors under 4096 elements stay 32-bit


def state_bytes(config, *, trained_params: int) -> int:
    """Size of one training state on disk: fp32 trained weights, optimizer state, EMA copy."""
    per_param = 4 + (ADAMW_8BIT_BYTES if config.use_8bit_adam else ADAMW_BYTES) + (4 if config.use_ema else 0)
    return int(trained_params * per_param)


def snapshot_bytes(config, *, total_params: int) -> int:
    """Size of one inference-ready snapshot: every component, fp16 when training used mixed precision."""
    return total_params * (2 if config.mixed_precision != "no" else 4)


def planned_disk_bytes(config, *, trained_params: int, total_params: int, start_step: int = 0) -> int:
    """What the rest of the run will write at most: the kept states plus every snapshot still to come."""
    remaining = range(start_step + 1, config.max_train_steps + 1)
    n_states = sum(1 for s in remaining if s % config.checkpointing_steps == 0 and s < config.max_train_steps)
    if config.checkpoints_total_limit is not None:
        n_states = min(n_states, config.checkpoints_total_limit + 1)  # +1: the new one exists before rotation
    n_snapshots = len({s for s in config.snapshot_steps if s > start_step} | {config.max_train_steps})
    return n_states * state_bytes(config, trained_params=trained_params) + \
        n_snapshots * snapshot_bytes(config, total_params=total_params)


def next_memory_saver(config) -> str | None:
    """The next memory saver to enable, in order of cost to quality and speed (cheapest first)."""
    if not config.gradient_checkpointing:
        return "gradient_checkpointing=True (≈6× less activation memory, ~30 % slower)"
    if not config.use_8bit_adam:
        return "use_8bit_adam=True (saves ≈5 GB of optimizer state on SD 1.5)"
    if not config.cache_latents:
        return "cache_latents=True (the VAE leaves the GPU after encoding the photos once)"
    if config.train_batch_size > 1:
        return (f"train_batch_size=1 with gradient_accumulation_steps="
                f"{config.train_batch_size * config.gradient_accumulation_steps} (same effective batch)")
    if config.train_text_encoder:
        return "train_text_encoder=False (saves ≈1 GB; quality drops a little)"
    return None


def out_of_memory_advice(config, *, peak_bytes: int | None) -> str:
    peak = f"peak {peak_bytes / 2**30:.1f} GiB allocated" if peak_bytes else "peak unknown"
    saver = next_memory_saver(config)
    advice = f"Turn on {saver} and run training again; it resumes from the last saved state." if saver else \
        "Every memory saver is already on; lower resolution or use a GPU with more memory."
    return f"The GPU ran out of memory ({peak}). {advice}"
