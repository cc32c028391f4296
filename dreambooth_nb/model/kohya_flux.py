"""FLUX.1 LoRA from diffusers' PEFT layout to the kohya / sd-scripts layout that ComfyUI and Forge load.

ComfyUI and Forge apply a Flux LoRA to Black Forest Labs' own model code, so they look adapters up by BFL's
module names written the sd-scripts way (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, with
`.lora_up.weight` and `.alpha` beside it). BFL computes in one linear what diffusers splits in several:
a double block's image q, k, v are one `img_attn_qkv` (the text side's are `txt_attn_qkv`), and a single
block's q, k, v and MLP input are one `linear1`. An adapter for a fused linear must therefore carry all its
parts: the downs stacked (rank = the sum of the parts' ranks) and the ups block-diagonal, each part's up in
its own output rows and rank columns. A part that was not trained adds no rank; its output rows stay zero.

Loaders scale a kohya adapter by `alpha / rank`. The caller has folded PEFT's scale into the ups already,
so every `.alpha` is the adapter's own rank: the scale is exactly 1 and each delta stays `up @ down`.

diffusers reads this layout back (`FluxPipeline.load_lora_weights`, which the tests use as the judge) and
splits a fused adapter exactly: by rank blocks when the up is block-diagonal with equal ranks, otherwise by
giving every part the whole down and its rows of the up. Two limits of diffusers 0.42's reader, not of
the file: an untrained part of a fused linear comes back as its own adapter with a zero delta, and it
splits `linear1` only at FLUX.1's real widths (3072 q/k/v, 12288 MLP) and fails on any other.
Top-level layers (x_embedder → img_in, context_embedder → txt_in, ...) are refused: diffusers' reader
names them without the `transformer.` prefix and its loader then drops them, so no round trip proves them.
"""

from __future__ import annotations

import re

import torch

# diffusers module (relative to its block) -> BFL layer, for each kind of block.
_DOUBLE_BLOCK = {
    "attn.to_q": "img_attn_qkv", "attn.to_k": "img_attn_qkv", "attn.to_v": "img_attn_qkv",
    "attn.to_out.0": "img_attn_proj",
    "attn.add_q_proj": "txt_attn_qkv", "attn.add_k_proj": "txt_attn_qkv", "attn.add_v_proj": "txt_attn_qkv",
    "attn.to_add_out": "txt_attn_proj",
    "ff.net.0.proj": "img_mlp_0", "ff.net.2": "img_mlp_2",
    "ff_context.net.0.proj": "txt_mlp_0", "ff_context.net.2": "txt_mlp_2",
    "norm1.linear": "img_mod_lin", "norm1_context.linear": "txt_mod_lin",
}
_SINGLE_BLOCK = {
    "attn.to_q": "linear1", "attn.to_k": "linear1", "attn.to_v": "linear1", "proj_mlp": "linear1",
    "proj_out": "linear2",
    "norm.linear": "modulation_lin",
}
_BLOCKS = {"transformer_blocks": ("double_blocks", _DOUBLE_BLOCK),
           "single_transformer_blocks": ("single_blocks", _SINGLE_BLOCK)}

# The diffusers modules inside each fused BFL layer, in the order of BFL's output rows.
_FUSED = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}

_KEY = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.lora_([AB])\.weight")


def to_kohya(lora: dict[str, torch.Tensor], *, transformer_config: dict) -> dict[str, torch.Tensor]:
    """The kohya Flux state dict (`lora_unet_…` keys) equal to `lora`, a diffusers/PEFT Flux transformer LoRA.

    `lora` is keyed like `transformer_blocks.0.attn.to_q.lora_A.weight` (no `transformer.` prefix), with the
    scale already folded into each `lora_B`, so that every module's delta is `lora_B @ lora_A`.
    `transformer_config` is the `FluxTransformer2DModel` config; it gives the widths of a fused layer's
    untrained parts. Raises ValueError naming a key that is not a Flux block's linear, or that lacks its pair.
    """
    widths = _part_widths(transformer_config)
    out = {}
    for (name, layer), parts in _group_by_kohya_layer(lora).items():
        down, up = _fuse(parts, _FUSED[layer], widths[layer]) if layer in _FUSED else next(iter(parts.values()))
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        # float32 holds any rank exactly, so the loaders' alpha / rank is exactly 1.
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def _part_widths(config: dict) -> dict[str, tuple[int, ...]]:
    """Output widths of each fused layer's parts; diffusers' Flux single block fixes the MLP at 4 × hidden."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return {"img_attn_qkv": (hidden,) * 3, "txt_attn_qkv": (hidden,) * 3, "linear1": (hidden,) * 3 + (4 * hidden,)}


def _group_by_kohya_layer(lora: dict[str, torch.Tensor]) -> dict[tuple[str, str], dict[str, tuple]]:
    """{(kohya name, BFL layer): {diffusers module in its block: (A, B)}}, checking every key is known and paired."""
    halves: dict[tuple[str, str, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in lora.items():
        match = _KEY.fullmatch(key)
        if match is None or match[3] not in _BLOCKS[match[1]][1]:
            raise ValueError(f"not a FLUX.1 transformer block LoRA weight this converter knows: {key!r}")
        blocks, index, module, half = match.groups()
        bfl_blocks, table = _BLOCKS[blocks]
        layer = table[module]
        where = (f"lora_unet_{bfl_blocks}_{index}_{layer}", layer, module, key[:-len(f".lora_{half}.weight")])
        halves.setdefault(where, {})[half] = tensor
    grouped: dict[tuple[str, str], dict[str, tuple]] = {}
    for (name, layer, module, full_module), pair in halves.items():
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            raise ValueError(f"{full_module}.lora_{missing}.weight is missing (its pair is present)")
        grouped.setdefault((name, layer), {})[module] = (pair["A"], pair["B"])
    return grouped


def _fuse(parts, order, widths) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter for a fused linear: the parts' downs stacked, their ups placed block-diagonally.

    Parts go in BFL's row order so that equal ranks give diffusers' reader the block layout it splits
    back into the original adapters; an untrained part takes no rank and leaves its rows zero.
    """
    down = torch.cat([parts[module][0] for module in order if module in parts])
    up = down.new_zeros(sum(widths), down.shape[0])
    row = col = 0
    for module, width in zip(order, widths):
        if module in parts:
            b = parts[module][1]
            if b.shape[0] != width:
                raise ValueError(f"{module}.lora_B.weight has {b.shape[0]} rows, the config says {width}")
            up[row:row + width, col:col + b.shape[1]] = b
            col += b.shape[1]
        row += width
    return down, up
