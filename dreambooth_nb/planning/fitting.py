"""Fastest settings that fit: the memory savers chosen for a GPU from the memory plan.

    from dreambooth_nb import fit, fit_report
    config = fit(config)                    # the GPU here (a T4 where there is none)
    config = fit(config, gpu="L4")          # or any `plan` GPU: "T4", "P100", "A100-40GB", a number of GiB, "cpu"
    report = fit_report(config, gpu="L4")   # the same choice, with why and the plans before and after

Every memory saver costs speed, and the fixed `16gb` profile turns all of them on. `fit` keeps what is
trained — model, method, learning rates, steps, the effective batch (`train_batch_size` ×
`gradient_accumulation_steps`), prior preservation, resolution, precision — and chooses only the savers,
the settings `config.RESUMABLE` marks as free to change between a run and its resumption:

- **gradient checkpointing** — off where the plan fits without it;
- **batch instead of accumulation** — the largest micro-batch whose plan fits, the same images per step;
- **32-bit AdamW** instead of bitsandbytes' 8-bit one, where its plan fits (and its larger training states
  still fit the disk as often);
- **cached latents** stay on (they are faster *and* smaller; off only where `center_crop=False` forbids them);
- **EMA offload** only where the EMA does not fit on the GPU;
- **a 4-bit base** (QLoRA, `load_in_4bit`) only where a LoRA's 16-bit base does not fit: the base is then
  an approximation of itself, so every combination with the exact base comes first, whatever its speed.

Among the combinations whose plan fits (`plan(...).fits`: the planner's 10 % fragmentation margin and the
CUDA context included), it takes the one with the shortest estimated step, by `step_seconds`, a model fitted
to the published T4 measurements (below). Ties go to the exact optimizer and to no offload.
"""

from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass, field

from dreambooth_nb import storage
from dreambooth_nb.config import TrainConfig, changed_settings
from dreambooth_nb.model.families import family_named
from dreambooth_nb.model.methods import method_for
from dreambooth_nb.planning import memory, planner
from dreambooth_nb.planning.trace import component_sizes, read_model_configs
from dreambooth_nb.units import disk_size, gib


# --- What each saver costs: a step-time model fitted to the published T4 table --------------------------------
# ShivamShrirao/diffusers, examples/dreambooth/README.md ("Use the table below to choose the best flags based on
# your memory and speed requirements. Tested on Tesla T4 GPU."): SD 1.4 (the UNet of SD 1.5), 512 px, fp16,
# latents cached, 8-bit Adam unless said. Its "it/s" counts micro-batches: train_dreambooth.py advances its
# progress bar once per batch of the dataloader, and 1 × 2 accumulated at 1.0 it/s cannot be optimizer steps
# (that would beat batch 1 alone, 0.93 it/s). Seconds per optimizer step, from its rows:
#     batch 1, checkpointing              1 / 0.93 = 1.075       batch 1, no checkpointing   1 / 1.14 = 0.877
#     batch 2, checkpointing              1 / 0.66 = 1.515       batch 2, no checkpointing   1 / 0.82 = 1.220
#     batch 1 × 2 accumulated, checkp.    2 / 1.00 = 2.000
# A step is (micro-steps) × (forward + backward of a micro-batch) + one optimizer step:
#     optimizer step (8-bit)      2 × 1.075 − 2.000 = 0.15 s
#     forward + backward          0.877 − 0.15 = 0.727 s for 1 image, 1.220 − 0.15 = 1.070 s for 2:
#                                 0.384 s per micro-batch + 0.343 s per image
#     gradient checkpointing      × 1.27 (0.925 / 0.727 = 1.27 at batch 1, 1.365 / 1.070 = 1.28 at batch 2):
#                                 the table's "23 % of the speed" (0.93 → 1.14 it/s without it, for +1.25 GB)
# The model gives those five rows back within 1 %. Two rows it does not model: batch 1 × 2 accumulated without
# checkpointing ran at 0.83 it/s, 2.41 s a step where the model says 1.60 s (accumulation cost more there than
# modelled, not less); and 32-bit AdamW (fused here, `train.make_optimizer`) is taken as fast as 8-bit: the
# table's 32-bit row (0.77 it/s, 15.79 GB) ran with torch 1.12's unfused AdamW at the T4's memory limit. So
# 32-bit AdamW is chosen for exactness (8-bit AdamW quantizes both moments, one 8-bit code per value and an
# absmax per 256-value block) and for needing no bitsandbytes, never for speed.
MICRO_BATCH_S = 0.384
PER_IMAGE_S = 0.343
CHECKPOINTING_TIME = 1.27
OPTIMIZER_STEP_S = 0.15
SD15_UNET_PARAMS = 859_520_964  # the table's trained parameters: the optimizer step scales with them
# EMA offload (diffusers' --offload_ema) copies the fp32 EMA to the GPU and back after every step: 2 × 4 bytes
# per trained parameter over PCIe, ≈12 GB/s pinned on PCIe 3.0 x16 (a T4): an estimate, not a measurement.
PCIE_BYTES_PER_S = 12e9


