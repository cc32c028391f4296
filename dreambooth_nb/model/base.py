"""The base model of a run, asked about in one place: where it is, what loads, its family.

    base = BaseModel.of(config)          # or BaseModel("stable-diffusion-v1-5/stable-diffusion-v1-5")
    base.family                          # SD or SDXL (`families`), from its model_index.json
    base.path, base.load_kwargs()        # what `from_pretrained` loads: a folder (a single file's converted one)
                                         # or a Hub id, and with which revision / local_files_only

`pretrained_model_name_or_path` may be a Hub id, a local diffusers folder or one single-file checkpoint
(`single_file`: converted once into a cached folder, and only when something has to load). Each question is
answered once per object (its answers are cached on it): `train` makes one per run and hands it down.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dreambooth_nb.config import model_location
from dreambooth_nb.errors import ConfigError
from dreambooth_nb.model import KNOWN_MODELS, single_file
from dreambooth_nb.model.families import Family, family_of


@dataclass(frozen=True)
class BaseModel:
    name: str
    """What the config names: a Hub id, a local folder, or a single .safetensors / .ckpt file."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""

    @classmethod
    def of(cls, config) -> "BaseModel":
        return cls(config.pretrained_model_name_or_path, revision=config.revision)

    @property
    def location(self) -> str | None:
        """"folder", "file" (a single-file checkpoint), "hub", or None (none of these: `config.model_location`)."""
        return model_location(self.name)

    @functools.cached_property
    def path(self) -> str:
        """What loads: the folder, the Hub id, or a single file's converted folder (converted on first use)."""
        return single_file.resolve(self.name)

    @property
    def local(self) -> bool:
        return model_location(self.path) == "folder"

    def load_kwargs(self) -> dict:
        """`revision` and `local_files_only` for a `from_pretrained` of one of its parts."""
        return dict(revision=self.revision, local_files_only=self.local)

    @functools.cached_property
    def index(self) -> dict:
        """Its `model_index.json`: from the folder, from `known_models/` for a known Hub id (offline), else the Hub
        (a few hundred bytes); a single file's is the known base's it is converted with (no conversion here)."""
        if self.location == "file":
            return json.loads((single_file.inspect(Path(self.name)).base.folder / "model_index.json").read_text())
        if self.local:
            return json.loads((Path(self.path) / "model_index.json").read_text())
        known = KNOWN_MODELS / self.path / "model_index.json"
        if self.revision is None and self.path.count("/") == 1 and known.is_file():
            return json.loads(known.read_text())
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(self.path, revision=self.revision)

    @functools.cached_property
    def family(self) -> Family:
        return family_of(self.index, source=self.name)

    @functools.cached_property
    def component_configs(self) -> dict[str, dict]:
        """The config of each model component (`COMPONENTS` it has), without weights and without converting a
        single file: from the folder, from `known_models/` for a known Hub id, from the Hub (a few KB), or for a
        single file the configs it will be converted with, read from its header (`single_file`)."""
        if self.location == "folder":
            return _configs_from_folder(Path(self.name), source=self.name)
        if self.location == "file":
            kind = single_file.inspect(Path(self.name))
            with tempfile.TemporaryDirectory() as folder:
                configs = single_file.configs_for(kind.base, Path(folder), prediction=kind.prediction)
                return _configs_from_folder(configs, source=self.name)
        known = KNOWN_MODELS / self.name
        if self.name.count("/") == 1 and (known / "model_index.json").is_file():
            return _configs_from_folder(known, source=self.name)
        return _configs_from_hub(self.name, revision=self.revision)

    @property
    def reference(self) -> str:
        """How snapshots and exports name it: a Hub id as is; a local folder or single file as an absolute path,
        so that a snapshot loads from any working folder (a single file, not its converted folder: that cache is
        rebuilt in each Colab session)."""
        return str(Path(self.name).expanduser().resolve()) if self.location in ("folder", "file") else self.name


