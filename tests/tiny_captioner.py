"""Tiny random captioners, built from configs and saved like a Hub checkpoint, so that `Captioner.load(folder)`
goes through the real loading path offline: config → model class → processor → weights.

Each is well under 1 MB and builds in about a second. The captions are random words (or, for Florence-2's
byte-level vocabulary, random characters): they prove that loading, batching and decoding run, not that a
caption describes anything.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (BartTokenizer, BertTokenizer, BlipConfig, BlipForConditionalGeneration,
                          BlipImageProcessorPil, BlipProcessor, CLIPImageProcessorPil, Florence2Config,
                          Florence2ForConditionalGeneration, Florence2Processor)

WORDS = ["a", "dog", "sitting", "on", "the", "beach", "small", "brown", "grass", "with", "red", "ball", "arafed",
         "there", "is", "sofa"]
IMAGE_SIZE = 32
_PIXELS = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)


def build_tiny_florence2(path, seed: int = 0) -> Path:
    """A random Florence-2 (one DaViT stage, one BART layer each side) with a byte-level BPE tokenizer whose
    vocabulary is the 256 byte symbols, a few words and the special tokens (`<image>` among them, as the real
    processor expects), at 32 × 32 px."""
    path = Path(path)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tokens = specials + sorted(ByteLevel.alphabet()) + ["Ġ" + word for word in WORDS] + ["<mask>", "<image>"]
    tokenizer = BartTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=[],
                              extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False,
                                            **_PIXELS)
    # Image tokens the vision tower yields: (32 / stride 4)² patches + 1 pooled, as in Florence-2's own tests.
    image_processor.image_seq_length = (IMAGE_SIZE // 4) ** 2 + 1
    config = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tokenizer), max_position_embeddings=128, d_model=16,
                         encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32,
                         encoder_attention_heads=2, decoder_attention_heads=2, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         decoder_start_token_id=tokenizer.eos_token_id),
        vision_config=dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3], patch_prenorm=[False],
                           embed_dim=[16], num_heads=[1], num_groups=[1], window_size=4, projection_dim=16,
                           drop_path_rate=0.0),
        image_token_id=tokenizer.image_token_id)
    torch.manual_seed(seed)
    Florence2ForConditionalGeneration(config).save_pretrained(path)
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def build_tiny_blip(path, seed: int = 0) -> Path:
    """A random BLIP captioner (one layer each, width 16) with a WordPiece tokenizer from a written vocab.txt
    (`[DEC]` is its start token, as in BLIP's own), at 32 × 32 px."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "[DEC]"]) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab), bos_token="[DEC]")
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **_PIXELS)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(
        text_config=dict(**small, vocab_size=len(tokenizer), max_position_embeddings=64, encoder_hidden_size=16,
                         bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                         eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(**small, image_size=IMAGE_SIZE, patch_size=8), projection_dim=16)
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(path)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
