"""Full-size random pipelines of SD 3.5 Medium and FLUX.1-dev for `gpu_check.py`: their real shapes, no weights.

    python bench/full_size.py    # CPU smoke check, no GPU: each built 1 layer deep, loaded, trained 2 steps

The GPU machine cannot download weights, and memory and FLOPs depend on the shapes only. Each part is built
from the config shipped in `dreambooth_nb/model/known_models/`, with the class its model_index.json names,
straight on the GPU in fp16 and initialised there by its own library (torch's default init for diffusers'
layers, transformers' `_init_weights` for the text encoders: small weights, norms at 1; built so on CPU,
SD 3.5 Medium's transformer, T5-XXL and 18 of FLUX.1-dev's 57 blocks keep every block's fp16 output below
20), then saved with `save_pretrained` (safetensors, fp16) before the next part is built: the GPU holds one
part at a time (at most FLUX.1-dev's transformer, 11.9 B parameters, 23.8 GB) and the host one shard of it
being written. At full size FLUX.1-dev writes 33.7 GB (T5-XXL 9.5 GB of it), SD 3.5 Medium 16.3 GB.
The tokenizers are `dreambooth_nb.toy.tiny`'s offline ones, a few words each; the encoders keep their real
vocabulary sizes (the embeddings' memory), which the tokenizers' few ids index.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth_nb.model import KNOWN_MODELS  # noqa: E402

KNOWN = {"sd3": KNOWN_MODELS / "stabilityai" / "stable-diffusion-3.5-medium",
         "flux": KNOWN_MODELS / "black-forest-labs" / "FLUX.1-dev"}
DEPTHS = ("num_layers", "num_single_layers", "num_hidden_layers")  # the stacks' lengths in these configs


def build_full_size_pipeline(known: Path, path, *, device: str, depth: int | None = None) -> Path:
    """Save a random pipeline with the shapes of the config folder `known` to `path` and return it; `device`:
    where the parts are built ("cuda": seconds for 12 B parameters). `depth`: at most this many layers per
    stack, every width kept (the CPU smoke check); None: full size."""
    import torch

    path = Path(path)
    # model_index.json and the scheduler's config as they are; each part's config.json is rewritten by its save.
    shutil.copytree(known, path)
    index = json.loads((known / "model_index.json").read_text())
    for name, entry in index.items():
        if name.startswith("_") or entry[0] is None or name == "scheduler":
            continue
        if name.startswith("tokenizer"):
            _tokenizer(entry[1]).save_pretrained(path / name)
            continue
        model = _build_part(path / name, *entry, device=device, depth=depth)
        model.save_pretrained(path / name, safe_serialization=True)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # before the next part, and before the cases' fresh processes
    return path


def _build_part(folder: Path, library: str, class_name: str, *, device: str, depth: int | None):
    """The random model of `folder`'s config.json, in fp16 on `device`."""
    import torch

    model_class = getattr(importlib.import_module(library), class_name)
    config = json.loads((folder / "config.json").read_text())
    shallower = {key: min(config[key], depth) for key in DEPTHS if key in config} if depth else {}
    # Created in fp16 where it lives: no fp32 copy (48 GB for FLUX.1-dev's transformer) and no host detour.
    with torch.device(device), _default_dtype(torch.float16):
        if library == "diffusers":
            model = model_class.from_config({**config, **shallower})
        else:
            model = model_class(model_class.config_class.from_pretrained(folder, **shallower))
    # Buffers computed in fp32 (SD3's sin-cos position table) are stored in fp16 as in the real checkpoints.
    return model.half()


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _tokenizer(class_name: str):
    from dreambooth_nb.toy.tiny import TINY_WORDS, build_t5_tokenizer, build_tokenizer

    if class_name == "CLIPTokenizer":
        return build_tokenizer(TINY_WORDS, model_max_length=77)
    if class_name == "T5TokenizerFast":
        return build_t5_tokenizer(TINY_WORDS)
    raise ValueError(f"no offline tokenizer for {class_name}")


def smoke() -> int:
    """Each family built 1 layer deep on CPU, loaded by its pipeline class, and trained 2 steps in fp32 (FLUX.1
    without its 4-bit base: bitsandbytes quantizes on CUDA only)."""
    import diffusers
    import numpy as np
    from PIL import Image

    from dreambooth_nb import preset, train

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        photos = work / "photos"
        photos.mkdir()
        rng = np.random.RandomState(0)
        for i in range(2):
            Image.fromarray((rng.rand(96, 80, 3) * 255).astype("uint8")).save(photos / f"{i}.png")
        for kind, known in KNOWN.items():
            t0 = time.monotonic()
            path = build_full_size_pipeline(known, work / kind, device="cpu", depth=1)
            built = time.monotonic() - t0
            pipeline_class = getattr(diffusers, json.loads((path / "model_index.json").read_text())["_class_name"])
            pipe = pipeline_class.from_pretrained(path)
            del pipe
            losses = []
            train(preset(kind, pretrained_model_name_or_path=str(path), instance_data_dir=str(photos),
                         instance_prompt="a photo of sks dog", resolution=64, max_train_steps=2,
                         mixed_precision="no", output_dir=str(work / f"{kind}-run")),
                  on_step=lambda step, loss, lr: losses.append(loss), progress_bar=False)
            print(f"{kind}: built in {built:.0f} s, loaded by {pipeline_class.__name__}, trained: losses {losses}",
                  flush=True)
            shutil.rmtree(path)
    return 0


if __name__ == "__main__":
    sys.exit(smoke())
