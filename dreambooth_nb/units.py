"""Bytes for people, one way each: memory in GiB (what `torch.cuda` and the plans count in), disk in GB (what
file browsers and Google Drive's quota show)."""

from __future__ import annotations

GIB = 2**30


def gib(nbytes: float, *, digits: int = 2) -> str:
    """The number of GiB, no unit: "12.60"."""
    return f"{nbytes / GIB:.{digits}f}"


def memory_size(nbytes: float) -> str:
    """GiB with two decimals; MiB below 0.1 GiB (a tiny model must not read "0.00 GiB")."""
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= 0.1 * GIB else f"{nbytes / 2**20:.1f} MiB"


def disk_size(nbytes: float) -> str:
    """GB with two decimals; MB below 1 GB (a tiny run must not read "0.00 GB")."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"
