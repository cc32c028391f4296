"""The original Stable Diffusion (ldm) names of every tensor, per model family: the layout of the single-file
checkpoints AUTOMATIC1111 and ComfyUI read — what `results.export` writes and `single_file` reads in.

A single-file checkpoint holds the UNet, the VAE and the text encoder under the names of the original
CompVis / Stability code: `model.diffusion_model.input_blocks.1.1.…` for the UNet, `first_stage_model.…` for
the VAE, `cond_stage_model.transformer.text_model.…` for SD 1.x's CLIP and `cond_stage_model.model.…` for SD
2.x's OpenCLIP. The names are derived from each part's config (blocks, layers), one table per family
(`LAYOUTS`), following diffusers' reference converter (scripts/convert_diffusers_to_original_stable_diffusion.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dreambooth_nb.errors import ExportError


@dataclass(frozen=True)
class Target:
    """Where a diffusers tensor goes in the file. Several sources may fill one target in order (`part` of
    `parts`, concatenated along dim 0); `conv1x1` turns a linear layer's 2-D weight into a 1×1 convolution's."""

    name: str
    part: int = 0
    parts: int = 1
    conv1x1: bool = False


UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# The VAE's mid-block attention: ldm uses 1×1 convolutions where diffusers uses linear layers. diffusers
# before 0.17 named them query/key/value/proj_attn, and Hub files saved then (SD 1.5's VAE) still do.
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                 "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def unet_names(config: dict) -> dict[str, Target]:
    """diffusers' `UNet2DConditionModel` → ldm's `openaimodel.UNetModel` (SD 1.x and 2.x), from the block layout.

    ldm numbers the blocks flat. `input_blocks.0` is conv_in; each down block adds `layers` (resnet, attention)
    pairs and then its downsampler; `output_blocks` holds `layers + 1` pairs per up block, the upsampler sitting
    after the attention (index 2), or after the resnet (index 1) in a block without attention.
    """
    blocks, layers = len(config["block_out_channels"]), config["layers_per_block"]
    names = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.attentions.0": "middle_block.1"}
    resnets = {"mid_block.resnets.0": "middle_block.0", "mid_block.resnets.1": "middle_block.2"}
    for i in range(blocks):
        for j in range(layers):
            flat = 1 + i * (layers + 1) + j
            resnets[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{flat}.0"
            names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{flat}.1"
        for j in range(layers + 1):
            flat = i * (layers + 1) + j
            resnets[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{flat}.0"
            names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{flat}.1"
        if i < blocks - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op"
            after = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
            names[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (layers + 1) + layers}.{after}.conv"
    for ours, theirs in resnets.items():
        names.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in UNET_RESNET.items()})
    return {ours: Target(theirs) for ours, theirs in names.items()}


def vae_names(config: dict) -> dict[str, Target]:
    """diffusers' `AutoencoderKL` → ldm's `Encoder` / `Decoder` (diffusionmodules/model.py). ldm counts the
    decoder's up blocks from the full-resolution end, diffusers from the latent end."""
    blocks, layers = len(config["block_out_channels"]), config["layers_per_block"]
    names = {f"{side}.{name}": Target(f"{side}.{name}") for side in ("encoder", "decoder")
             for name in ("conv_in", "conv_out")}
    names |= {name: Target(name) for name in ("quant_conv", "post_quant_conv")}
    names |= {f"{side}.conv_norm_out": Target(f"{side}.norm_out") for side in ("encoder", "decoder")}
    resnets = {}
    for side in ("encoder", "decoder"):
        resnets |= {f"{side}.mid_block.resnets.{k}": f"{side}.mid.block_{k + 1}" for k in (0, 1)}
        names |= {f"{side}.mid_block.attentions.0.{ours}": Target(f"{side}.mid.attn_1.{theirs}",
                                                                  conv1x1=ours != "group_norm")
                  for ours, theirs in VAE_ATTENTION.items()}
    for i in range(blocks):
        up = blocks - 1 - i
        resnets |= {f"encoder.down_blocks.{i}.resnets.{j}": f"encoder.down.{i}.block.{j}" for j in range(layers)}
        resnets |= {f"decoder.up_blocks.{i}.resnets.{j}": f"decoder.up.{up}.block.{j}" for j in range(layers + 1)}
        if i < blocks - 1:
            names[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = Target(f"encoder.down.{i}.downsample.conv")
            names[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = Target(f"decoder.up.{up}.upsample.conv")
    for ours, theirs in resnets.items():
        names[ours] = Target(theirs)
        names[f"{ours}.conv_shortcut"] = Target(f"{theirs}.nin_shortcut")
    return names


def clip_names(config: dict) -> dict[str, Target]:
    """OpenAI CLIP (SD 1.x) under ldm's `FrozenCLIPEmbedder`: transformers' own names below `text_model.`,
    spelled out from the layer count — transformers 5 saves them without `text_model.`, 4.x with it."""
    prefixes = ["embeddings", "final_layer_norm"] + [f"encoder.layers.{i}" for i in range(config["num_hidden_layers"])]
    return {name: Target(f"text_model.{name}") for name in prefixes}


def open_clip_names(config: dict) -> dict[str, Target]:
    """OpenCLIP (SD 2.x) under ldm's `FrozenOpenCLIPEmbedder` (open_clip's text transformer): q, k and v packed
    into one `in_proj` as torch.nn.MultiheadAttention stores them ([q; k; v] along dim 0), the position
    embedding a bare parameter. diffusers keeps 23 of OpenCLIP-H's 24 layers (SD 2 reads the penultimate one)
    and no text projection; AUTOMATIC1111 and ComfyUI run the same 23 layers."""
    names = {"embeddings.token_embedding": Target("token_embedding"),
             "embeddings.position_embedding.weight": Target("positional_embedding"),
             "final_layer_norm": Target("ln_final")}
    for i in range(config["num_hidden_layers"]):
        ours, theirs = f"encoder.layers.{i}", f"transformer.resblocks.{i}"
        names |= {f"{ours}.layer_norm1": Target(f"{theirs}.ln_1"), f"{ours}.layer_norm2": Target(f"{theirs}.ln_2"),
                  f"{ours}.mlp.fc1": Target(f"{theirs}.mlp.c_fc"), f"{ours}.mlp.fc2": Target(f"{theirs}.mlp.c_proj"),
                  f"{ours}.self_attn.out_proj": Target(f"{theirs}.attn.out_proj")}
        for part, projection in enumerate("qkv"):
            for kind in ("weight", "bias"):
                names[f"{ours}.self_attn.{projection}_proj.{kind}"] = Target(f"{theirs}.attn.in_proj_{kind}",
                                                                            part=part, parts=3)
    return names


# Saved by transformers before 4.31 (SD 1.5's Hub file has it): the positions 0..76, a buffer every loader rebuilds.
NOT_WEIGHTS = {"text_encoder": {"embeddings.position_ids"}}


@dataclass(frozen=True)
class Layout:
    """A model family's single-file layout: each part's prefix in the file and its name table, and the
    `modelspec.architecture` ids (Stability AI's ModelSpec, as kohya's sd-scripts writes them) by prediction type."""

    family: str
    parts: dict[str, tuple[str, Callable[[dict], dict[str, Target]]]]
    architecture: dict[str, str]


LAYOUTS = {
    "sd1": Layout("SD 1.x", {"unet": ("model.diffusion_model.", unet_names), "vae": ("first_stage_model.", vae_names),
                             "text_encoder": ("cond_stage_model.transformer.", clip_names)},
                  {"epsilon": "stable-diffusion-v1", "v_prediction": "stable-diffusion-v1"}),
    "sd2": Layout("SD 2.x", {"unet": ("model.diffusion_model.", unet_names), "vae": ("first_stage_model.", vae_names),
                             "text_encoder": ("cond_stage_model.model.", open_clip_names)},
                  {"epsilon": "stable-diffusion-v2-512", "v_prediction": "stable-diffusion-v2-768-v"}),
}


def layout_for(configs: dict[str, dict]) -> Layout:
    """SD 2.x's text encoder is OpenCLIP (GELU), SD 1.x's is OpenAI CLIP (quick-GELU): their configs differ there."""
    if configs["unet"].get("addition_embed_type") == "text_time":
        raise ExportError("This is an SDXL model: single-file export supports SD 1.x and 2.x so far.")
    return LAYOUTS["sd2" if configs["text_encoder"].get("hidden_act") == "gelu" else "sd1"]


def target_of(key: str, names: dict[str, Target]) -> Target | None:
    """The target of tensor `key`: the entry of its longest prefix (whole dotted parts), the rest of the name kept."""
    pieces = key.split(".")
    for cut in range(len(pieces), 0, -1):
        found = names.get(".".join(pieces[:cut]))
        if found is not None:
            return replace(found, name=".".join([found.name, *pieces[cut:]]))
    return None



@dataclass
class Weights:
    """One part's safetensors weights (one file, or shards with an index), read a tensor at a time."""

    folder: Path
    config: dict
    tensors: dict[str, tuple[Path, tuple[int, ...]]]
    """name → (file, shape), from the files' headers."""

    @classmethod
    def open(cls, folder: Path, *, stem: str, variant: str | None = None) -> Weights:
        from safetensors import safe_open

        ext = f".{variant}" if variant else ""
        index = folder / f"{stem}.safetensors.index{ext}.json"  # diffusers' and transformers' naming of a variant
        single = folder / f"{stem}{ext}.safetensors"
        if index.is_file():
            files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
        elif single.is_file():
            files = [single]
        else:
            raise ExportError(f"{folder}: no {single.name} (nor its sharded index) there. Export reads safetensors "
                              "weights; a part saved as .bin must be re-saved with save_pretrained() first.")
        tensors = {}
        for file in files:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    tensors[name] = (file, tuple(handle.get_slice(name).get_shape()))
        return cls(folder=folder, config=json.loads((folder / "config.json").read_text()), tensors=tensors)

    def read(self, name: str) -> torch.Tensor:
        """One tensor, its file mapped only while it is read (so a finished file's pages leave memory too)."""
        from safetensors import safe_open

        with safe_open(self.tensors[name][0], framework="pt") as handle:
            return handle.get_tensor(name)



# --- The file ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One tensor of the file: its name, its sources (filled in order), its shape in the file."""

    name: str
    sources: tuple[tuple[Weights, str], ...]
    shape: tuple[int, ...]

    def tensor(self, dtype: torch.dtype) -> torch.Tensor:
        pieces = [weights.read(name) for weights, name in self.sources]
        tensor = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).to(dtype)
        if not torch.isfinite(tensor).all():
            if all(torch.isfinite(piece).all() for piece in pieces):
                raise ExportError(f"{self.name} has values beyond fp16's range; export with half=False.")
            raise ExportError(f"{self.name} holds NaN or infinite values: this snapshot is broken (the loss "
                              "diverged?); export an earlier one.")
        return tensor.reshape(self.shape).contiguous()


def entries_for(parts: dict[str, Weights], layout: Layout) -> list[Entry]:
    """Every tensor of the file, in order (UNet, VAE, text encoder), from the parts' headers alone."""
    entries = []
    for part, (prefix, names_for) in layout.parts.items():
        weights, names = parts[part], names_for(parts[part].config)
        targets: dict[str, list] = {}
        for key in sorted(weights.tensors):
            ours = key.removeprefix("text_model.") if part == "text_encoder" else key
            if ours in NOT_WEIGHTS.get(part, ()):
                continue
            target = target_of(ours, names)
            if target is None:
                raise ExportError(f"{weights.folder}: {key} has no name in the {layout.family} single-file layout; "
                                  "this model's architecture is not one AUTOMATIC1111 or ComfyUI load.")
            slot = targets.setdefault(prefix + target.name, [target, [None] * target.parts])
            slot[1][target.part] = (weights, key)
        for name, (target, sources) in targets.items():
            if None in sources:
                raise ExportError(f"{weights.folder}: {name} needs {target.parts} tensors (q, k, v) and some are "
                                  "missing.")
            shapes = [weights.tensors[key][1] for weights, key in sources]
            shape = (sum(s[0] for s in shapes), *shapes[0][1:])
            conv = target.conv1x1 and len(shape) == 2
            entries.append(Entry(name, tuple(sources), shape + (1, 1) if conv else shape))
    return entries
