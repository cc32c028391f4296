"""Library messages a notebook user should not see: each harmless and not caused by our code, with why.

Everything else a library prints stays visible. Where a message had a cause in our code it was fixed
there instead (dtypes passed at load time, no image processors built, `dtype=` where the installed
transformers/diffusers prefer it). Each filter matches one logger and one message, never a level.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager

HARMLESS: list[tuple[str, str, str]] = [
    ("transformers.utils.import_utils", r"requires torchvision \(not installed\); falling back",
     "transformers 5 says so when diffusers imports its pipelines, which name CLIP and SigLIP image "
     "processors; this package never builds one (safety checker and feature extractor are off), and it "
     "avoids torchvision by design (Colab ships it, so Colab users never see this)."),
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward",
     "bitsandbytes looks for an optional 4-bit CPU kernel at import; only its 8-bit AdamW is used here."),
    ("kernels._internals.hf_hub", r"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
     "the same optional kernel looked up offline: the kernels library says it skips a trust check; bitsandbytes "
     "then runs its own CPU code (on a GPU runtime it is never looked up)."),
]


class _Drop(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def install() -> None:
    """Attach the filters (once) to the loggers that emit those messages, before the libraries load."""
    for name, pattern, _why in HARMLESS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_Drop(pattern))


@contextmanager
def silenced(*names: str, level: int = logging.ERROR):
    """Hold the loggers `names` at `level` for the block: for warnings that a call of ours triggers on purpose
    and that say nothing to the user (each caller says which and why)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, before in zip(loggers, levels):
            logger.setLevel(before)
