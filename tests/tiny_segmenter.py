"""A tiny random CLIPSeg saved like a Hub model, so `masks.Segmenter.load(folder)` runs its real loading path offline.

Its masks mean nothing (random weights): tests check sizes, value ranges, caching and plumbing, not quality.
"""

from __future__ import annotations

from pathlib import Path

from dreambooth_nb.toy.tiny import build_tokenizer

IMAGE_SIZE = 32
"""The processor's input size: 4 × 4 patches of 8 px, which the decoder turns back into 32 × 32 logits."""
WORDS = ["a", "photo", "of", "dog", "circle", "square"]
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tiny_clipseg(path, seed: int = 0) -> Path:
    """Save a random tiny `CLIPSegForImageSegmentation` and its `CLIPSegProcessor` to `path` and return it.

    Two vision and two text layers, both extracted for the decoder (`extract_layers` indexes the vision layers),
    reduce_dim 8: a few thousand parameters, well under 1 MB on disk.
    """
    import torch
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    tokenizer = build_tokenizer(WORDS)
    torch.manual_seed(seed)
    layers = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPSegConfig(
        text_config=dict(**layers, vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(**layers, image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=16, extract_layers=[0, 1], reduce_dim=8, decoder_num_attention_heads=2,
        decoder_intermediate_size=16)
    model = CLIPSegForImageSegmentation(config)
    image_processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=_CLIP_MEAN,
                                        image_std=_CLIP_STD)
    path = Path(path)
    model.save_pretrained(path)
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
