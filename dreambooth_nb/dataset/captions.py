"""Draft captions for a photo folder: a captioning model describes each photo that has no caption yet, and
the words naming the subject become `[trigger]` ("a small brown dog on a beach" → "[trigger] on a beach").

Captions help when the photos differ in ways the subject does not (a beach, a sofa, a hat): said in the
caption, the background is not learned as part of the subject. Writing ten of them by hand is the chore that
keeps people from doing it, so the setup notebook drafts them and shows them for editing. Drafts are only
ever written where a photo has no caption (or an empty one): a caption someone wrote is never replaced.

Why Florence-2 base by default (`DEFAULT_MODEL`): what counts on a free T4 is caption quality per second,
since the captioner runs once per photo folder, before training, in the same 16 GB and the same session.
Florence-2 base has ≈ 0.23 B parameters, BLIP-large (`BLIP_MODEL`, the usual alternative) ≈ 0.47 B, about
twice as many, so Florence-2 base should take about half the memory and time (by parameter count); their
COCO-caption CIDEr scores as published (Florence-2 base zero-shot in its paper, BLIP ViT-L fine-tuned on COCO
in its paper) are comparable.
BLIP-large also has a known artefact, a leading "arafed" ("arafed dog sitting on the grass"), cleaned here.
Neither was measured on real photos here (this package is built and tested offline, with tiny random
models): that measurement — seconds per photo on a T4 and the captions of a real photo set side by side — is
left for a machine with the weights.

The model is loaded through transformers' own classes (Florence-2 is native in transformers 5 as
`Florence2ForConditionalGeneration`): never with `trust_remote_code`, which runs code from the model's
repository. `florence-community/Florence-2-base` is that native conversion; the `microsoft/Florence-2-*`
repositories need their own code, and their weights do not fit the native classes (refused on load, with
what to use instead).
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from dreambooth_nb.dataset.images import CAPTION_SUFFIX, TRIGGER, load_image
from dreambooth_nb.dtypes import transformers_dtype
from dreambooth_nb.errors import ConfigError, DataError
from dreambooth_nb.progress import in_task, report
from dreambooth_nb.storage import atomic_write_text

__all__ = ["BLIP_MODEL", "DEFAULT_MODEL", "Captioner", "Draft", "draft_captions", "subject_to_trigger"]

DEFAULT_MODEL = "florence-community/Florence-2-base"
BLIP_MODEL = "Salesforce/blip-image-captioning-large"
MAX_NEW_TOKENS = 50
"""Bounds a caption's length: one sentence is 10–25 tokens, and SD 1.x/2.x read at most 77 in all."""
FLORENCE_TASK = "<CAPTION>"
# Florence-2's <CAPTION> gives one sentence about what is where ("A dog sitting on a beach."), which is what a
# Dreambooth caption should be. <DETAILED_CAPTION> gives a paragraph ("The image shows a ... In the background
# ...") that spells out the subject's own look in detail — exactly what the token should learn instead — and
# runs past the 77 tokens the text encoder of SD 1.x/2.x reads.
CAPTION_SIDE = 768
"""Photos are loaded at this shorter side for captioning: Florence-2 sees 768 × 768, BLIP-large 384 × 384."""


