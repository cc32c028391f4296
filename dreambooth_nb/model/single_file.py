"""Any base model as input: a single `.safetensors` / `.ckpt` checkpoint (a community model on Drive, a file
you downloaded) becomes a local diffusers folder once, through diffusers' own single-file loader.

    TrainConfig(pretrained_model_name_or_path="/content/drive/MyDrive/models/dreamshaper_8.safetensors", ...)

The file names its weights in the original layout and carries no configs, so they come from a known base of
the same family, offline: the family is read from the file's keys (OpenAI CLIP: SD 1.x, OpenCLIP: SD 2.x),
the configs from `known_models/` (SD 1.5, SD 2.1), and every tensor's shape is checked against them before
anything is converted. Only the tokenizer (1.5 MB, not shipped) comes from the Hub, once, into its cache.
SD 2.x comes as 512 px epsilon models (2.x-base) and 768 px v-prediction models, with the same shapes: the
file's `modelspec.prediction_type`, else the AUTOMATIC1111 `.yaml` beside it, else ComfyUI's test of the
weights decides.

**The cache** (`cache_root()`): `~/.cache/dreambooth_nb/single-file/`, on the machine's own disk beside the
Hugging Face cache, not on Google Drive. A converted SD 1.5 is 2–4 GB; a free Drive has 15 GB and every file
written there counts against it, deleted ones too until the Trash is emptied, while Colab's VM disk has tens
of GB free and is fast. The VM disk is lost on a disconnect, and that is fine: the file stays the source of
truth (it is what snapshots name as their base), and the next session converts it again in a minute or two.
A folder is keyed by the file's size, modification time, header and first and last MiB, so a changed file is
never served stale. `DREAMBOOTH_NB_CACHE` moves the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth_nb import storage
from dreambooth_nb.config import is_single_file
from dreambooth_nb.quiet import silenced
from dreambooth_nb.model import KNOWN_MODELS
from dreambooth_nb.errors import ConfigError
from dreambooth_nb.dtypes import diffusers_dtype
from dreambooth_nb.model.layout import LAYOUTS, Weights, entries_for

CACHE_ENV = "DREAMBOOTH_NB_CACHE"
MARKER = "single_file.json"  # written last into a converted folder: where it came from, what was detected


@dataclass(frozen=True)
class KnownBase:
    """A base whose configs fit a family of single files: `folder` holds model_index.json and each part's
    config.json (a tokenizer/ too, or it comes from the Hub id `repo`). `sample_size` by prediction type,
    for families whose 512 px and 768 px models share every shape."""

    repo: str
    folder: Path
    sample_size: dict[str, int] | None = None


KNOWN_BASES = {
    "sd1": KnownBase("stable-diffusion-v1-5/stable-diffusion-v1-5",
                     KNOWN_MODELS / "stable-diffusion-v1-5" / "stable-diffusion-v1-5"),
    # stabilityai/stable-diffusion-2-1 is 768 px v-prediction; its "-base" sibling is 512 px epsilon.
    "sd2": KnownBase("stabilityai/stable-diffusion-2-1", KNOWN_MODELS / "stabilityai" / "stable-diffusion-2-1",
                     sample_size={"epsilon": 64, "v_prediction": 96}),
}
# The text encoder tells the family (the keys diffusers' single-file loader looks for, CHECKPOINT_KEY_NAMES).
FAMILY_KEYS = {"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": "sd1",
               "cond_stage_model.model.token_embedding.weight": "sd2",
               "conditioner.embedders.1.model.positional_embedding": "sdxl"}


def resolve(model: str) -> str:
    """The model to load for `model`: a single file's converted diffusers folder (converted on first use),
    anything else (a folder, a Hub id) unchanged."""
    return str(diffusers_folder(model)) if is_single_file(model) else model


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dreambooth_nb") / "single-file"


def diffusers_folder(file) -> Path:
    """The diffusers folder of single file `file`, converted once into the cache (see the module docs)."""
    file = Path(file).expanduser().resolve()
    folder = cache_root() / f"{file.stem}-{fingerprint(file)}"
    if (folder / MARKER).is_file():
        return folder
    storage.remove_partial(folder.parent)  # a conversion killed half-way (a disconnect) leaves a .tmp- folder
    kind = inspect(file)
    family, base, prediction = kind.family, kind.base, kind.prediction
    print(f"Converting {file.name} ({family.upper()}, {prediction}) into a diffusers folder, once: {folder}")
    with tempfile.TemporaryDirectory() as configs:
        configs = configs_for(base, Path(configs), prediction=prediction)
        check_shapes(file, kind.shapes, configs, family=family, base=base)
        pipe = _load(file, configs, base, dtype=kind.dtype)
        with storage.atomic_folder(folder) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            storage.write_json(tmp / MARKER, {"file": file.name, "bytes": file.stat().st_size, "family": family,
                                              "prediction_type": prediction, "configs_from": base.repo})
    return folder


@dataclass(frozen=True)
class Kind:
    """What a single file's header says: its tensors' shapes and dtype, its family (sd1, sd2), the known base
    whose configs it is read with, and its prediction type."""

    shapes: dict
    dtype: torch.dtype
    family: str
    base: KnownBase
    prediction: str


def inspect(file: Path) -> Kind:
    """The `Kind` of single file `file`, from its header (and, for SD 2.x without metadata, one tensor); a file
    that is not a complete SD 1.x / 2.x checkpoint fails here with the reason."""
    shapes, dtype, metadata = read_header(file)
    family = layout_family(file, shapes)
    return Kind(shapes=shapes, dtype=dtype, family=family, base=KNOWN_BASES[family],
                prediction=prediction_type(file, family, metadata))


def fingerprint(file: Path, *, sample: int = 2**20) -> str:
    """Size, modification time, and the first and last `sample` bytes (the header and some weights): cheap
    on a 4 GB file on Drive, and different for any other file of the same name and size."""
    stat = file.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns // 1_000_000}".encode())  # Drive keeps ms
    with open(file, "rb") as handle:
        digest.update(handle.read(sample))
        handle.seek(max(stat.st_size - sample, 0))
        digest.update(handle.read(sample))
    return digest.hexdigest()[:16]


def read_header(file: Path) -> tuple[dict[str, tuple[int, ...]], torch.dtype, dict[str, str]]:
    """Every tensor's shape (name → shape), the UNet's dtype (the converted folder keeps it: an fp16 file
    gives a 2 GB folder, not 4) and the metadata, without loading the weights (a .ckpt is mapped)."""
    first = "model.diffusion_model.input_blocks.0.0.weight"
    if file.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(file, framework="pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
            dtype = handle.get_slice(first).get_dtype() if first in shapes else "F32"
            return shapes, SAFETENSORS_DTYPES.get(dtype, torch.float32), handle.metadata() or {}
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # a pickle that holds more than tensors refuses weights_only: never run it
        raise ConfigError(f"pretrained_model_name_or_path: {file.name} cannot be read as weights only "
                          f"({type(err).__name__}); a .ckpt can run code when loaded, so it is not loaded "
                          "otherwise. Use the .safetensors version of the model.") from None
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    return {k: tuple(v.shape) for k, v in tensors.items()}, getattr(tensors.get(first), "dtype", torch.float32), {}


SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def layout_family(file: Path, shapes: dict) -> str:
    found = [family for key, family in FAMILY_KEYS.items() if key in shapes]
    where = f"pretrained_model_name_or_path: {file.name}"
    if "sdxl" in found:
        raise ConfigError(f"{where} is an SDXL checkpoint; training supports SD 1.x and 2.x so far. Use an SD 1.5 "
                          "or 2.x model.")
    if not found:
        raise ConfigError(f"{where} has no SD 1.x or 2.x text encoder (none of {', '.join(FAMILY_KEYS)}); it is "
                          "not a complete Stable Diffusion checkpoint (a LoRA, a VAE or a UNet alone?).")
    unet_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight", (0, 0))[1]
    if unet_in != 4:
        raise ConfigError(f"{where}: its UNet takes {unet_in} input channels, not 4 (an inpainting or "
                          "instruct-pix2pix model?); Dreambooth here trains text-to-image models.")
    if not any(key.startswith("first_stage_model.") for key in shapes):
        raise ConfigError(f"{where} holds no VAE (first_stage_model.*); use a complete checkpoint.")
    return found[0]


def prediction_type(file: Path, family: str, metadata: dict[str, str]) -> str:
    """epsilon or v_prediction: the file's ModelSpec metadata, else an AUTOMATIC1111 `<name>.yaml` beside it
    (`parameterization: "v"`), else, for SD 2.x, ComfyUI's test (supported_models.py, SD20.model_type: the
    last output block's norm1 bias has a standard deviation above 0.09 in v-prediction models)."""
    spec = metadata.get("modelspec.prediction_type")
    if spec:
        return "v_prediction" if spec == "v" else "epsilon"
    yaml_file = file.with_suffix(".yaml")
    if yaml_file.is_file():
        import yaml

        params = (yaml.safe_load(yaml_file.read_text()) or {}).get("model", {}).get("params", {})
        return "v_prediction" if params.get("parameterization") == "v" else "epsilon"
    if family != "sd2":
        return "epsilon"
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    bias = _read_tensor(file, key)
    return "v_prediction" if bias is not None and torch.std(bias.float(), unbiased=False) > 0.09 else "epsilon"


