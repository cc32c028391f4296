"""Stop at the suggested snapshot: each snapshot measured as it is saved, training ended once the rule is met.

    from dreambooth_nb import train                       # this module's `train`
    train(config.replace(stop_when="suggested"))          # stops by itself; `<run>/stopped.json` says why

`training.train` knows nothing of renders and judges (they live up here, in `results`); it calls a hook after
every snapshot, and `Watcher` is that hook: it renders the snapshot as the comparison does
(`EvalSpec.for_config`, cached where notebook 4 finds the renders; the base model's once, beside the runs),
measures it with the comparison's judge (`quality.judge_for`, `quality.measure`), applies the comparison's
rule (`quality.suggest`), and says stop once there is a suggested snapshot and `stop_patience` snapshots after
it did not better it — the subject was learned, and later steps only lost prompt fidelity or prior
preservation (or gained nothing). The run then keeps the suggested snapshot: `suggestion.json` points export
at it, and the message says what fell ("subject learned at step 600; by step 800 prior preservation fell
0.92 → 0.81: stopped, kept 600").

What it costs: `measuring_share` (said when a watched run starts). Measuring is inference beside training,
about half the FLOPs of 100 training steps at the object preset's batch (`planning.compute`, README), which is
why it is off by default; on a GPU the memory plan counts the snapshot's pipeline beside training.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dreambooth_nb import storage
from dreambooth_nb.config import TrainConfig
from dreambooth_nb.model.base import BaseModel
from dreambooth_nb.planning import compute
from dreambooth_nb.results import quality
from dreambooth_nb.results.compare import load_rgb, subject_photos
from dreambooth_nb.results.evaluate import EvalSpec, render
from dreambooth_nb.training.train import train as train_steps

WATCHED = ("prompt_fidelity", "prior_preservation", "subject_fidelity")
"""What the stop message reports as fallen since the kept snapshot, in this order of interest."""


def should_stop(steps: dict, *, suggested: int | None, patience: int) -> bool:
    """The stop rule, on the snapshots measured so far (`steps`, by step) and the comparison's suggestion among
    them: stop once there is one and `patience` later snapshots did not become it."""
    return suggested is not None and sum(1 for step in steps if step > suggested) >= patience


class Watcher:
    """`training.train`'s `on_snapshot` hook for `stop_when="suggested"` (see the module's docstring).

    `judge`: the comparison's judge for the base model unless given; without one (offline, no download) the run
    is never stopped, and says so once. `spec`: what each snapshot renders (`EvalSpec.for_config(config)`, notebook
    4's defaults, unless given)."""

    def __init__(self, config: TrainConfig, *, judge=None, spec: EvalSpec | None = None, device=None):
        self.config, self.device = config, device
        self.judge = judge if judge is not None else quality.judge_for(BaseModel.of(config).path)
        self.spec = spec or EvalSpec.for_config(config)
        self.steps: dict[int, dict] = {}
        self._base: dict | None = None
        if self.judge is None:
            print("Note: stop_when='suggested' cannot measure the snapshots without a judge: this run trains to "
                  "its last step.")
        else:
            print(f"Early stop: {measuring_share(config, self.spec, device=device)}.")

    def __call__(self, step: int, snapshot: Path) -> tuple[int, str] | None:
        if self.judge is None:
            return None
        base = self._base_metrics()
        self.steps[step] = quality.measure(self.judge, self._images(snapshot), subjects=self._subjects(),
                                           base_images=self._base_images)
        suggested, why = quality.suggest(self.steps, base=base, tolerances=self.judge.tolerances)
        self._write_suggestion(suggested, why, base=base)
        if not should_stop(self.steps, suggested=suggested, patience=self.config.stop_patience):
            return None
        return suggested, self._why(suggested, step)

    # --- the pieces
    def _images(self, model, *, cache_dir=None) -> dict:
        images: dict = {}
        for item in render(model, self.spec, device=self.device, cache_dir=cache_dir):
            images.setdefault(item.prompt, []).append(load_rgb(item.image))
        return images

    def _base_metrics(self) -> dict:
        """The base model's renders (once, where the comparison finds them: beside the runs) and metrics."""
        if self._base is None:
            self._base_images = self._images(BaseModel.of(self.config).path,
                                              cache_dir=Path(self.config.output_dir).parent / "base-renders")
            self._base = quality.measure(self.judge, self._base_images, subjects=self._subjects(), base_images=None)
        return self._base

    def _subjects(self) -> list[tuple[quality.Roles, list]]:
        return [(quality.Roles.of(self.spec.prompts, instance_prompt=subject.instance_prompt,
                                  class_prompt=subject.class_prompt),
                 subject_photos(dataclasses.asdict(subject), resolution=self.config.resolution))
                for subject in self.config.concepts]

    def _write_suggestion(self, suggested: int | None, why: str, *, base: dict) -> None:
        storage.write_json(Path(self.config.output_dir) / quality.SUGGESTION_FILE, {
            "step": suggested, "why": why, "rule": quality.rule_text(self.judge.tolerances), "judge": self.judge.name,
            "base": base, "steps": {str(s): m for s, m in self.steps.items()}, "grid": None,
            "spec": self.spec.key()})

    def _why(self, kept: int, step: int) -> str:
        before, now = self.steps[kept], self.steps[step]
        fallen = [(metric, before[metric], now[metric]) for metric in WATCHED
                  if before.get(metric) is not None and now.get(metric) is not None and now[metric] < before[metric]]
        change = (f"by step {step} {quality.TITLES[fallen[0][0]].rstrip(' ↑')} fell {fallen[0][1]:.2f} → "
                  f"{fallen[0][2]:.2f}" if fallen else f"step {step} did not better it")
        return f"subject learned at step {kept}; {change}: stopped, kept {kept}"


def measuring_share(config: TrainConfig, spec: EvalSpec | None = None, *, device=None) -> compute.MeasuringShare:
    """What measuring each snapshot of `config` costs against the training between two snapshots, in FLOPs
    (`planning.compute`): `spec` rendered (notebook 4's, unless given) where training runs: `device`, else the GPU
    here, else the CPU."""
    spec = spec or EvalSpec.for_config(config)
    on_cpu = torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()
    gpu = "cpu" if on_cpu else None
    return compute.measuring_share(config, images=len(spec.prompts) * len(spec.seeds),
                                   inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
                                   resolution=spec.resolution, gpu=gpu)


def train(config: TrainConfig, *, spec: EvalSpec | None = None, **kwargs) -> Path:
    """`training.train` (same arguments), watched when `config.stop_when` is "suggested" (`spec`: what each
    snapshot renders, see `Watcher`): the package's `train`."""
    watcher = Watcher(config, spec=spec) if config.stop_when == "suggested" else None
    return train_steps(config, on_snapshot=watcher, **kwargs)