class Captioner:
    """A captioning model and its processor, on one device: `Captioner.load(name)`, then `caption(images)`.

    Use it as a context manager (or call `close`) so the GPU memory it holds is free again for training.
    """

    def __init__(self, *, model, processor, kind: str, name: str, device, dtype):
        self.model = model
        self.processor = processor
        self.kind = kind  # the config's model_type: "florence2" or "blip"
        self.name = name
        self.device = device
        self.dtype = dtype

    @classmethod
    def load(cls, name_or_path: str = DEFAULT_MODEL, *, device=None, dtype=None) -> Captioner:
        """Load a Florence-2 (native transformers conversion) or BLIP captioning model from the Hub or a folder.

        The class is chosen by the checkpoint's `model_type`, not by its name, so a fine-tuned copy or a local
        folder works alike. `device` defaults to CUDA when there is one, `dtype` to float16 there and float32 on
        the CPU (float16 matmuls are slow or missing on CPUs). Raises `ConfigError` naming the model and what to
        do when it cannot be downloaded, is not a captioning model this understands, or its weights do not fit.
        """
        import torch
        from transformers import AutoConfig

        name = str(name_or_path)
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype if dtype is not None else torch.float16 if device.type == "cuda" else torch.float32
        try:
            kind = AutoConfig.from_pretrained(name).model_type
        except Exception as err:  # offline, gated, misspelt, not a model folder: each means "cannot load it"
            raise ConfigError(_cannot_load(name, err)) from None
        model_class, processor_class = _classes(kind, name)
        try:
            processor = processor_class.from_pretrained(name)
            model, info = model_class.from_pretrained(name, **transformers_dtype(dtype), output_loading_info=True)
        except Exception as err:  # the same, or files of another version of the processor or weights
            raise ConfigError(_cannot_load(name, err)) from None
        missing = sorted(info["missing_keys"])
        # Over a tenth of the weights missing: a checkpoint of another layout, whose random stand-ins would
        # caption nonsense without a word of warning. (A few missing are transformers' business: tied tensors.)
        if len(missing) > len(model.state_dict()) // 10:
            raise ConfigError(f"Captioning model {name!r}: {len(missing)} of its weights do not fit "
                              f"transformers' {kind} model (e.g. {missing[0]}); it is probably "
                              f"a checkpoint for its own code (trust_remote_code, never used here). Use "
                              f"{DEFAULT_MODEL!r}, transformers' own conversion, or {BLIP_MODEL!r}.")
        return cls(model=model.to(device).eval(), processor=processor, kind=kind, name=name, device=device,
                   dtype=dtype)

    def caption(self, images: Sequence) -> list[str]:
        """One cleaned caption per PIL image, in one batch, deterministic (beam search as Florence-2's model
        card recommends, greedy as BLIP's card does; no sampling)."""
        import torch

        if self.model is None:
            raise RuntimeError(f"the captioner {self.name!r} was closed")
        images = [image.convert("RGB") for image in images]
        if not images:
            return []
        if self.kind == "florence2":
            inputs = self.processor(images=images, text=[FLORENCE_TASK] * len(images), return_tensors="pt")
            options = {"num_beams": 3}
        else:
            inputs = self.processor(images=images, return_tensors="pt")  # no text: BLIP's unconditional caption
            options = {"num_beams": 1}
        inputs = {key: value.to(self.device, dtype=self.dtype) if value.is_floating_point() else value.to(self.device)
                  for key, value in inputs.items()}
        with torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, **options)
        return [_clean(text) for text in self.processor.batch_decode(out, skip_special_tokens=True)]

    def close(self) -> None:
        """Drop the model and give its GPU memory back (training needs all of the 16 GB)."""
        import torch

        self.model = self.processor = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> Captioner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _classes(kind: str, name: str) -> tuple:
    """(model class, processor class) for a checkpoint's `model_type`; Florence-2's need transformers 4.56 or later
    (where it became native), which an older Colab image may not have."""
    if kind == "blip":
        from transformers import BlipForConditionalGeneration, BlipProcessor

        return BlipForConditionalGeneration, BlipProcessor
    if kind != "florence2":
        raise ConfigError(f"Captioning model {name!r} is a {kind!r} model; drafting captions needs Florence-2 "
                          f"(e.g. {DEFAULT_MODEL!r}) or BLIP (e.g. {BLIP_MODEL!r}).")
    try:
        from transformers import Florence2ForConditionalGeneration, Florence2Processor
    except ImportError:
        import transformers

        raise ConfigError(f"Captioning model {name!r} is a Florence-2, which this transformers "
                          f"({transformers.__version__}) does not have yet (it came in 4.56): run "
                          "`pip install -U transformers` and restart, or set CAPTIONER to "
                          f"{BLIP_MODEL!r}.") from None
    return Florence2ForConditionalGeneration, Florence2Processor


def _cannot_load(name: str, err: BaseException) -> str:
    why = (str(err).splitlines() or [type(err).__name__])[0][:160]
    florence = (f" For Florence-2 use {DEFAULT_MODEL!r}: the microsoft/ repositories need code of their own."
                if name.lower().startswith("microsoft/florence") else "")
    return (f"Captioning model {name!r} could not be loaded ({why}). Check the name; it downloads once (Kaggle: "
            "turn Internet on; HF_TOKEN for a gated model), or give the folder of a downloaded copy. Or skip "
            f"drafting and write the captions yourself.{florence}")


