"""DreamBench: the DreamBooth paper's own evaluation, so a run's numbers can stand beside its Table 1.

    result = dreambench.measure("project/runs/lr2e-6")   # the run's suggested (else last) snapshot
    print(result.table)                                  # its DINO, CLIP-I, CLIP-T beside the paper's Table 1

or, piece by piece:

    judge = dreambench.DreamBenchJudge.standard()                       # DINO ViT-S/16 + CLIP ViT-B/32
    texts = dreambench.prompts(token="sks", class_noun="dog", live=True)  # render 4 images of each
    one = dreambench.score(judge, renders={prompt: [4 images], ...}, photos=real_photos, token="sks")
    print(dreambench.table(dreambench.average([one, ...])))              # beside the paper's numbers

An opt-in companion to `quality` (whose default judge, DINOv2 + CLIP, stays as it is), with the paper's
exact definitions (Ruiz et al., CVPR 2023, §4.1; github.com/google/dreambooth):

* **DINO**: mean cosine similarity of the ViT-S/16 DINO embeddings (the CLS token) of every generated image
  against every real photo of its subject;
* **CLIP-I**: the same with CLIP ViT-B/32 image embeddings;
* **CLIP-T**: mean cosine similarity of each generated image's CLIP embedding and the CLIP text embedding
  of its prompt.

Each subject is rendered with DreamBench's 25 prompts, 4 images each (100 images); the paper averages over
its 30 subjects × 25 prompts × 4 images. Here every generated image gets its scores (DINO: its mean
similarity to its subject's photos), and a run's score is the mean over all its generated images. With the
paper's equal 100 images per subject that is the mean of the per-subject scores as well.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dreambooth_nb.config import TrainConfig, class_noun
from dreambooth_nb.errors import ConfigError, DataError, DreamboothError
from dreambooth_nb.results.compare import load_rgb, subject_photos
from dreambooth_nb.results.evaluate import EvalSpec, render
from dreambooth_nb.results.export import choose_snapshot, label, run_config
from dreambooth_nb.results.quality import (CLIP_MODEL, _CLIP_PIXELS, _DINO_PIXELS, EmbeddingJudge, _pixel_values,
                                           _unit)

DINO_MODEL = "facebook/dino-vits16"
IMAGES_PER_PROMPT = 4
"""The paper's: 4 images per prompt, so 100 per subject."""
METRICS = ("DINO", "CLIP-I", "CLIP-T")

# DreamBench's prompt templates, word for word from the DreamBench repository's
# dataset/prompts_and_classes.txt ({0}: the unique token, {1}: the class noun). The first ten are shared;
# objects then get new backgrounds, live subjects (cats, dogs) accessories and outfits; the last five
# change the subject's properties.
_SHARED = ("a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach",
           "a {0} {1} on a cobblestone street", "a {0} {1} on top of pink fabric", "a {0} {1} on top of a wooden floor",
           "a {0} {1} with a city in the background", "a {0} {1} with a mountain in the background",
           "a {0} {1} with a blue house in the background", "a {0} {1} on top of a purple rug in a forest")
_PROPERTIES = ("a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}")
OBJECT_TEMPLATES = _SHARED + (
    "a {0} {1} with a wheat field in the background", "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background", "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk", "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror", "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road", "a {0} {1} on top of a white rug") + _PROPERTIES
LIVE_TEMPLATES = _SHARED + (
    "a {0} {1} wearing a red hat", "a {0} {1} wearing a santa hat", "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle", "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit", "a {0} {1} in a police outfit", "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt", "a {0} {1} in a purple wizard outfit") + _PROPERTIES

PAPER = {
    "DreamBooth (Imagen), paper": {"DINO": 0.696, "CLIP-I": 0.812, "CLIP-T": 0.306},
    "DreamBooth (Stable Diffusion), paper": {"DINO": 0.668, "CLIP-I": 0.803, "CLIP-T": 0.305},
    "Real images, paper": {"DINO": 0.774, "CLIP-I": 0.885, "CLIP-T": None},
}
"""The paper's Table 1 (the real images' row: the subjects' photos against each other; no prompt, no CLIP-T)."""


def prompts(*, token: str, class_noun: str, live: bool) -> list[str]:
    """DreamBench's 25 evaluation prompts for one subject: live subjects (pets) get outfits, objects settings."""
    return [t.format(token, class_noun) for t in (LIVE_TEMPLATES if live else OBJECT_TEMPLATES)]


