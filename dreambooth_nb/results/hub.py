"""Share a trained model on the Hugging Face Hub: a private repository by default, with a model card.

    from dreambooth_nb import push_to_hub
    push_to_hub("project/runs/lr2e-6", "you/sks-dog", single_file="project/exports/sks-dog.safetensors")

What goes up: the chosen snapshot as a complete diffusers folder (a partial one composed with its base model
first, so `StableDiffusionPipeline.from_pretrained("you/sks-dog")` works), the exported single file if there
is one (with its `.yaml`), the snapshot's rendered samples and the project's newest comparison grid as the
card's gallery, and the card. Nothing else: never a training state, the latent cache, the photos, the run's
config (it holds local paths) or `snapshot.json` (it names the base model's local path).

The token: `token=`, else where the notebooks find it (`environment.find_hf_token`: HF_TOKEN, a Colab or Kaggle
secret). It goes to `huggingface_hub` only; it is never printed and never written into the card or a file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth_nb.model import snapshots
from dreambooth_nb import storage
from dreambooth_nb.environment import find_hf_token
from dreambooth_nb.errors import ConfigError
from dreambooth_nb.model.base import BaseModel
from dreambooth_nb.results.evaluate import render_dir
from dreambooth_nb.results.export import base_name, choose_snapshot, how_to_use, label, run_config, subject_prompts
from dreambooth_nb.units import disk_size
from dreambooth_nb.quiet import silenced

LIBRARY = "dreambooth-nb"
LIBRARY_URL = "https://github.com/dreambooth-nb/dreambooth-nb"
GALLERY_SAMPLES = 8
@dataclass(frozen=True)
class License:
    """A model's license as its Hub card states it: `license` (an id the Hub knows, or "other"), and for "other"
    its `license_name` and `license_link`."""

    id: str
    name: str | None = None
    link: str | None = None

    @property
    def title(self) -> str:
        return self.name or self.id


# Licenses of the usual bases, for when their cards cannot be read (offline, or gated: FLUX.1-dev's card needs
# the accepted license): what each model card says.
KNOWN_LICENSES = {"stable-diffusion-v1-5/stable-diffusion-v1-5": License("creativeml-openrail-m"),
                  "runwayml/stable-diffusion-v1-5": License("creativeml-openrail-m"),
                  "CompVis/stable-diffusion-v1-4": License("creativeml-openrail-m"),
                  "stabilityai/stable-diffusion-2-1": License("openrail++"),
                  "stabilityai/stable-diffusion-2-1-base": License("openrail++"),
                  "stabilityai/stable-diffusion-xl-base-1.0": License("openrail++"),
                  "stabilityai/stable-diffusion-3.5-medium": License(
                      "other", "stabilityai-ai-community",
                      "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/LICENSE.md"),
                  # Non-commercial, gated: what is made with it may be shared only under its terms.
                  "black-forest-labs/FLUX.1-dev": License(
                      "other", "flux-1-dev-non-commercial-license",
                      "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"),
                  "black-forest-labs/FLUX.1-schnell": License("apache-2.0")}


def push_to_hub(run_or_snapshot, repo_id: str, *, private: bool = True, token: str | None = None,
                step: int | None = None, single_file=None) -> str:
    """Upload the snapshot (a run: its snapshot at `step`, else its last) to the model repository `repo_id`
    ("you/name"; created when missing, private unless `private=False`), with `single_file` (an export of it)
    and a model card. Returns the repository's URL."""
    from huggingface_hub import create_repo, upload_folder

    if not re.fullmatch(r"([\w.-]+/)?[\w.-]+", repo_id or ""):
        raise ConfigError(f"REPO_ID: {repo_id!r} is not a repository name; give 'you/name' (or just 'name', in your "
                          "own namespace).")
    snapshot = choose_snapshot(run_or_snapshot, step=step)
    token = token or find_hf_token()[0]
    if not token:
        raise ConfigError("HF_TOKEN: pushing to the Hub needs a token with write access. Create one at "
                          "https://huggingface.co/settings/tokens and add it as a secret named HF_TOKEN (Colab: the "
                          "key icon; Kaggle: Add-ons > Secrets), then run this cell again.")
    with tempfile.TemporaryDirectory(prefix="dreambooth-nb-push-") as folder:
        staged = stage(snapshot, Path(folder), repo_id=repo_id, single_file=single_file)
        create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
        size = disk_size(sum(p.stat().st_size for p in staged.rglob("*") if p.is_file()))
        print(f"Uploading {label(snapshot)} ({size}) to https://huggingface.co/{repo_id} "
              f"({'private' if private else 'public'}) ...")
        upload_folder(repo_id=repo_id, folder_path=staged, token=token, repo_type="model",
                      commit_message=f"{label(snapshot)}, trained with {LIBRARY}")
    return f"https://huggingface.co/{repo_id}"


