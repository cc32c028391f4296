"""The dtype keyword of `from_pretrained`, whichever diffusers and transformers Colab or Kaggle ships."""

from __future__ import annotations

import torch


def transformers_dtype(dtype: torch.dtype) -> dict:
    """The dtype keyword for a transformers `from_pretrained`: `dtype` from 4.56 (where `torch_dtype` warns
    that it is deprecated), `torch_dtype` before (Colab may ship an older transformers)."""
    import transformers

    return _dtype_keyword(dtype, transformers.__version__, since="4.56")


def diffusers_dtype(dtype: torch.dtype) -> dict:
    """The dtype keyword for a diffusers `from_pretrained` (models and pipelines): `dtype` from 0.40, which
    accepts it (0.42 warns that `torch_dtype` is deprecated), `torch_dtype` before."""
    import diffusers

    return _dtype_keyword(dtype, diffusers.__version__, since="0.40")


def _dtype_keyword(dtype: torch.dtype, version: str, *, since: str) -> dict:
    from packaging.version import Version

    return {"dtype": dtype} if Version(version) >= Version(since) else {"torch_dtype": dtype}