def step_seconds(config, *, trained_params: int = SD15_UNET_PARAMS) -> float:
    """Estimated seconds of one optimizer step of `config` on a T4 at 512 px (SD 1.5), by the model above.

    Only its ranking of settings is used: absolute times scale with the GPU, the model and the resolution.
    """
    images = config.train_batch_size * (2 if config.with_prior_preservation else 1)
    micro = MICRO_BATCH_S + PER_IMAGE_S * images
    if config.gradient_checkpointing:
        micro *= CHECKPOINTING_TIME
    seconds = config.gradient_accumulation_steps * micro + OPTIMIZER_STEP_S * trained_params / SD15_UNET_PARAMS
    if config.use_ema and config.offload_ema:
        seconds += 8 * trained_params / PCIE_BYTES_PER_S
    return seconds


# --- The choice ------------------------------------------------------------------------------------------------
SAVERS = ("gradient_checkpointing", "train_batch_size", "gradient_accumulation_steps", "use_8bit_adam",
          "cache_latents", "offload_ema", "load_in_4bit")
"""The settings `fit` may change; every one is resumable (`config.RESUMABLE`; batch and accumulation only
together, with the same product)."""


@dataclass
class Choice:
    """One saver: its setting before and after fitting, and why."""

    saver: str
    before: str
    after: str
    why: str

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def line(self) -> str:
        what = f"{self.saver}: {self.after}" if not self.changed else f"{self.saver}: {self.before} → {self.after}"
        return f"{what} — {self.why}"


@dataclass
class FitReport:
    """What `fit` chose for a GPU: the fitted `config`, each saver's `choices` (changed or kept, and why), and
    the memory plans `before` (the config as given) and `after` (fitted)."""

    config: TrainConfig
    original: TrainConfig
    gpu: str
    before: planner.MemoryPlan
    after: planner.MemoryPlan
    choices: list[Choice]
    seconds_before: float
    seconds_after: float
    resumed: list[str] = field(default_factory=list)
    """When re-fitted for a run being resumed: how its savers differ from the ones it was saved with."""
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.after.fits

    @property
    def changes(self) -> list[Choice]:
        return [c for c in self.choices if c.changed]

    @property
    def speedup(self) -> float:
        """Estimated steps per second after ÷ before (the T4 model of `step_seconds`)."""
        return self.seconds_before / self.seconds_after

    def headline(self) -> str:
        """One sentence: what changed, the memory before and after, the estimated speed-up."""
        before, after = self.before, self.after
        if not self.fits:
            return (f"Nothing fits {self.gpu} without changing what is trained: with the most frugal savers, "
                    f"{_plan_line(after)}. " + " ".join(f"To fit: {a}." for a in after.advice)).strip()
        changed = ", ".join(f"{c.saver} {c.after}" for c in self.changes)
        memory = (f"{gib(before.gpu_required_bytes)} → {gib(after.gpu_required_bytes)} GiB needed of "
                  f"{gib(after.gpu_total_bytes)}" if after.gpu_total_bytes else "host RAM")
        if not changed:
            return f"Fitted to {self.gpu}: the savers stay as they are ({memory})."
        speed = f"; ≈{self.speedup:.1f}× the steps per second, estimated from a T4 table" if self.speedup > 1.05 else ""
        return f"Fitted to {self.gpu}: {changed} ({memory}{speed})."

    def lines(self) -> list[str]:
        lines = [self.headline()] + [f"  {c.line()}" for c in self.choices] + self.resumed + self.notes
        lines.append(f"Before: {_plan_line(self.before)}")
        lines.append(f"After:  {_plan_line(self.after)}")
        return lines

    def __repr__(self) -> str:
        return "\n".join(self.lines())

    def _repr_html_(self) -> str:
        colour = "#2e7d32" if self.fits else "#c62828"
        rows = "".join(
            f"<tr><td style='text-align:left'>{html.escape(c.saver)}</td>"
            f"<td style='text-align:left'>{html.escape(c.before)}</td>"
            f"<td style='text-align:left'><b>{html.escape(c.after)}</b></td>"
            f"<td style='text-align:left'>{html.escape(c.why)}</td></tr>" for c in self.choices)
        extra = "".join(f"<li>{html.escape(n)}</li>" for n in self.resumed + self.notes)
        return (f"<div><b style='color:{colour}'>Memory savers</b>: {html.escape(self.headline())}"
                f"<table><tr><th>saver</th><th>before</th><th>fitted</th><th>why</th></tr>{rows}</table>"
                f"{f'<ul>{extra}</ul>' if extra else ''}"
                f"<p>Before: {html.escape(_plan_line(self.before))}</p>{self.after._repr_html_()}</div>")


