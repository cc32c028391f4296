"""What a class folder holds for prior preservation: your images first, generated ones by index, and what is
still missing. Training uses exactly `num_class_images`: your usable images (any name but `class-NNNNN.png`,
in name order), then generated ones by index; `training.priors` generates only what is missing.

A caption beside a class image (`class-00003.txt`, or one of yours) is that image's prompt, `[trigger]` standing
for the class prompt, as in a photo folder: `class_images_from_captions` writes the prompt each image was
generated from there, so training pairs the image with its own scene.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth_nb.dataset.images import IMAGE_SUFFIXES, caption_prompt, scan_images

_NAME = "class-{:05d}.png"
_NAME_RE = re.compile(r"^class-(\d{5})\.png$")


def class_image_path(folder, index: int) -> Path:
    return Path(folder) / _NAME.format(index)


@dataclass
class ClassImages:
    """What the class folder holds for a run that wants `wanted` class images, and what it still needs."""

    folder: Path
    wanted: int
    yours: list[Path] = field(default_factory=list)
    """Usable images you put in the folder (any name but `class-NNNNN.png`), in name order."""
    generated: dict[int, Path] = field(default_factory=dict)
    """Usable generated images by index."""
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Files that cannot be used, with the reason (not counted)."""
    captions: dict[Path, str] = field(default_factory=dict)
    """The caption of each usable image that has one (`images.scan_images`)."""
    warnings: list[str] = field(default_factory=list)
    """What the folder's scan warned about (a caption without its image, identical images, ...)."""

    def prompts(self, class_prompt: str) -> list[str]:
        """The prompt of each selected image: its caption with `[trigger]` replaced by `class_prompt`, else
        `class_prompt`."""
        return [caption_prompt(self.captions[p], class_prompt) if p in self.captions else class_prompt
                for p in self.selected]

    @property
    def to_generate(self) -> list[int]:
        """Indices of the generated images still needed: the shortfall after your images."""
        return [i for i in range(max(0, self.wanted - len(self.yours))) if i not in self.generated]

    @property
    def selected(self) -> list[Path]:
        """The images training uses, once nothing is missing: yours first, then generated ones by index."""
        needed = max(0, self.wanted - len(self.yours))
        return self.yours[:self.wanted] + [self.generated[i] for i in range(needed) if i in self.generated]

    def summary(self) -> str:
        used_yours = min(len(self.yours), self.wanted)
        used_generated = max(0, self.wanted - len(self.yours)) - len(self.to_generate)
        lines = [f"{self.folder}: {self.wanted} class images wanted — {used_yours} of yours"
                 + (f" (of {len(self.yours)} found)" if len(self.yours) > self.wanted else "")
                 + f", {used_generated} generated earlier, {len(self.to_generate)} to generate."]
        lines += [f"  Skipped {path.name}: {reason}" for path, reason in self.skipped]
        lines += [f"  Warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


def class_images(subject, *, resolution: int, decode: bool = True) -> ClassImages:
    """The class folder of `subject` (a `config.Concept`) as training at `resolution` will use it.
    `decode=False` trusts file names and extensions instead of opening every image (the disk plan's quick
    count)."""
    folder = Path(subject.class_data_dir)
    found = ClassImages(folder=folder, wanted=subject.num_class_images)
    if decode:
        report = scan_images(folder, resolution=resolution, min_images=0, allow_empty=True)
        usable, found.skipped, found.captions, found.warnings = (report.usable, report.skipped, report.captions,
                                                                 report.warnings)
    else:
        usable = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    for path in usable:
        match = _NAME_RE.match(path.name)
        if match:
            found.generated[int(match.group(1))] = path
        else:
            found.yours.append(path)
    return found
