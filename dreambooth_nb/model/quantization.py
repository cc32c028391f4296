"""4-bit weights (bitsandbytes NF4): their settings, their size, and which parts of a pipeline need them.

Training loads a LoRA's frozen denoiser in 4 bits where its 16-bit weights do not fit (`load_in_4bit`, QLoRA:
`loading.load_denoiser`); rendering loads the largest parts of a pipeline in 4 bits where the whole does not
fit the GPU (`snapshots.load_pipeline`); the memory plan counts them (`planning.trace`).
"""

from __future__ import annotations

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
"""bitsandbytes' 4-bit settings, the QLoRA paper's: NF4 codes and double-quantized block scales."""


def nf4_bytes(numel: int) -> int:
    """Bytes of a weight quantized by bitsandbytes to `NF4`: two 4-bit codes a byte, an 8-bit absmax per
    64-element block, and an fp32 absmax (and offset) per 256 of those."""
    blocks = -(-numel // 64)
    return -(-numel // 2) + blocks + 8 * -(-blocks // 256)


INFERENCE_SHARE = 0.7
"""Of a GPU's memory, what an inference pipeline's weights may take: the rest is for activations (an image of
FLUX.1 at 1024 px attends over 4,096 + 512 tokens) and the VAE's decoding."""


def quantized_to_fit(sizes: dict[str, int], *, gpu_bytes: int) -> list[str]:
    """The components (by name, from their parameter counts `sizes`) to load in 4 bits so that a pipeline's
    weights fit `INFERENCE_SHARE` of `gpu_bytes`, largest first; none where all fit in 16 bits. FLUX.1-dev on a
    T4: its transformer (24 GB in 16 bits) and T5-XXL (9.5 GB); SD 3.5 Medium: T5 alone; SD and SDXL: none."""
    total, chosen = 2 * sum(sizes.values()), []
    for name in sorted((n for n in sizes if n != "vae"), key=sizes.get, reverse=True):  # (the VAE decodes in 16 bits)
        if total <= INFERENCE_SHARE * gpu_bytes:
            break
        chosen.append(name)
        total -= 2 * sizes[name] - nf4_bytes(sizes[name])
    return chosen
