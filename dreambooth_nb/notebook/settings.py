"""The notebooks' settings as plain functions: text fields parsed, a config from widget values and back,
notebook parameters applied, a summary of a config, the panels' one-line notes. No widget is made here: the panels
(`ui`) and headless runs call the same functions, so what a test runs is what a click runs."""

from __future__ import annotations

import math

from dreambooth_nb.config import PRESETS, TrainConfig, default_snapshot_steps
from dreambooth_nb.model.methods import METHODS, method_for
from dreambooth_nb.errors import ConfigError
from dreambooth_nb.model.base import BaseModel
from dreambooth_nb.results import early_stop


# --- Parsing text fields --------------------------------------------------------------------------------
def parse_int_list(text, *, name: str = "steps", allow_zero: bool = False) -> list[int]:
    """"400, 800 1200" -> [400, 800, 1200] (sorted, no repeats); a list passes through."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [t for t in str(text or "").replace(",", " ").split() if t]
    values = []
    for item in items:
        try:
            value = int(item) if not isinstance(item, float) or item.is_integer() else None
        except (TypeError, ValueError):
            value = None
        if value is None or value < 0 or (value == 0 and not allow_zero):
            kind = "whole number (0 or more)" if allow_zero else "positive whole number"
            raise ConfigError(f"{name}: {item!r} is not a {kind}; write e.g. '400, 800'.")
        values.append(value)
    return sorted(set(values))


def parse_float_list(text, *, name: str = "learning rates") -> list[float]:
    """"5e-6, 2e-6" -> [5e-06, 2e-06] (order kept, no repeats)."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [t for t in str(text or "").replace(",", " ").split() if t]
    values: list[float] = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            value = math.nan
        if not value > 0 or math.isinf(value):
            raise ConfigError(f"{name}: {item!r} is not a positive number; write e.g. '5e-6, 2e-6'.")
        if value not in values:
            values.append(value)
    if not values:
        raise ConfigError(f"{name}: the list is empty; write e.g. '5e-6, 2e-6'.")
    return values


def adjust_snapshot_steps(text: str, *, old_steps: int, new_steps: int) -> tuple[str, str]:
    """The snapshot-steps field after Steps changed from `old_steps` to `new_steps`, and a note for the user.

    A default (halfway; every quarter for early stop) follows the new step count; chosen steps at or past the
    new end are dropped, and the note says which (the last step is always saved anyway). Text that does not
    parse is left alone: Train reports it.
    """
    try:
        steps = parse_int_list(text, name="snapshot steps")
    except ConfigError:
        return text, ""
    for stop_when in ("end", "suggested"):  # (a default, for either: it follows the new step count)
        if steps == default_snapshot_steps(old_steps, stop_when=stop_when):
            steps = default_snapshot_steps(new_steps, stop_when=stop_when)
            break
    kept = [s for s in steps if s < new_steps]
    dropped = [s for s in steps if s >= new_steps]
    note = (f"Snapshot step(s) {', '.join(map(str, dropped))} dropped: past the new {new_steps} steps "
            "(the last step is always saved)." if dropped else "")
    return ", ".join(map(str, kept)), note


# --- Config <-> widget values (pure) ----------------------------------------------------------------------
PANEL_FIELDS = ("method", "learning_rate", "max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                "num_processes", "with_prior_preservation", "prior_loss_weight", "train_text_encoder",
                "use_8bit_adam", "gradient_checkpointing", "mixed_precision", "snapshot_steps")


def widget_values(config: TrainConfig) -> dict:
    """The panel's initial values for `config` (snapshot steps as editable text)."""
    values = {name: getattr(config, name) for name in PANEL_FIELDS}
    values["snapshot_steps"] = ", ".join(str(s) for s in config.snapshot_steps)
    return values