def fit(config: TrainConfig, gpu=None) -> TrainConfig:
    """`config` with the fastest memory savers whose plan fits `gpu` (see `planner.resolve_gpu`; None: the GPU
    here, a T4 where there is none); what is trained never changes. Where nothing fits, the savers that need
    the least memory (training would then refuse, with the plan's advice)."""
    return fit_report(config, gpu).config


def fit_report(config: TrainConfig, gpu=None, *, previous: dict | TrainConfig | None = None) -> FitReport:
    """`fit`, with each saver's choice and why, and the memory plans before and after.

    `previous`: the saved config of the run this one resumes (its `output_dir/config.json`). The savers are then
    re-fitted within what may change on resume, and `resumed` says how they differ from the ones it was saved
    with; the Adam it started with is kept where it fits (switching restarts Adam's moments).
    """
    card, gpu_notes = planner.resolve_gpu(gpu)
    gpu_name = card.name if card is not None else "cpu"
    if isinstance(previous, TrainConfig):
        previous = previous.to_dict()
    search = _Search(config, card, previous=previous)
    chosen = search.best()
    before = planner.plan(config, gpu, advise=False)
    after = planner.plan(chosen, gpu, advise=True)
    after.notes = [n for n in after.notes if n not in gpu_notes]
    lost = changed_settings(config.to_dict(), chosen)
    if lost:  # (every saver is resumable: a bug if not)
        raise AssertionError(f"fit changed what is trained: {lost}")
    trained = after.trained_params
    report = FitReport(config=chosen, original=config, gpu=gpu_name, before=before, after=after,
                       choices=search.explain(chosen), notes=gpu_notes,
                       seconds_before=step_seconds(config, trained_params=trained),
                       seconds_after=step_seconds(chosen, trained_params=trained))
    if previous is not None:
        report.resumed = _resume_notes(previous, chosen, gpu_name)
    if search.failed is not None:
        report.notes.append(f"This run ran out of memory on this GPU with {_savers(search.failed)} (planned "
                            f"{gib(search.ceiling)} GiB): the fit keeps to settings planned below that.")
    return report


