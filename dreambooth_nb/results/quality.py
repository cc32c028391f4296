"""Which snapshot? Image metrics of the fixed-seed renders, and the snapshot they suggest.

    judge = quality.judge_for(base_model)                      # the toy world's metrics, or DINOv2 + CLIP
    report = quality.assess(runs, base, judge=judge)           # what `compare` and `sweep` write into the sidecar
    quality.plot(report, path="metrics.png")                   # the metrics against steps, one line per run

Four numbers per snapshot, from the renders `compare` and `sweep` already make, as the DreamBooth paper
measures them (Ruiz et al. 2023, §4.1, §4.3):

* **subject fidelity**: do the instance prompt's renders look like the instance photos? Mean cosine
  similarity of image embeddings, every render against every photo (the paper's DINO score).
* **prompt fidelity**: do the renders of the instance prompt in a new context ("… in the snow") show that
  context? Mean cosine similarity of CLIP image and text embeddings (the paper's CLIP-T).
* **prior preservation**: does the class prompt still draw what the base model drew, seed for seed?
  Image-embedding similarity of each class render to the base model's (1: unchanged).
* **diversity**: mean pairwise distance (1 − cosine similarity) among the instance prompt's renders across
  seeds; copying the photos collapses it (the paper's DIV, measured there with LPIPS).

The paper's point is that subject fidelity alone rewards memorising the photos, so the suggested snapshot
(`suggest`, the one place the rule lives) asks for it high while prompt fidelity and prior preservation
stay within a stated tolerance of the base model's. Each run's suggestion is also written to
`<run>/suggestion.json`, where `export.choose_snapshot` finds it.

The training's deterministic validation loss (`history.json` → "validation": fit on the instance photos,
prior on the class images, the same (noise, timestep) pairs at every snapshot) is read where a run has
it, shown beside the metrics and plotted; older runs without it work the same.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dreambooth_nb import progress, storage
from dreambooth_nb.errors import DataError
from dreambooth_nb.toy import metrics, world
from dreambooth_nb.toy.tiny import TINY_WORDS, build_tokenizer


BASE_RUN = "base model"
"""The label of the base model's cells (its step is 0) in grids and reports."""
SUGGESTION_FILE = "suggestion.json"
METRICS = ("subject_fidelity", "prompt_fidelity", "prior_preservation", "diversity")
TITLES = {"subject_fidelity": "subject fidelity ↑", "prompt_fidelity": "prompt fidelity ↑",
          "prior_preservation": "prior preservation ↑", "diversity": "diversity",
          "validation_fit": "validation loss, photos ↓", "validation_prior": "validation loss, class ↓"}


# --- The rule ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerances:
    """How far a snapshot may move from the base model and still be suggested (each judge states its own,
    on its metrics' scale)."""

    prompt: float
    """Prompt fidelity may fall this far below the base model's."""
    prior: float
    """Prior preservation may fall this far below 1 (the base model's own)."""
    gain: float
    """Subject fidelity must rise at least this far above the base model's: something was learned."""


RULE = ("the snapshot with the highest subject fidelity among those whose prompt fidelity is at least the base "
        "model's − {prompt:g} and whose prior preservation is at least 1 − {prior:g}, if its subject fidelity "
        "beats the base model's by {gain:g} or more")


def rule_text(tolerances: Tolerances) -> str:
    return RULE.format(**asdict(tolerances))