def _read_tensor(file: Path, key: str) -> torch.Tensor | None:
    if file.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(file, framework="pt") as handle:
            return handle.get_tensor(key) if key in handle.keys() else None
    state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    while "state_dict" in state:
        state = state["state_dict"]
    return state.get(key)


def configs_for(base: KnownBase, folder: Path, *, prediction: str) -> Path:
    """A copy of the base's config files in `folder`, with the detected prediction type (and its image size)."""
    index = base.folder / "model_index.json"
    needed = [index] + [base.folder / part / "config.json" for part in ("unet", "vae", "text_encoder")]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise ConfigError(f"pretrained_model_name_or_path: the configs of {base.repo}, which single files of this "
                          f"kind are read with, are missing: {', '.join(missing)}. Reinstall dreambooth-nb (they "
                          "ship in dreambooth_nb/known_models/).")
    for source in [p for p in base.folder.rglob("*") if p.suffix in (".json", ".txt")]:  # configs, tokenizer
        target = folder / source.relative_to(base.folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    storage.write_json(scheduler, {**json.loads(scheduler.read_text()), "prediction_type": prediction})
    if base.sample_size:
        unet = folder / "unet" / "config.json"
        storage.write_json(unet, {**json.loads(unet.read_text()), "sample_size": base.sample_size[prediction]})
    return folder


def check_shapes(file: Path, shapes: dict, configs: Path, *, family: str, base: KnownBase) -> None:
    """Every tensor the configs imply is in the file with that shape: a model of another size fails here with
    the first differences named, not deep inside diffusers' loader."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    parts = {}
    with init_empty_weights():
        modules = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet")),
                   "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")),
                   "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))}
    for name, module in modules.items():
        config = json.loads((configs / name / "config.json").read_text())
        tensors = {k: (file, tuple(v.shape)) for k, v in module.state_dict().items()}
        parts[name] = Weights(folder=configs / name, config=config, tensors=tensors)
    wrong = [f"{e.name} is {list(shapes[e.name]) if e.name in shapes else 'missing'}, {base.repo} has {list(e.shape)}"
             for e in entries_for(parts, LAYOUTS[family]) if _squeezed(shapes.get(e.name)) != _squeezed(e.shape)]
    if wrong:
        raise ConfigError(f"pretrained_model_name_or_path: {file.name} is an {family.upper()} checkpoint but not "
                          f"shaped like {base.repo}, whose configs it would be read with ({len(wrong)} tensors differ: "
                          f"{'; '.join(wrong[:3])}). Use a model of that size, or a diffusers folder of this one.")


def _squeezed(shape) -> tuple | None:
    """A shape without its 1s: some converters store the VAE's attention as linear weights ([C, C]) where ldm
    has 1×1 convolutions ([C, C, 1, 1]); diffusers' loader reads both."""
    return None if shape is None else tuple(d for d in shape if d != 1)


def _load(file: Path, configs: Path, base: KnownBase, *, dtype: torch.dtype):
    """The file as a pipeline, by diffusers' own single-file loader, with the configs in `configs`. Given a
    dtype, diffusers 0.42 casts each model after loading and warns about fp32 modules even when there are none
    ("…kept in float32: []"): that warning is silenced, nothing else."""
    from diffusers import StableDiffusionPipeline


    tokenizer = _tokenizer(base, configs)
    with silenced("diffusers.models.modeling_utils"):
        return StableDiffusionPipeline.from_single_file(
            str(file), config=str(configs), local_files_only=True, tokenizer=tokenizer, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False, **diffusers_dtype(dtype))


def _tokenizer(base: KnownBase, configs: Path):
    """The base's tokenizer: from its folder when it has one, else from the Hub (cached after the first time).
    Its size is checked against the text encoder's vocabulary: transformers 5, offline, returns an empty
    tokenizer for a Hub id it has never seen instead of failing."""
    from transformers import CLIPTokenizer

    vocabulary = json.loads((configs / "text_encoder" / "config.json").read_text())["vocab_size"]
    try:
        tokenizer = CLIPTokenizer.from_pretrained(configs / "tokenizer") if (configs / "tokenizer").is_dir() else \
            CLIPTokenizer.from_pretrained(base.repo, subfolder="tokenizer")
        why = f"{len(tokenizer)} tokens instead of {vocabulary}"
    except Exception as err:  # offline and not cached yet, or the Hub unreachable
        tokenizer, why = None, type(err).__name__
    if tokenizer is None or len(tokenizer) != vocabulary:
        raise ConfigError(f"pretrained_model_name_or_path: a single file needs the tokenizer of {base.repo} "
                          "(vocab.json and merges.txt, 1.5 MB; not shipped with dreambooth-nb), and it could not be "
                          f"loaded ({why}). Connect to the internet once; it is cached after.")
    return tokenizer