class DreamBenchJudge(EmbeddingJudge):
    """The paper's judges: DINO ViT-S/16 (self-supervised, so it tells two objects of one class apart) and CLIP
    ViT-B/32. An `EmbeddingJudge` whose image model is the paper's DINO, so `quality` could use it as well;
    CLIP is used the same way as there.

    Preprocessing (the paper does not state its own): CLIP's from its preprocessor_config (shorter side to 224,
    bicubic, centre crop 224, CLIP's mean and std), as `quality`. DINO's from the DINO repository's evaluation
    (shorter side to 256, bicubic, centre crop 224, ImageNet's mean and std), the normalisation DINO was
    trained with. The Hub's preprocessor_config for dino-vits16 asks instead for a plain 224 × 224 resize
    (bilinear) and mean = std = 0.5, ViT's generic default; renders are square, so only the normalisation and
    the photos' crop differ, and numbers can differ from other re-implementations in the second decimal.
    """

    @classmethod
    def standard(cls) -> "DreamBenchJudge":
        """DINO ViT-S/16 and CLIP ViT-B/32 from the Hub (cached), on the CPU; loaded once per process."""
        try:
            return _standard_judge()
        except (OSError, ValueError, ImportError) as err:  # offline, a blocked download, an old transformers
            raise DreamboothError(
                f"The DreamBench judge could not be loaded: {DINO_MODEL} and {CLIP_MODEL} "
                f"({str(err).splitlines()[0][:160]}). They download once (about 700 MB) on Colab and Kaggle "
                "(Kaggle: turn Internet on).") from err

    @classmethod
    def tiny(cls, *, seed: int = 0) -> "DreamBenchJudge":
        """A random tiny DINO ViT and `EmbeddingJudge.tiny`'s CLIP, built from configs: no download, for tests."""
        from transformers import ViTConfig, ViTModel

        clip = EmbeddingJudge.tiny(seed=seed)  # seeds torch, so the ViT below is reproducible too
        dino = ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8), add_pooling_layer=False)
        return cls(image_model=dino, clip_model=clip.clip_model, tokenizer=clip.tokenizer,
                   name="tiny random DINO + CLIP (tests)", image_pixels=clip._image_pixels,
                   clip_pixels=clip._clip_pixels)

    def image_embeddings(self, images) -> np.ndarray:
        import torch

        # DINO's embedding is the CLS token after the last layer norm (ViTModel's last_hidden_state is normed).
        with torch.no_grad():
            out = self.image_model(pixel_values=_pixel_values(images, **self._image_pixels)).last_hidden_state
        return _unit(out[:, 0])


@functools.cache
def _standard_judge() -> DreamBenchJudge:
    from transformers import CLIPModel, CLIPTokenizer, ViTModel

    return DreamBenchJudge(image_model=ViTModel.from_pretrained(DINO_MODEL, add_pooling_layer=False),
                           clip_model=CLIPModel.from_pretrained(CLIP_MODEL),
                           tokenizer=CLIPTokenizer.from_pretrained(CLIP_MODEL), name=f"{DINO_MODEL} + {CLIP_MODEL}",
                           image_pixels=_DINO_PIXELS, clip_pixels=_CLIP_PIXELS)


def score(judge: DreamBenchJudge, *, renders: dict, photos: list, token: str) -> dict:
    """DINO, CLIP-I and CLIP-T of one subject, and how many images they cover.

    `renders` maps each prompt (with the unique `token`, as `prompts` writes it) to its 4 generated images,
    `photos` lists the subject's real photos. CLIP-T compares each image with its prompt *without* the unique
    token ("a dog in the jungle"), as the paper's prompts name the class: the token was chosen to mean nothing
    to a text encoder (or, like "sks", something else: a rifle), so in CLIP's text it would only add noise to a
    score that asks whether the prompt's context is drawn.
    """
    if not renders:
        raise ConfigError("dreambench.score: no renders; render 4 images of each of `prompts(...)`.")
    if not photos:
        raise DataError("dreambench.score: no real photos of the subject to compare the renders with.")
    for prompt, images in renders.items():
        if len(images) != IMAGES_PER_PROMPT:
            raise ConfigError(f"dreambench.score: {len(images)} images of {prompt!r}; the paper's scores take "
                              f"{IMAGES_PER_PROMPT} per prompt (4 seeds).")
        if token not in prompt.split():
            raise ConfigError(f"dreambench.score: the prompt {prompt!r} does not hold the unique token {token!r}.")
    generated = [image for images in renders.values() for image in images]
    texts = [" ".join(word for word in prompt.split() if word != token) for prompt in renders]
    # Each prompt's text embedding, repeated for its images (in `generated`'s order).
    text = np.repeat(judge._clip_texts(texts), IMAGES_PER_PROMPT, axis=0)
    clip = judge._clip_images(generated)
    return {"DINO": float((judge.image_embeddings(generated) @ judge.image_embeddings(photos).T).mean()),
            "CLIP-I": float((clip @ judge._clip_images(photos).T).mean()),
            "CLIP-T": float((clip * text).sum(axis=1).mean()),
            "images": len(generated)}