# BLIP's artefacts: "arafed" and its kin (from captions of web images whose alt text was a file name), and
# openings that say nothing about the photo. "a photo of" goes too: instance prompts often begin with it.
_ARAFED = re.compile(r"\b(?:araf+ed|araf+e|araf+ly|araf+)\b\s*", re.IGNORECASE)
_OPENING = re.compile(r"^(?:there (?:is|are) |this is |(?:the|this) (?:image|picture|photo) (?:shows|depicts|is of) "
                      r"|(?:an? )?(?:image|picture|photo|photograph) of )", re.IGNORECASE)


def _clean(text: str) -> str:
    """A model's caption as a draft: artefacts and empty openings removed, one line, no full stop, lower case
    first letter (it reads on after the trigger or is edited; "A dog" → "a dog", "TV" stays)."""
    text = " ".join(_ARAFED.sub("", text).split())
    while (shorter := _OPENING.sub("", text)) != text:
        text = shorter
    text = text.rstrip(" .")
    if text[:2].istitle():
        text = text[0].lower() + text[1:]
    return text


# --- the subject in a caption -------------------------------------------------------------------------------
_DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "one", "my", "your", "his", "her", "its", "our",
                "their", "some", "another"}
# Words that end a noun phrase when read backwards from the noun: then what comes before is not the subject's
# description ("a man holding a dog": "holding" is not an attribute of the dog). Numbers stay in the caption.
_NOT_ATTRIBUTES = {"and", "or", "but", "with", "without", "of", "on", "in", "at", "by", "for", "from", "to", "into",
                   "onto", "near", "next", "under", "over", "behind", "beside", "between", "while", "as", "is",
                   "are", "was", "were", "be", "has", "have", "it", "he", "she", "they", "there", "who", "holding",
                   "wearing", "carrying", "petting", "hugging", "riding", "feeding", "walking", "two", "three",
                   "four", "five", "six", "several", "many"}
_MODIFIERS = 3
_IRREGULAR = {"man": "men", "woman": "women", "person": "people", "child": "children", "mouse": "mice",
              "goose": "geese", "foot": "feet", "tooth": "teeth"}
# Captioners name people and young animals more precisely than class prompts do: a "person" subject is
# captioned "a man ...", a "dog" one "a puppy ...". These count as the class noun.
_ALSO = {"person": ("man", "woman", "boy", "girl", "child", "lady", "guy"), "dog": ("puppy",), "cat": ("kitten",)}


def _noun_forms(noun: str) -> list[str]:
    """The class noun, its everyday synonyms (`_ALSO`) and their plurals, longest first."""
    forms = set()
    for word in (noun, *_ALSO.get(noun, ())):
        forms |= {word, word + "s", word + "es"}
        if re.search(r"[^aeiou]y$", word):
            forms.add(word[:-1] + "ies")
        if word in _IRREGULAR:
            forms.add(_IRREGULAR[word])
    return sorted(forms, key=len, reverse=True)


def subject_to_trigger(caption: str, class_noun: str) -> tuple[str, bool]:
    """(caption with the first noun phrase naming the subject replaced by `[trigger]`, whether one was found).

    The noun phrase is the class noun (any case, singular or plural, a whole word: "cat" is not in "catalog")
    with its determiner and up to three words between them: "The small brown dog sits" → "[trigger] sits". The
    attributes go with the noun on purpose: what the subject always looks like (small, brown) is what the
    token should learn; said in every caption, the caption would explain it instead, and the token alone would
    render a dog of some other size and colour. Without a determiner only the noun is replaced, except at the
    start of the caption ("brown dog on grass" → "[trigger] on grass"), since "man holding dog" cannot be told
    apart from adjectives without one. Not found: "[trigger], " + the caption, for the person to edit.
    """
    noun = " ".join(class_noun.lower().split())
    caption = " ".join(caption.split())
    if not noun:
        raise ConfigError("class_noun is empty: give the word naming the subject's class, e.g. 'dog'.")
    forms = "|".join(re.escape(form).replace(r"\ ", r"\s+") for form in _noun_forms(noun))
    match = re.search(rf"(?<![\w-])(?:{forms})(?![\w-])", caption, re.IGNORECASE)
    if match is None:
        return (f"{TRIGGER}, {caption}" if caption else TRIGGER), False
    start = _phrase_start(caption, match.start())
    return " ".join(f"{caption[:start]}{TRIGGER}{caption[match.end():]}".split()), True