def suggest(steps: dict, *, base: dict, tolerances: Tolerances) -> tuple[int | None, str]:
    """(suggested step or None, why): the one rule that picks a run's snapshot (see `RULE`).

    `steps` maps each step to its metrics, `base` holds the base model's. A check whose metric is missing
    (no context prompt, no class prompt) is left out; without subject fidelity there is no suggestion.
    """
    if not steps:
        return None, "no snapshot was measured."
    if base.get("subject_fidelity") is None or any(m.get("subject_fidelity") is None for m in steps.values()):
        return None, "subject fidelity could not be measured (no instance prompt or photos), so nothing is suggested."
    failed = {step: _failed_checks(m, base=base, tolerances=tolerances) for step, m in steps.items()}
    eligible = [step for step, fails in failed.items() if not fails]
    if not eligible:
        worst = ", ".join(f"step {s}: {'; '.join(f)}" for s, f in failed.items())
        return None, (f"every snapshot has moved too far from the base model ({worst}): use a lower learning rate or "
                      "save earlier steps.")
    best = max(eligible, key=lambda step: (steps[step]["subject_fidelity"], -step))
    gain = steps[best]["subject_fidelity"] - base["subject_fidelity"]
    if gain < tolerances.gain:
        return None, (f"no snapshot within the tolerances has learned the subject yet (best: step {best}, subject "
                      f"fidelity {steps[best]['subject_fidelity']:.2f} vs the base model's "
                      f"{base['subject_fidelity']:.2f}): train longer or use a higher learning rate.")
    return best, (f"step {best}: subject fidelity {steps[best]['subject_fidelity']:.2f} (base model "
                  f"{base['subject_fidelity']:.2f}), the highest of the {len(eligible)} snapshot(s) within the "
                  f"tolerances" + (f"; {len(failed) - len(eligible)} moved too far" if len(eligible) < len(failed)
                                   else "") + ".")


def _failed_checks(metrics: dict, *, base: dict, tolerances: Tolerances) -> list[str]:
    fails = []
    prompt, base_prompt = metrics.get("prompt_fidelity"), base.get("prompt_fidelity")
    if prompt is not None and base_prompt is not None and prompt < base_prompt - tolerances.prompt:
        fails.append(f"prompt fidelity {prompt:.2f} < {base_prompt:.2f} − {tolerances.prompt:g}")
    prior = metrics.get("prior_preservation")
    if prior is not None and prior < 1 - tolerances.prior:
        fails.append(f"prior preservation {prior:.2f} < 1 − {tolerances.prior:g}")
    return fails


# --- Judges: what measures the renders ------------------------------------------------------------------------
class ToyJudge:
    """The toy world's own measurements (`dreambooth_nb.toy.metrics`, each validated on rendered ground truth), for
    the embedded toy model, where they measure the same things as the embeddings would, and better:

    * subject fidelity: `metrics.subject_fidelity` (the photos' foreground colours, and the subject's shape);
    * prompt fidelity: `metrics.prompt_fidelity` for a context that names a background ("… on a black
      background"), the only context the toy world has; None for others;
    * prior preservation: 1 − `metrics.class_drift` (mean |Δpixel| / 255, seed for seed);
    * diversity: mean |Δpixel| / 255 between every two renders of the instance prompt.
    """

    name = "toy world (dreambooth_nb.toy.metrics)"
    # The context prompt may lose a quarter of its renders (4 of 16 seeds; the base model follows it in 15);
    # class renders may drift by 0.15 — two unrelated toy-world images differ by 0.2–0.4 (metrics.class_drift),
    # so below 0.15 they are still nearer their base image than another image is; subject fidelity must gain
    # 0.1, the margin bench/reproduce_study.py's "subject is learned" check asks for (same-subject photos
    # score 0.84, plain circles 0.02–0.06).
    tolerances = Tolerances(prompt=0.25, prior=0.15, gain=0.1)

    def subject_fidelity(self, renders, photos, *, prompt: str | None = None) -> float:
        shape = world.parse_caption(prompt)["shape"] if prompt else None  # "a photo of sks square": a square
        return metrics.subject_fidelity(renders, photos, shape=shape or world.SUBJECT_CLASS)

    def prompt_fidelity(self, renders, prompt: str) -> float | None:
        wanted = world.parse_caption(prompt)
        if wanted["background"] is None:
            return None
        return metrics.prompt_fidelity(renders, background=wanted["background"],
                                       shape=wanted["shape"] or world.SUBJECT_CLASS)

    def prior_preservation(self, renders, base_renders) -> float:
        return 1.0 - metrics.class_drift(renders, base_renders)

    def diversity(self, renders) -> float | None:
        pairs = list(itertools.combinations(renders, 2))
        return float(np.mean([metrics.class_drift([a], [b]) for a, b in pairs])) if pairs else None