def average(scores: list[dict]) -> dict:
    """Several subjects' scores as one: the mean over all their generated images (each subject weighs by its
    image count; with the paper's 100 per subject, simply the mean of the subjects)."""
    if not scores:
        raise ConfigError("dreambench.average: no scores to average.")
    weights = np.array([s["images"] for s in scores], dtype=float)
    return {**{m: float(np.average([s[m] for s in scores], weights=weights)) for m in METRICS},
            "images": int(weights.sum())}


def table(scores: dict, *, label: str = "this run") -> str:
    """A markdown table: the run's scores, then the paper's rows."""
    def cell(value):
        return "—" if value is None else f"{value:.3f}"

    rows = {f"{label} ({scores['images']} images)": scores, **PAPER}
    lines = ["| | " + " | ".join(f"{m} ↑" for m in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(row.get(m)) for m in METRICS) + " |" for name, row in rows.items()]
    return "\n".join(lines)


# --- A run's numbers -----------------------------------------------------------------------------------------
LIVE_CLASSES = frozenset({"dog", "cat", "puppy", "kitten", "pet"})
"""Class nouns DreamBench treats as live subjects (its nine live subjects are dogs and cats): they get the
outfit prompts, every other class the object prompts."""


def subject_words(instance_prompt: str, class_prompt: str | None) -> tuple[str, str]:
    """(unique token, class noun) of a subject, for DreamBench's templates: the class noun is the class prompt's
    last word ("a photo of a dog" → "dog"; without one, the instance prompt's), the token the instance
    prompt's words before it that the class prompt lacks ("a photo of sks dog" → "sks")."""
    words = instance_prompt.split()
    noun = class_noun(instance_prompt, class_prompt)
    if noun not in words:
        raise ConfigError(f"dreambench: the instance prompt {instance_prompt!r} does not name the class {noun!r} of "
                          f"{class_prompt!r}; DreamBench's prompts need both, as 'a photo of sks {noun}'.")
    known = set((class_prompt or "").split())
    token = [w for w in words[:words.index(noun)] if w not in known and w not in ("a", "an", "the", "photo", "of")]
    if not token:
        raise ConfigError(f"dreambench: no unique token before {noun!r} in the instance prompt {instance_prompt!r}; "
                          f"write it as 'a photo of sks {noun}'.")
    return " ".join(token), noun


@dataclass
class Result:
    snapshot: Path
    scores: dict
    """DINO, CLIP-I, CLIP-T (means over every generated image) and how many images."""

    @property
    def table(self) -> str:
        return table(self.scores, label=label(self.snapshot))


def measure(run_or_snapshot, *, judge: DreamBenchJudge | None = None, live: bool | None = None, device=None,
            num_inference_steps: int | None = None, guidance_scale: float = 0) -> Result:
    """The DreamBench numbers of a run's snapshot (`export.choose_snapshot`: the suggested one, else the last;
    or the snapshot given): each subject's 25 prompts × 4 seeds rendered (cached like every render; the
    sampler and guidance the model's own, as `EvalSpec.for_config` gives them) and scored against its photos.
    `live`: the outfit prompts (None: for a class noun in `LIVE_CLASSES`)."""
    snapshot = choose_snapshot(run_or_snapshot)
    config = run_config(snapshot)
    if not config:
        raise ConfigError(f"{snapshot}: DreamBench measures a run's snapshot (it needs the run's photos and prompts); "
                          "pass a run folder or one of its snapshots.")
    judge = judge or DreamBenchJudge.standard()
    train_config = TrainConfig.from_json(snapshot.parent.parent / "config.json")  # (`run_config` found it)
    scores = []
    for subject in config["concepts"]:
        token, noun = subject_words(subject["instance_prompt"], subject.get("class_prompt"))
        texts = prompts(token=token, class_noun=noun, live=noun in LIVE_CLASSES if live is None else live)
        overrides = {"num_inference_steps": num_inference_steps} if num_inference_steps else {}
        spec = EvalSpec.for_config(train_config, prompts=texts, seeds=list(range(IMAGES_PER_PROMPT)),
                                   guidance_scale=guidance_scale, **overrides)
        renders: dict = {}
        for item in render(snapshot, spec, device=device):
            renders.setdefault(item.prompt, []).append(load_rgb(item.image))
        scores.append(score(judge, renders=renders, token=token,
                            photos=subject_photos(subject, resolution=config.get("resolution"))))
    return Result(snapshot=snapshot, scores=average(scores))