def config_from_widgets(values: dict, base: TrainConfig) -> TrainConfig:
    """`base` with the panel's values applied; the function both the Train button and headless runs use.

    `values` holds TrainConfig field names (see `PANEL_FIELDS`); `snapshot_steps` may be text
    ("200, 400"). Snapshot steps past the last step are dropped (the last step is always saved).
    Raises `ConfigError` for an unknown name or an impossible value, before anything is loaded.
    """
    unknown = sorted(set(values) - set(PANEL_FIELDS))
    if unknown:
        raise ConfigError(f"Unknown panel setting(s): {', '.join(unknown)}.")
    changes = dict(values)
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "num_processes"):
        if name in changes:
            changes[name] = int(changes[name])
    for name in ("learning_rate", "prior_loss_weight"):
        if name in changes:
            changes[name] = float(changes[name])
    if "learning_rate" in changes:  # a log slider gives 1.9953e-06 for "2.0e-06": keep what the readout shows
        changes["learning_rate"] = float(f"{changes['learning_rate']:.2g}")
    for name in ("with_prior_preservation", "train_text_encoder", "use_8bit_adam", "gradient_checkpointing"):
        if name in changes:
            changes[name] = bool(changes[name])

    steps = changes.get("max_train_steps", base.max_train_steps)
    if "snapshot_steps" in changes:
        changes["snapshot_steps"] = [s for s in parse_int_list(changes["snapshot_steps"], name="snapshot steps")
                                     if s < steps]
    else:
        changes["snapshot_steps"] = [s for s in base.snapshot_steps if s < steps]
    config = base.replace(**changes)
    return config.validate(check_paths=False)


def _keep(value) -> bool:
    """A notebook parameter that means "keep setup's value": None, empty text, or a number 0 (no number
    parameter can be 0). False is a value: `TRAIN_TEXT_ENCODER=False` turns it off."""
    if value is None or isinstance(value, bool):
        return value is None
    return value == "" or (isinstance(value, (int, float)) and value == 0)


def apply_parameters(config: TrainConfig, **values) -> TrainConfig:
    """`config` with notebook parameters applied; 0 (numbers), "" and None mean "keep the value from setup".

    Keys are TrainConfig field names; `snapshot_steps` may be text. With a new step count and no explicit
    snapshot steps, snapshots default to halfway, every quarter with early stop (`default_snapshot_steps`).
    """
    changes = {k: v for k, v in values.items() if not _keep(v)}
    if "snapshot_steps" in changes:
        changes["snapshot_steps"] = parse_int_list(changes["snapshot_steps"], name="SNAPSHOT_STEPS")
    steps = int(changes.get("max_train_steps", config.max_train_steps))
    if "snapshot_steps" not in changes and (not config.snapshot_steps or "max_train_steps" in changes):
        changes["snapshot_steps"] = default_snapshot_steps(steps, stop_when=changes.get("stop_when", config.stop_when))
    changes["snapshot_steps"] = [s for s in changes["snapshot_steps"] if s < steps]
    return config.replace(**changes)


def config_summary(config: TrainConfig) -> str:
    """The settings a user chose or should check, one per line."""
    batch = config.train_batch_size * config.gradient_accumulation_steps
    subjects = config.concepts
    if len(subjects) == 1:
        who = [f"Photos:             {subjects[0].instance_data_dir}",
               f"Instance prompt:    {subjects[0].instance_prompt}"]
        prior = f"{subjects[0].num_class_images} class images of '{subjects[0].class_prompt}', "
    else:  # several subjects: one line each, in the order they take turns in every batch
        who = [f"Subjects:           {len(subjects)}, taking turns in every batch"]
        who += [f"  {i}. '{s.instance_prompt}' from {s.instance_data_dir}"
                + (f"; {s.num_class_images} class images of '{s.class_prompt}'" if config.with_prior_preservation
                   else "") for i, s in enumerate(subjects, 1)]
        prior = "class images per subject (above), "
    prior = f"on: {prior}weight {config.prior_loss_weight:g}" if config.with_prior_preservation else "off"
    if config.with_prior_preservation and config.class_images_from_captions:
        prior += "; class images drawn from the photos' captions"
    memory = ", ".join(name for name, on in (("8-bit Adam", config.use_8bit_adam),
                                             ("gradient checkpointing", config.gradient_checkpointing),
                                             ("cached latents", config.cache_latents)) if on) or "none"
    return "\n".join([
        f"Model:              {config.pretrained_model_name_or_path}",
        *who,
        f"Prior preservation: {prior}",
        f"Method:             {method_for(config).label(BaseModel.of(config).family.denoiser_label)}",
        f"Learning rate:      {config.learning_rate:.1e}",
        f"Steps:              {config.max_train_steps} (snapshots at {config.snapshot_steps or 'the end only'})"
        + (f"; stops by itself at the suggested snapshot: {early_stop.measuring_share(config)}"
           if config.stop_when == "suggested" else ""),
        f"Batch:              {config.train_batch_size} x {config.gradient_accumulation_steps} accumulated = {batch}",
        f"Text encoder:       {'trained' if config.train_text_encoder else 'frozen'}",
        "Loss:               " + (f"masked: background weight {config.mask_background_weight:g} (photo.mask.png, else "
                                   f"{config.mask_segmenter})" if config.masked_loss else "every pixel alike"),
        f"Resolution:         {config.resolution}",
        f"Mixed precision:    {config.mixed_precision}; memory savers: {memory}",
    ])