class _Search:
    """The candidates for one config and GPU, planned lazily (traces are cached by the planner), fastest first."""

    def __init__(self, config: TrainConfig, card, *, previous: dict | None):
        self.config, self.card, self.previous = config, card, previous
        self.plans: dict[tuple, planner.MemoryPlan] = {}
        self._trained = planner._plan(config, card).trained_params
        configs = read_model_configs(config.pretrained_model_name_or_path, revision=config.revision)
        self._base_bytes = 2 * component_sizes(configs)[family_named(configs.family).denoiser]
        self.disk_reason = self._disk_prefers_8bit()
        self.failed, self.ceiling = self._out_of_memory()

    def _out_of_memory(self) -> tuple[TrainConfig | None, int | None]:
        """The savers with which this run ran out of memory on a GPU no larger than this one, and their plan's
        need here: the plan under-estimated them, so nothing planned as large is chosen again."""
        record = memory.out_of_memory_record(self.config.output_dir) if self.config.output_dir else None
        if record is None or self.card is None or self.card.total_bytes > record.get("total_bytes", 0):
            return None, None
        saved = record.get("config", {})
        savers = {name: saved[name] for name in SAVERS if name in saved}
        failed = dataclasses.replace(self.config, **savers)
        if failed.train_batch_size * failed.gradient_accumulation_steps != \
                self.config.train_batch_size * self.config.gradient_accumulation_steps:
            return None, None  # another effective batch: another run's record
        return failed, planner._plan(failed, self.card).gpu_required_bytes

    def fits(self, candidate) -> bool:
        """The plan fits, and needs less than what already ran out of memory here."""
        if self.card is not None and not candidate[-1] and self._base_bytes > self.card.total_bytes:
            return False  # (the 16-bit base alone is larger than the card: no need to trace it, FLUX.1's 24 GB)
        return self.plan(candidate).fits and (self.ceiling is None or self.need(candidate) < self.ceiling)

    # A candidate: (checkpointing, micro-batch, 8-bit Adam, EMA offloaded, 4-bit base).
    def candidates(self) -> list[tuple]:
        c = self.config
        effective = c.train_batch_size * c.gradient_accumulation_steps
        batches = [b for b in range(effective, 0, -1) if effective % b == 0]
        offloads = (False, True) if c.use_ema else (c.offload_ema,)
        # (bitsandbytes' 4-bit base loads on a CUDA GPU only: `loading.check_4bit`)
        bases = (False, True) if method_for(c).frozen_base and self.card is not None else (c.load_in_4bit,)
        found = [(ck, b, eight, off, q) for ck in (False, True) for b in batches for eight in (False, True)
                 for off in offloads for q in bases]
        return sorted(found, key=self._rank)

    def _rank(self, candidate) -> tuple:
        _, b, eight, off, quantized = candidate
        seconds = step_seconds(self.apply(candidate), trained_params=self._trained)
        keep_adam = self.previous is not None and eight != bool(self.previous.get("use_8bit_adam"))
        prefer_8bit = self.disk_reason is not None and not eight
        # Keeping the resumed run's Adam, and the disk's say, come before speed, and the exact base before
        # both; then speed; then the exact optimizer, no offload and the larger batch.
        return (quantized, keep_adam, prefer_8bit, round(seconds, 6), eight, off, -b)

    def apply(self, candidate) -> TrainConfig:
        ck, b, eight, off, quantized = candidate
        c = self.config
        effective = c.train_batch_size * c.gradient_accumulation_steps
        return dataclasses.replace(c, gradient_checkpointing=ck, train_batch_size=b,
                                   gradient_accumulation_steps=effective // b, use_8bit_adam=eight,
                                   offload_ema=off, cache_latents=c.cache_latents or c.center_crop,
                                   load_in_4bit=quantized)

    def plan(self, candidate) -> planner.MemoryPlan:
        if candidate not in self.plans:
            self.plans[candidate] = planner._plan(self.apply(candidate), self.card)
        return self.plans[candidate]

    def need(self, candidate) -> int:
        result = self.plan(candidate)
        return result.gpu_required_bytes if self.card is not None else result.host_peak_bytes

    def best(self) -> TrainConfig:
        ranked = self.candidates()
        for candidate in ranked:
            if self.fits(candidate):
                self.chosen = candidate
                return self.apply(candidate)
        self.chosen = min(ranked, key=self.need)  # nothing fits: the least memory
        return self.apply(self.chosen)

    def _disk_prefers_8bit(self) -> str | None:
        """Why 32-bit AdamW would cost disk (its states are 12 instead of ≈6 bytes per trained parameter): the
        disk plan of the output folder then keeps states less often, or does not fit. None: no such reason."""
        c = self.config
        if not c.output_dir:
            return None
        sizes = component_sizes(read_model_configs(c.pretrained_model_name_or_path, revision=c.revision))
        run = memory.RunSizes(total=sum(sizes.values()), trained=self._trained)
        free, trash = storage.free_bytes(c.output_dir), storage.deletes_go_to_trash(c.output_dir)
        plans = {eight: memory.disk_plan(dataclasses.replace(c, use_8bit_adam=eight), sizes=run, free_bytes=free,
                                         trash_counts=trash) for eight in (True, False)}
        small, large = plans[True], plans[False]
        if large.fits and (large.checkpointing_steps or 0) == (small.checkpointing_steps or 0):
            return None
        if not large.fits and not small.fits:
            return None  # the disk refuses either way: train says so
        state = memory.state_bytes(dataclasses.replace(c, use_8bit_adam=False), trained_params=self._trained)
        return (f"32-bit AdamW's training states ({disk_size(state)} each) would not fit {disk_size(free)} free in "
                f"{c.output_dir} as often as 8-bit Adam's")

    # --- Why ------------------------------------------------------------------------------------------------------
    def explain(self, chosen: TrainConfig) -> list[Choice]:
        c, (ck, b, eight, off, q) = self.config, self.chosen
        fits = self.fits(self.chosen)
        total = self.card.total_bytes if self.card is not None else 0

        def short(candidate) -> str:
            need = self.need(candidate)
            if self.plan(candidate).fits and not self.fits(candidate):
                return f"ran out of memory on this GPU before (planned {gib(need)} of {gib(total)} GiB)"
            if not total:
                return f"needs {gib(need)} GiB of RAM"
            measuring = self.plan(candidate).gpu_phase == planner.MEASURING
            return f"needs {gib(need)} of {gib(total)} GiB" + \
                (" while a snapshot is measured beside training (stop_when='suggested')" if measuring else "")

        choices = []
        if not ck:
            why = ("the plan fits without it, and it costs ≈23 % of the speed (T4 table: 0.93 → 1.14 it/s "
                   "without it, for +1.25 GB)")
        elif fits:
            why = f"needed: without it this batch {short((False, b, eight, off, q))}"
        else:
            why = "on: nothing fits, and this is the least memory"
        choices.append(Choice("gradient checkpointing", _on(c.gradient_checkpointing), _on(ck), why))

        effective = c.train_batch_size * c.gradient_accumulation_steps
        if effective > 1:
            if b == effective:
                accumulated = dataclasses.replace(chosen, train_batch_size=1, gradient_accumulation_steps=effective)
                saved = 1 - step_seconds(chosen, trained_params=self._trained) / \
                    step_seconds(accumulated, trained_params=self._trained)
                why = (f"one batch of {effective}: the same images and gradient per step as 1 × {effective} "
                       f"accumulated, in ≈{saved:.0%} less time (T4 table: batch 2 in 1.52 s a step, 1 × 2 "
                       "accumulated in 2.0 s)")
            elif fits:
                why = (f"the largest batch that fits: batch {effective} × 1 "
                       f"{short((ck, effective, eight, off, q))}")
            else:
                why = "nothing fits, and this is the least memory"
            choices.append(Choice("batch", _batch(c), _batch(chosen), why))

        if not eight:
            why = ("the plan fits it: AdamW exactly, where 8-bit Adam quantizes both moments (bitsandbytes), and no "
                   "bitsandbytes needed; chosen for exactness, not speed")
        elif self.previous is not None and self.previous.get("use_8bit_adam") and fits \
                and self.fits((ck, b, False, off, q)):
            why = "the run started with 8-bit Adam: switching now would restart Adam's moments"
        elif self.disk_reason and fits and self.fits((ck, b, False, off, q)):
            why = self.disk_reason
        elif fits:
            why = f"needed: 32-bit AdamW {short((ck, b, False, off, q))}"
        else:
            why = "nothing fits, and this is the least memory"
        choices.append(Choice("Adam", _adam(c.use_8bit_adam), _adam(eight), why))

        if chosen.cache_latents:
            why = "faster and smaller: the VAE encodes each image once, then leaves the GPU"
        else:
            why = "off: center_crop=False needs a new crop every step, which cached latents cannot give"
        choices.append(Choice("cached latents", _on(c.cache_latents), _on(chosen.cache_latents), why))

        if c.use_ema:
            if not off:
                why = "on the GPU: offloading copies it to the GPU and back after every step"
            elif fits:
                why = f"needed: on the GPU it {short((ck, b, eight, False, q))}"
            else:
                why = "nothing fits, and this is the least memory"
            choices.append(Choice("EMA", "offloaded" if c.offload_ema else "on the GPU",
                                  "offloaded" if off else "on the GPU", why))

        if method_for(c).frozen_base:
            if not q:
                why = "16-bit: the base exactly as published"
            elif fits:
                why = (f"needed: the 16-bit base {short((True, 1, True, off, False))} even with every other saver; "
                       "4-bit weights (NF4) take about a quarter of that, and each step dequantizes them")
            else:
                why = "nothing fits, and this is the least memory"
            choices.append(Choice("base weights", _base(c.load_in_4bit), _base(q), why))
        return choices