# DINOv2-small for image–image similarity: the DreamBooth paper scores subject fidelity with DINO (ViT-S/16)
# because self-supervised DINO features tell two objects of one class apart, where CLIP's image features,
# trained to match captions, call two different dogs alike. DINOv2-small (22 M parameters, 88 MB) is DINO's
# current and smallest release. CLIP ViT-B/32 for text–image similarity: the paper's CLIP-T, and the
# smallest standard CLIP (151 M parameters, 605 MB). Both are downloaded once (the Hugging Face cache), run
# on the CPU (never on the GPU training uses), and are loaded once per process.
IMAGE_MODEL = "facebook/dinov2-small"
CLIP_MODEL = "openai/clip-vit-base-patch32"
# Their preprocessing, from each model's preprocessor_config.json: resize the shorter side, centre-crop,
# normalise (DINOv2: ImageNet's mean and std; CLIP: its own).
_DINO_PIXELS = dict(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_CLIP_PIXELS = dict(resize=224, crop=224, mean=(0.48145466, 0.4578275, 0.40821073),
                    std=(0.26862954, 0.26130258, 0.27577711))


class EmbeddingJudge:
    """Image embeddings (DINOv2-small) and text–image embeddings (CLIP ViT-B/32), as the DreamBooth paper.

    `EmbeddingJudge.standard()` downloads and loads them (once per process); `EmbeddingJudge.tiny()` builds
    random tiny ones from configs, for offline tests (their numbers mean nothing; the code path is the same).
    """

    # Not yet measured on Stable Diffusion here (no GPU and no download on the machine that wrote this):
    # starting points on these metrics' scales. CLIP-T of a matching image and prompt is about 0.3 for
    # ViT-B/32 (the paper's Table 1: 0.305 for DreamBooth on SD), so 0.02 allows a small loss of the
    # context; DINO similarity of a render to its own base render 0.7 and up keeps the class recognisably
    # the base model's; a gain of 0.05 in DINO subject fidelity is well above seed-to-seed noise.
    tolerances = Tolerances(prompt=0.02, prior=0.3, gain=0.05)

    def __init__(self, *, image_model, clip_model, tokenizer, name: str, image_pixels: dict, clip_pixels: dict):
        self.image_model, self.clip_model, self.tokenizer = image_model.eval(), clip_model.eval(), tokenizer
        self.name, self._image_pixels, self._clip_pixels = name, image_pixels, clip_pixels

    @classmethod
    def standard(cls) -> "EmbeddingJudge":
        """DINOv2-small and CLIP ViT-B/32 from the Hub (cached), on the CPU; loaded once per process."""
        return _standard_judge()

    @classmethod
    def tiny(cls, *, seed: int = 0) -> "EmbeddingJudge":
        """Random tiny DINOv2 and CLIP built from configs: no download, for tests."""
        import torch
        from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

        torch.manual_seed(seed)
        tokenizer = build_tokenizer(TINY_WORDS + ["circle", "black", "background", "snow", "painting"])
        small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        dino = Dinov2Model(Dinov2Config(**small, image_size=32, patch_size=8))
        clip = CLIPModel(CLIPConfig(
            text_config=dict(**small, vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(**small, image_size=32, patch_size=8), projection_dim=16))
        pixels = dict(resize=32, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
        return cls(image_model=dino, clip_model=clip, tokenizer=tokenizer, name="tiny random DINOv2 + CLIP (tests)",
                   image_pixels=pixels, clip_pixels=pixels)

    # --- the four metrics
    def subject_fidelity(self, renders, photos, *, prompt: str | None = None) -> float:
        return float((self.image_embeddings(renders) @ self.image_embeddings(photos).T).mean())  # (the photos say it all: no prompt)

    def prompt_fidelity(self, renders, prompt: str) -> float:
        return float((self._clip_images(renders) @ self._clip_texts([prompt]).T).mean())

    def prior_preservation(self, renders, base_renders) -> float:
        return float((self.image_embeddings(renders) * self.image_embeddings(base_renders)).sum(axis=1).mean())

    def diversity(self, renders) -> float | None:
        if len(renders) < 2:
            return None
        e = self.image_embeddings(renders)
        similarity = e @ e.T
        return float(1 - similarity[np.triu_indices(len(e), k=1)].mean())

    # --- embeddings (unit length)
    def image_embeddings(self, images) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.image_model(pixel_values=_pixel_values(images, **self._image_pixels)).pooler_output
        return _unit(out)

    def _clip_images(self, images) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.clip_model.get_image_features(pixel_values=_pixel_values(images, **self._clip_pixels))
        return _unit(out if isinstance(out, torch.Tensor) else out.pooler_output)  # a tensor in transformers 4.x

    def _clip_texts(self, texts) -> np.ndarray:
        import torch

        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = self.clip_model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        return _unit(out if isinstance(out, torch.Tensor) else out.pooler_output)


@functools.cache
def _standard_judge() -> EmbeddingJudge:
    from transformers import CLIPModel, CLIPTokenizer, Dinov2Model

    return EmbeddingJudge(image_model=Dinov2Model.from_pretrained(IMAGE_MODEL),
                          clip_model=CLIPModel.from_pretrained(CLIP_MODEL),
                          tokenizer=CLIPTokenizer.from_pretrained(CLIP_MODEL), name=f"{IMAGE_MODEL} + {CLIP_MODEL}",
                          image_pixels=_DINO_PIXELS, clip_pixels=_CLIP_PIXELS)


def _pixel_values(images, *, resize: int, crop: int, mean, std):
    """PIL images → a normalised (N, 3, crop, crop) float tensor: shorter side to `resize`, centre crop."""
    import torch
    from PIL import Image

    arrays = []
    for image in images:
        image = image.convert("RGB")
        scale = resize / min(image.size)
        image = image.resize((max(crop, round(image.width * scale)), max(crop, round(image.height * scale))),
                             Image.BICUBIC)
        left, top = (image.width - crop) // 2, (image.height - crop) // 2
        arrays.append(np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0)
    x = (np.stack(arrays) - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _unit(features) -> np.ndarray:
    e = features.float().cpu().numpy()
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def judge_for(base_model: str | None):
    """The judge for runs of `base_model`: the toy world's own metrics for a model that
    `tools/train_toy_model.py` made (its `training_report.json`), else DINOv2 + CLIP (`EmbeddingJudge`),
    loaded lazily: None is returned in its place when it cannot be loaded, with a note why."""
    if base_model and (Path(base_model).expanduser() / "training_report.json").is_file():
        return ToyJudge()
    try:
        return EmbeddingJudge.standard()
    except (OSError, ValueError, ImportError) as err:  # offline, a blocked download, an old transformers
        print(f"Note: no image metrics and no suggested snapshot: {IMAGE_MODEL} and {CLIP_MODEL} could not be "
              f"loaded ({str(err).splitlines()[0][:160]}). They download once on Colab and Kaggle (Kaggle: turn "
              "Internet on).")
        return None


# --- Measuring runs ------------------------------------------------------------------------------------------
@dataclass
class Roles:
    """Which prompts of a spec play which part for a run: its instance prompt, class prompt, contexts."""

    instance: str | None
    klass: str | None
    contexts: list[str]

    @classmethod
    def of(cls, prompts, *, instance_prompt: str | None, class_prompt: str | None) -> "Roles":
        prompts = list(prompts)
        instance = instance_prompt if instance_prompt in prompts else None
        klass = class_prompt if class_prompt and class_prompt in prompts and class_prompt != instance else None
        contexts = [p for p in prompts if instance and p != instance and p.startswith(instance)]
        return cls(instance=instance, klass=klass, contexts=contexts)


def measure(judge, images: dict, *, subjects: list[tuple[Roles, list]], base_images: dict | None) -> dict:
    """The four metrics of one snapshot (or of the base model, `base_images` None) from its renders.

    `images[prompt]` lists the renders of `prompt`, seeds in the spec's order; `base_images` the base
    model's, alike. `subjects`: (roles, photos) of each subject the run trained. Each metric is measured per
    subject (its renders against its own photos and prompts) and averaged over the subjects that have it;
    a metric with nothing to measure is None (its prompt is not in the spec).
    """
    values: dict = {metric: [] for metric in METRICS}
    for roles, photos in subjects:
        if roles.instance and roles.instance in images:
            if photos:
                values["subject_fidelity"].append(judge.subject_fidelity(images[roles.instance], photos,
                                                                         prompt=roles.instance))
            values["diversity"].append(judge.diversity(images[roles.instance]))
        values["prompt_fidelity"] += [judge.prompt_fidelity(images[p], p) for p in roles.contexts if p in images]
        if roles.klass and roles.klass in images:
            values["prior_preservation"].append(
                1.0 if base_images is None else judge.prior_preservation(images[roles.klass], base_images[roles.klass]))
    means = {metric: [v for v in found if v is not None] for metric, found in values.items()}
    return {metric: round(float(np.mean(found)), 4) if found else None for metric, found in means.items()}


def bleed(judge, images: dict, *, subjects: list[tuple[Roles, list]]) -> dict | None:
    """Does one subject look like another? For a run of several subjects: each subject's instance-prompt renders
    (rows) scored against every subject's photos (columns) with the subject-fidelity measure, and the subjects
    whose renders score within the judge's `gain` of their own photos against another's — or above — named.
    None for fewer than two subjects with renders and photos."""
    rows = [(roles, photos) for roles, photos in subjects if roles.instance in images and photos]
    if len(rows) < 2:
        return None
    names = [roles.instance for roles, _ in rows]
    matrix = [[round(judge.subject_fidelity(images[mine.instance], photos, prompt=theirs.instance), 4)
               for theirs, photos in rows] for mine, _ in rows]
    alike = [f"'{names[i]}' looks like the photos of '{names[j]}' ({matrix[i][j]:.2f}; its own {matrix[i][i]:.2f})"
             for i in range(len(rows)) for j in range(len(rows))
             if i != j and matrix[i][j] >= matrix[i][i] - judge.tolerances.gain]
    return {"subjects": names, "matrix": matrix, "alike": alike}


def assess(runs: list[dict], base: dict | None, *, judge) -> dict:
    """Measure every run's snapshots against the base model and suggest one snapshot per run.

    `runs`: [{"run", "lr", "folder" (or None), "subjects": [(roles, photos)], "steps": {step: {prompt: [images]}}}];
    `base`: {"model", "images": {prompt: [images]}} or None. Returns the report that goes into the grid's
    sidecar: the judge, the rule, its tolerances, the base model's metrics, and per run its metrics by step
    (with the validation loss where the run's history has it), its suggestion and why.
    """
    tolerances = judge.tolerances
    report = {"judge": judge.name, "rule": rule_text(tolerances), "tolerances": asdict(tolerances),
              "base": None, "runs": []}
    total, done = sum(len(run["steps"]) for run in runs), 0
    for run in runs:
        base_images = base["images"] if base else None
        base_metrics = (measure(judge, base_images, subjects=run["subjects"], base_images=None)
                        if base_images else {})
        report["base"] = report["base"] or base_metrics or None
        steps = {}
        for step, images in sorted(run["steps"].items()):
            progress.report("measuring the snapshots", done, total)
            steps[step] = measure(judge, images, subjects=run["subjects"], base_images=base_images)
            done += 1
        validation = read_validation(run["folder"]) if run["folder"] else {}
        for step, measured in steps.items():
            if step in validation:
                measured["validation"] = validation[step]
        step, why = suggest(steps, base=base_metrics, tolerances=tolerances) if base_metrics else \
            (None, "the base model was not rendered, so nothing can be compared with it.")
        entry = {"run": run["run"], "lr": run["lr"], "folder": None if run["folder"] is None else str(run["folder"]),
                 "base": base_metrics, "steps": {str(s): m for s, m in steps.items()}, "suggested": step, "why": why}
        shown = step if step is not None else max(run["steps"], default=None)  # the snapshot one would take
        crossed = bleed(judge, run["steps"][shown], subjects=run["subjects"]) if shown is not None else None
        if crossed:
            entry["bleed"] = {"step": shown, **crossed}
        report["runs"].append(entry)
    suggested = [r for r in report["runs"] if r["suggested"] is not None]
    best = max(suggested, key=lambda r: r["steps"][str(r["suggested"])]["subject_fidelity"], default=None)
    report["suggested"] = None if best is None else {"run": best["run"], "step": best["suggested"]}
    return report


def read_validation(run_dir) -> dict[int, dict]:
    """{step: {"fit": …, "prior": …}} from the run's history.json (empty when the run has none: older runs)."""
    try:
        history = json.loads((Path(run_dir) / "history.json").read_text())
    except (OSError, ValueError):
        return {}
    entries = history.get("validation") or [] if isinstance(history, dict) else []
    return {int(e["step"]): {k: e.get(k) for k in ("fit", "prior")} for e in entries
            if isinstance(e, dict) and "step" in e}


def write_suggestions(report: dict, *, grid: Path, spec_key: str) -> None:
    """`<run>/suggestion.json` for every run folder of `report`: the step (or None), why, the rule and its inputs."""
    for run in report["runs"]:
        if run["folder"] is None:
            continue
        storage.write_json(Path(run["folder"]) / SUGGESTION_FILE, {
            "step": run["suggested"], "why": run["why"], "rule": report["rule"], "judge": report["judge"],
            "base": run["base"], "steps": run["steps"], "grid": str(grid), "spec": spec_key})


def suggested_step(run_dir) -> tuple[int | None, str | None]:
    """(step, why) of the run's latest suggestion, or (None, None) when no comparison has suggested one."""
    try:
        data = json.loads((Path(run_dir) / SUGGESTION_FILE).read_text())
    except (OSError, ValueError):
        return None, None
    step = data.get("step")
    return (int(step) if isinstance(step, int) else None), data.get("why")


def highlights(report: dict | None) -> list[dict]:
    """The grid cells to mark: each run's suggested snapshot."""
    if not report:
        return []
    return [{"run": r["run"], "step": r["suggested"]} for r in report["runs"] if r["suggested"] is not None]


# --- Showing ---------------------------------------------------------------------------------------------------
def read(grid) -> tuple[dict | None, Path | None]:
    """(report, metrics plot or None) of a grid that `compare` or `sweep` drew, from its sidecar."""
    grid = Path(grid)
    try:
        side = json.loads(grid.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None, None
    plot_name = side.get("metrics_plot")
    return side.get("quality"), (grid.with_name(plot_name) if plot_name else None)


def summary(report: dict | None) -> str:
    """The suggestion and its inputs as text: per run a line per step, the base model first."""
    if not report:
        return "No image metrics (see the note above), so no suggested snapshot."
    names = [m for m in METRICS if report["base"] and report["base"].get(m) is not None
             or any(s.get(m) is not None for r in report["runs"] for s in r["steps"].values())]
    lines = [f"Suggested snapshot, per run: {report['rule']}.", f"Metrics: {report['judge']}.", ""]
    header = ["run", "step", *[TITLES[m].rstrip(" ↑") for m in names], "validation fit / prior"]
    rows = [[BASE_RUN, "0", *[_number((report["base"] or {}).get(m)) for m in names], ""]]
    for run in report["runs"]:
        for step, m in run["steps"].items():
            mark = " ★" if str(run["suggested"]) == step else ""
            v = m.get("validation") or {}
            rows.append([run["run"], step + mark, *[_number(m.get(n)) for n in names],
                         f"{_number(v.get('fit'), 4)} / {_number(v.get('prior'), 4)}" if v else ""])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.append("")
    lines += [f"{r['run']}: {r['why']}" for r in report["runs"]]
    for run in (r for r in report["runs"] if r.get("bleed")):
        lines += ["", *_bleed_lines(run["run"], run["bleed"])]
    return "\n".join(lines)


def _bleed_lines(run: str, bleed: dict) -> list[str]:
    """A run's subject × subject table (`bleed`), then which subject looks like another, if any."""
    labels = [f"{i}. {name}" for i, name in enumerate(bleed["subjects"], 1)]
    header = [f"{run}, step {bleed['step']}: renders of (rows) against photos of", *map(str, range(1, len(labels) + 1))]
    rows = [[label, *[_number(v) for v in values]] for label, values in zip(labels, bleed["matrix"])]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return lines + (bleed["alike"] or ["No subject looks like another."])


def _number(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def plot(reports: dict, *, path, title: str | None = None) -> Path:
    """The metrics against training steps, one panel per metric and one line per run (and per report: e.g.
    {"prior off": …, "prior on": …} draws solid and dashed lines); the base model at step 0, each run's
    suggestion as a star, the tolerance limits dotted. Saved as PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    reports = {k: v for k, v in reports.items() if v}
    if not reports:
        raise DataError("quality.plot: no metrics to plot (no report has any).")
    panels = [m for m in (*METRICS, "validation_fit", "validation_prior")
              if any(_series(r, run, m) for r in reports.values() for run in r["runs"])]
    fig = Figure(figsize=(3.6 * min(len(panels), 3), 2.9 * -(-len(panels) // 3) + (0.4 if title else 0)), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(-(-len(panels) // 3), min(len(panels), 3), squeeze=False).ravel()
    colours = {}
    for (label, report), style in zip(reports.items(), ("-", "--", ":", "-.")):
        for run in report["runs"]:
            colour = colours.setdefault(run["run"], f"C{len(colours) % 10}")
            for ax, metric in zip(axes, panels):
                points = _series(report, run, metric)
                if not points:
                    continue
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, color=colour, marker="o", markersize=3,
                        label=" · ".join(x for x in (run["run"], label) if x))
                if run["suggested"] is not None and metric in METRICS:
                    value = run["steps"][str(run["suggested"])].get(metric)
                    if value is not None:
                        ax.plot([run["suggested"]], [value], "*", color=colour, markersize=12)
    first = next(iter(reports.values()))
    for ax, metric in zip(axes, panels):
        ax.set_title(TITLES[metric], fontsize=11)
        ax.tick_params(labelsize=9)
        ax.set_xlabel("step", fontsize=9)
        limit = _limit(first, metric)
        if limit is not None:  # labelled: the rule's limit, not a mystery line
            ax.axhline(limit, color="#888888", linestyle=":", linewidth=1.2, label="rule's limit")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")  # on every panel: each reads alone
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    path = Path(path)
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    storage.atomic_write_bytes(path, buffer.getvalue())
    return path


def _series(report: dict, run: dict, metric: str) -> list[tuple[int, float]]:
    """(step, value) points of one run's metric, the base model's at step 0 first (metrics, not losses)."""
    if metric.startswith("validation_"):
        key = metric.removeprefix("validation_")
        return [(int(s), m["validation"][key]) for s, m in run["steps"].items()
                if (m.get("validation") or {}).get(key) is not None]
    points = [(int(s), m[metric]) for s, m in run["steps"].items() if m.get(metric) is not None]
    base = (run.get("base") or {}).get(metric)
    return ([(0, base)] if base is not None and points else []) + points


def _limit(report: dict, metric: str) -> float | None:
    """The tolerance limit of the rule for `metric` (a dotted line in the plot), or None."""
    tolerances, base = report["tolerances"], report.get("base") or {}
    if metric == "prior_preservation":
        return 1 - tolerances["prior"]
    if metric == "prompt_fidelity" and base.get("prompt_fidelity") is not None:
        return base["prompt_fidelity"] - tolerances["prompt"]
    if metric == "subject_fidelity" and base.get("subject_fidelity") is not None:
        return base["subject_fidelity"] + tolerances["gain"]
    return None