def method_learning_rate(method: str, *, base: TrainConfig) -> tuple[float, str]:
    """The learning rate a switch to `method` sets, and where it comes from: back to notebook 1's rate when it
    was set for that method, else the preset's (LoRA's; full fine-tuning: the object preset's, faces lower)."""
    title = METHODS[method].title
    if base.method == method:
        return base.learning_rate, f"back to the rate notebook 1 set for {title}"
    if method in PRESETS:  # a method with a preset of its own (LoRA: diffusers' Dreambooth LoRA example's rate)
        return PRESETS[method]["learning_rate"], f"the {title} preset's rate"
    return (PRESETS["object"]["learning_rate"],
            f"the object preset's rate for {title} (the study; faces: {PRESETS['face']['learning_rate']:.0e})")


def with_savers_of(base: TrainConfig, config: TrainConfig) -> TrainConfig:
    """`config` with the memory savers of `base` (its batch split where the effective batch is the same, else
    batch 1 × accumulation): what the panel's fit starts from, so its "before" is the config it opened with."""
    effective = config.train_batch_size * config.gradient_accumulation_steps
    batch = base.train_batch_size if base.train_batch_size * base.gradient_accumulation_steps == effective else 1
    return config.replace(gradient_checkpointing=base.gradient_checkpointing, use_8bit_adam=base.use_8bit_adam,
                          cache_latents=base.cache_latents, offload_ema=base.offload_ema, train_batch_size=batch,
                          gradient_accumulation_steps=effective // batch)


def batch_line(values: dict) -> str:
    """The panel's effective batch: photos per optimizer step, from its batch, accumulation and GPUs."""
    batch, accumulation, gpus = (int(values[k]) for k in ("train_batch_size", "gradient_accumulation_steps",
                                                          "num_processes"))
    on_gpus = f" × {gpus} GPUs" if gpus > 1 else ""
    return (f"<i>Effective batch: {batch} × {accumulation} accumulated{on_gpus} = {batch * accumulation * gpus} "
            "photos per step.</i>")


# --- Comparison and sweep panels -----------------------------------------------------------------------------
def sampler_choices(config: TrainConfig) -> list[tuple[str, str]]:
    """The samplers the comparison panel offers for `config`'s model, (label, name): a DDPM family's four, a
    flow model's own Euler sampler alone."""
    return list(BaseModel.of(config).family.objective.choices)


COLUMN_CHOICES = [("training steps", "step"), ("prompts", "prompt")]


def grid_axes(columns: str) -> tuple:
    """(rows, cols) for `compare`: prompts × seeds down and each run's steps across, or runs × steps down and
    prompts across."""
    if columns == "step":
        return ("prompt", "seed"), ("run", "step")
    if columns == "prompt":
        return ("run", "step"), "prompt"
    raise ConfigError(f"COLUMNS: {columns!r} is unknown; choose 'step' or 'prompt'.")