def _resume_notes(previous: dict, chosen: TrainConfig, gpu: str) -> list[str]:
    """How the re-fitted savers differ from those the run was saved with (all may change on resume)."""
    differences = []
    if bool(previous.get("gradient_checkpointing")) != chosen.gradient_checkpointing:
        differences.append(f"gradient checkpointing {_on(chosen.gradient_checkpointing)} "
                           f"(was {_on(previous.get('gradient_checkpointing'))})")
    was = (previous.get("train_batch_size"), previous.get("gradient_accumulation_steps"))
    if was != (chosen.train_batch_size, chosen.gradient_accumulation_steps):
        differences.append(f"batch {_batch(chosen)} (was {was[0]} × {was[1]}: the same images per step)")
    if bool(previous.get("use_8bit_adam")) != chosen.use_8bit_adam:
        differences.append(f"Adam {_adam(chosen.use_8bit_adam)} (was {_adam(previous.get('use_8bit_adam'))}: "
                           "Adam's moments restart; the weights, schedule and step carry on)")
    if bool(previous.get("cache_latents")) != chosen.cache_latents:
        differences.append(f"cached latents {_on(chosen.cache_latents)}")
    if chosen.use_ema and bool(previous.get("offload_ema")) != chosen.offload_ema:
        differences.append("EMA " + ("offloaded" if chosen.offload_ema else "on the GPU"))
    if not differences:
        return [f"Resuming with the memory savers it was saved with: they fit {gpu} as they are."]
    return [(f"Resuming, re-fitted to {gpu}: {'; '.join(differences)}. The memory savers may change on resume: "
             "it trains the same run.")]