def _phrase_start(caption: str, noun_start: int) -> int:
    """Where the noun phrase ending in the noun at `noun_start` begins (see `subject_to_trigger`)."""
    words = list(re.finditer(r"\S+", caption[:noun_start]))
    modifiers = 0
    for word in reversed(words):
        text = word.group().lower()
        if text in _DETERMINERS:
            return word.start()
        if modifiers == _MODIFIERS or text in _NOT_ATTRIBUTES or not re.fullmatch(r"[a-z][a-z'-]*", text):
            return noun_start
        modifiers += 1
    return 0  # only attributes before the noun: the caption opens with the subject


# --- drafting a folder --------------------------------------------------------------------------------------
@dataclass
class Draft:
    """What `draft_captions` did for one photo. `text` is the photo's caption now: the draft, or `existing`
    (the caption that was already there, left as it was; None when there was none). `found_subject`: the text
    names the subject with `[trigger]` where the class noun stood (False: "[trigger], " was put in front, or an
    existing caption has no `[trigger]`), so the notebook can point at the drafts to check."""

    photo: Path
    text: str
    written: bool
    found_subject: bool
    existing: str | None = None


def draft_captions(photos, *, class_noun: str, captioner: Captioner | Callable[[], Captioner],
                   batch_size: int = 8) -> list[Draft]:
    """Caption every photo that has no caption file (`dog1.txt` beside `dog1.jpg`, missing or empty), with
    `[trigger]` for the subject (`subject_to_trigger`), and write it; one `Draft` per photo, in order.

    An existing caption is never replaced, so there is no overwrite switch: delete or empty a caption file to
    have it drafted again. `captioner` is a `Captioner`, or a function returning one that is called only when
    some photo needs a caption (a fully captioned folder loads no model); a captioner made here is closed
    here, one passed in is left to its owner. Photos are captioned `batch_size` at a time.
    """
    photos = [Path(p) for p in photos]
    drafts: list[Draft | None] = []
    missing: list[int] = []
    for i, photo in enumerate(photos):
        existing = _existing_caption(photo.with_suffix(CAPTION_SUFFIX))
        drafts.append(None if existing is None else
                      Draft(photo, existing, written=False, found_subject=TRIGGER in existing.lower(),
                            existing=existing))
        if existing is None:
            missing.append(i)
    if not missing:
        return drafts
    made_here = not hasattr(captioner, "caption")
    model = captioner() if made_here else captioner
    try:
        with tqdm(total=len(missing), desc="Captions", **({"disable": True} if in_task() else {})) as bar:
            for start in range(0, len(missing), batch_size):
                report("drafting captions", start, len(missing))
                batch = missing[start:start + batch_size]
                texts = model.caption([load_image(photos[i], max_side=CAPTION_SIDE) for i in batch])
                for i, caption in zip(batch, texts):
                    drafts[i] = _write_draft(photos[i], caption, class_noun)
                bar.update(len(batch))
    finally:
        if made_here:
            model.close()
    return drafts


def _existing_caption(path: Path) -> str | None:
    """The caption in `path` (whitespace joined), or None when there is none to keep: no file, or only
    whitespace in it. Text that is not UTF-8 is kept too (shown with replacement characters): it is someone's
    caption in another encoding, which `scan_images` asks them to save again."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DataError(f"{path} cannot be read ({err.strerror or err}), so it is not known whether it holds a "
                        "caption. Fix or delete it, then draft again.") from None
    text = " ".join(raw.decode("utf-8-sig", errors="replace").split())
    return text or None


def _write_draft(photo: Path, caption: str, class_noun: str) -> Draft:
    path = photo.with_suffix(CAPTION_SUFFIX)
    existing = _existing_caption(path)  # again: two photos of one name (dog1.jpg, dog1.png) share a caption
    if existing is not None:
        return Draft(photo, existing, written=False, found_subject=TRIGGER in existing.lower(), existing=existing)
    text, found = subject_to_trigger(caption, class_noun)
    atomic_write_text(path, text + "\n")
    return Draft(photo, text, written=True, found_subject=found)