def stage(snapshot: Path, folder: Path, *, repo_id: str, single_file=None) -> Path:
    """Lay out in `folder` exactly what `push_to_hub` uploads (see the module docs); return `folder`."""
    meta = snapshots.info(snapshot)
    if snapshots.holds_adapters(meta):
        raise ConfigError(f"{snapshot}: pushing {meta['method']} snapshots is not supported yet; upload its "
                          f"{snapshots.LORA_WEIGHTS} (diffusers' format) by hand.")
    if meta["complete"]:
        for file in sorted(p for p in snapshot.rglob("*") if p.is_file() and p.name != storage.SNAPSHOT_MARKER):
            _link_or_copy(file, folder / file.relative_to(snapshot))
    else:
        with silenced("diffusers.pipelines.pipeline_utils"):  # "fp16 cannot run on the CPU": it is only saved
            pipe = snapshots.load_pipeline(snapshot, device=torch.device("cpu"),
                                           dtype=getattr(torch, meta.get("dtype") or "float32"))
        pipe.save_pretrained(folder, safe_serialization=True)
        del pipe
    files = []
    if single_file is not None:
        files = [p for p in (Path(single_file), Path(single_file).with_suffix(".yaml")) if p.is_file()]
        if not files:
            raise ConfigError(f"single_file: {single_file} does not exist; export first, or leave it out.")
        for file in files:
            _link_or_copy(file, folder / file.name)
    images = []
    for n, (image, caption) in enumerate(gallery(snapshot)):
        images.append((f"images/{n:02d}{image.suffix}", caption))
        _link_or_copy(image, folder / images[-1][0])
    storage.atomic_write_text(folder / "README.md", model_card(snapshot, meta, repo_id=repo_id, images=images,
                                                               single_file=folder / files[0].name if files else None))
    return folder


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows (no second copy of gigabytes), else a copy (Drive → VM disk)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def gallery(snapshot: Path) -> list[tuple[Path, str]]:
    """Images for the card, with captions: the snapshot's rendered samples (each PNG says what made it in its
    `dreambooth_nb` text chunk, `images.png_bytes`), then the project's newest comparison grid."""
    from PIL import Image

    found = []
    for image in sorted(render_dir(snapshot).glob("*/*.png"))[:GALLERY_SAMPLES]:
        with Image.open(image) as png:
            made = json.loads(png.text.get("dreambooth_nb", "{}"))
        found.append((image, f"{made.get('prompt', 'sample')} (seed {made.get('seed', '?')})"))
    project = next((p for p in snapshot.parents[:4] if (p / "comparisons").is_dir()), None)
    grids = sorted(project.glob("comparisons/*.png"), key=lambda p: p.stat().st_mtime) if project else []
    if grids:
        found.append((grids[-1], "Every snapshot side by side (the comparison grid)"))
    return found


def base_license(base: str | None) -> License | None:
    """The base model's license: its Hub card's, else the table of usual bases, else a single file's
    `modelspec.license`; None when unknown."""
    where = BaseModel(base).location if base else None
    if where == "hub":
        try:
            from huggingface_hub import ModelCard

            data = ModelCard.load(base).data
        except Exception:  # offline, gated, no card: the table still knows the usual bases
            return KNOWN_LICENSES.get(base)
        if not data.license:
            return KNOWN_LICENSES.get(base)
        return License(data.license, data.get("license_name"), data.get("license_link"))
    if where == "file" and base.lower().endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(base, framework="pt") as handle:
            found = (handle.metadata() or {}).get("modelspec.license")
        return License(found) if found else None
    return None


def model_card(snapshot: Path, meta: dict, *, repo_id: str, images: list[tuple[str, str]], single_file=None) -> str:
    """The repository's README.md: Hub metadata (base model, license, library, trigger, gallery) and the run."""
    from huggingface_hub import ModelCardData

    config = run_config(snapshot)
    base = meta.get("base")
    prompt = subject_prompts(config)
    license_ = base_license(base)
    data = ModelCardData(
        license=license_ and license_.id, license_name=license_ and license_.name,
        license_link=license_ and license_.link,
        base_model=base if base and base_name(base) == base else None, library_name="diffusers",
        tags=["text-to-image", "stable-diffusion", "dreambooth", "diffusers", LIBRARY], instance_prompt=prompt,
        widget=[{"text": caption, "output": {"url": path}} for path, caption in images] or None)
    title = f"{prompt} — Dreambooth" if prompt else f"{repo_id.split('/')[-1]} — Dreambooth"
    rows = [("Base model", base_name(base)), ("Trigger (instance prompt)", prompt),
            ("Class prompt", subject_prompts(config, "class_prompt")),
            ("Prior preservation", _yes(config.get("with_prior_preservation"))),
            ("Steps", f"{meta.get('step')} of {config.get('max_train_steps')}" if config else meta.get("step")),
            ("Learning rate", config.get("learning_rate")),
            ("Text encoder trained", _yes(config.get("train_text_encoder"))),
            ("Batch", f"{config['train_batch_size']} × {config['gradient_accumulation_steps']} accumulated"
             if "train_batch_size" in config else None),
            ("Resolution", config.get("resolution")), ("Seed", config.get("seed"))]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows if value not in (None, ""))
    license_text = (f"The base model's license, `{license_.title}`"
                    + (f" ([terms]({license_.link}))" if license_.link else "") + ", applies to this fine-tune."
                    if license_ else
                    "The base model's license applies to this fine-tune; see its card.")
    shown = [f"![{caption}]({path})" for path, caption in images]
    body = [f"# {title}", "",
            f"A Dreambooth fine-tune of {base_name(base)}, trained with [{LIBRARY}]({LIBRARY_URL}) "
            f"(snapshot {snapshot.name}).", "",
            "| Setting | Value |", "|---|---|", table, "",
            *(["## Images", "", *shown, ""] if shown else []),
            how_to_use(single_file, repo_id=repo_id, prompt=prompt), "",
            "## License", "", license_text, ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def _yes(value) -> str | None:
    return None if value is None else ("yes" if value else "no")