def previous_run(config: TrainConfig) -> dict | None:
    """The saved config of the run `config` would resume (`output_dir/config.json` beside a saved state), for
    `fit_report(..., previous=...)`; None when there is none to resume, or it trained something else."""
    import json
    from pathlib import Path

    out = Path(config.output_dir)
    saved = out / "config.json"
    if config.resume_from_checkpoint is None or not saved.is_file() or storage.latest_state(out) is None:
        return None
    try:
        previous = json.loads(saved.read_text())
    except (OSError, ValueError):
        return None
    return None if changed_settings(previous, config) else previous


def _plan_line(result: planner.MemoryPlan) -> str:
    if not result.gpu_total_bytes:
        return f"{gib(result.host_peak_bytes)} GiB of host RAM at the peak: {'fits' if result.fits else 'does NOT fit'}"
    return (f"{gib(result.gpu_required_bytes)} GiB needed of {gib(result.gpu_total_bytes)} on {result.gpu}: "
            f"{'fits' if result.fits else 'does NOT fit'}")


def _savers(config) -> str:
    return (f"gradient checkpointing {_on(config.gradient_checkpointing)}, batch {_batch(config)}, "
            f"{_adam(config.use_8bit_adam)} Adam" + (", a 4-bit base" if config.load_in_4bit else ""))


def _on(value) -> str:
    return "on" if value else "off"


def _base(quantized) -> str:
    return "4-bit (NF4)" if quantized else "16-bit"


def _adam(eight_bit) -> str:
    return "8-bit" if eight_bit else "32-bit"


def _batch(config) -> str:
    return f"{config.train_batch_size} × {config.gradient_accumulation_steps}"