# --- Its components' configs ----------------------------------------------------------------------------------
def _configs_from_folder(folder: Path, *, source: str) -> dict[str, dict]:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ConfigError(f"pretrained_model_name_or_path: {folder} has no model_index.json; point it at a "
                          "diffusers pipeline folder or at a Hub id such as "
                          "'stable-diffusion-v1-5/stable-diffusion-v1-5'.")
    index = json.loads(index_path.read_text())
    configs = {}
    for name in _components_in(index, source=source):
        path = folder / name / "config.json"
        if not path.is_file():
            raise ConfigError(f"pretrained_model_name_or_path: {path} is missing; the folder is not a complete "
                              "diffusers pipeline (save it with save_pretrained, or use the Hub id).")
        configs[name] = json.loads(path.read_text())
    return configs


@functools.lru_cache(maxsize=32)
def _configs_from_hub(model: str, *, revision: str | None) -> dict[str, dict]:
    from huggingface_hub import hf_hub_download

    def fetch(filename: str, subfolder: str | None = None) -> dict:
        try:
            path = hf_hub_download(model, filename, subfolder=subfolder, revision=revision)
            return json.loads(Path(path).read_text())
        except Exception as err:  # offline, gated, misspelt: every one means "cannot read the configs"
            raise ConfigError(f"pretrained_model_name_or_path: cannot read {subfolder + '/' if subfolder else ''}"
                              f"{filename} of {model!r} from the Hub ({type(err).__name__}); check the id and "
                              "the internet connection (and HF_TOKEN for a gated model), or give a local "
                              "folder.") from None

    index = fetch("model_index.json")
    return {name: fetch("config.json", name) for name in _components_in(index, source=model)}


def _components_in(index: dict, *, source: str) -> list[str]:
    """The model components of a pipeline of this family: its denoiser, text encoders and VAE."""
    family = family_of(index, source=source)
    names = [family.denoiser, *family.text_encoders, "vae"]
    missing = [name for name in names if not (isinstance(index.get(name), list) and index[name][0])]
    if missing:
        raise ConfigError(f"pretrained_model_name_or_path: {source} is a {index.get('_class_name', 'pipeline')} "
                          f"without {', '.join(missing)}; the planner (and training) need every part of it.")
    return names


def module_from_config(config: dict):
    """A component built from its saved config with random weights (on the meta device inside `torch.device`):
    the diffusers class its `_class_name` names, or the transformers class its `architectures` name."""
    import diffusers
    import transformers

    if "_class_name" in config:
        return getattr(diffusers, config["_class_name"]).from_config(config)
    # (without the dtype it was saved in: transformers would build in it; the caller chooses the dtype)
    fields = {k: v for k, v in config.items()
              if not k.startswith("_") and k not in ("architectures", "torch_dtype", "dtype")}
    return getattr(transformers, config["architectures"][0])(transformers.AutoConfig.for_model(**fields))


def empty_modules(configs: dict[str, dict]) -> dict:
    """The components built from their configs on the meta device: every shape and parameter, no memory."""
    import torch

    with torch.device("meta"):
        return {name: module_from_config(config) for name, config in configs.items()}


@dataclass(frozen=True)
class ComponentFacts:
    """What a component's config says about its weights, read from its modules built on the meta device."""

    parameters: int
    fp32_in_fp16: int
    """Parameters transformers keeps in fp32 when the component loads in fp16 (`_keep_in_fp32_modules`: T5's
    `wo` projections, which overflow in fp16)."""
    largest: int
    """Elements of its largest tensor: what host memory holds at once while it streams onto the GPU."""


def facts_from_configs(configs: dict[str, dict]) -> dict[str, ComponentFacts]:
    """Each component's `ComponentFacts`, from its config alone (no weights)."""
    facts = {}
    for name, module in empty_modules(configs).items():
        keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
        params = list(module.named_parameters())
        facts[name] = ComponentFacts(parameters=sum(p.numel() for _, p in params),
                                     fp32_in_fp16=sum(p.numel() for n, p in params if keep & set(n.split("."))),
                                     largest=max(p.numel() for _, p in params))
    return facts
