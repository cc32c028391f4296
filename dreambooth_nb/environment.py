"""Where the code runs — Colab, Kaggle or local, with a person at the frontend or headless — and where a Hugging
Face token is: what every layer may ask (several GPUs run one process on Colab; the Hub push needs the token).
Nothing here ever prints, logs or writes a token.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

COLAB, KAGGLE, LOCAL = "colab", "kaggle", "local"
KAGGLE_WORKING = Path("/kaggle/working")
HEADLESS_ENV = "DREAMBOOTH_NB_HEADLESS"
"""Set to 1 to force headless behaviour (train without a click), 0 to force interactive."""


def detect_platform(*, modules=None, environ=None, kaggle_dir: Path = KAGGLE_WORKING) -> str:
    """"colab", "kaggle" or "local". Colab: `google.colab` is imported; Kaggle: its run-type variable
    or its working folder exists. Arguments are for tests (defaults: this process)."""
    modules = sys.modules if modules is None else modules
    environ = os.environ if environ is None else environ
    if "google.colab" in modules:
        return COLAB
    if "KAGGLE_KERNEL_RUN_TYPE" in environ or Path(kaggle_dir).is_dir():
        return KAGGLE
    return LOCAL


def is_headless(*, environ=None, kernel=None) -> bool:
    """True when nobody can click: the notebook runs under papermill, nbclient, nbconvert or a test.

    The signal is the one the kernel itself gets: a person's frontend (Jupyter, Colab, VS Code) sends each
    cell with `allow_stdin=True` because it can answer `input()`; headless executors send `False`.
    `DREAMBOOTH_NB_HEADLESS=1` (or 0) overrides the detection. Outside a kernel (plain Python) it is True.
    """
    environ = os.environ if environ is None else environ
    forced = environ.get(HEADLESS_ENV, "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    if kernel is None:
        try:
            from IPython import get_ipython

            kernel = getattr(get_ipython(), "kernel", None)
        except ImportError:
            kernel = None
    if kernel is None:
        return True
    return not bool(getattr(kernel, "_allow_stdin", False))


def _colab_secret(name: str) -> str | None:
    try:
        from google.colab import userdata  # type: ignore[import-not-found]

        return userdata.get(name)
    except Exception:  # not on Colab, secret missing, or notebook access not granted
        return None


def _kaggle_secret(name: str) -> str | None:
    try:
        from kaggle_secrets import UserSecretsClient  # type: ignore[import-not-found]

        return UserSecretsClient().get_secret(name)
    except Exception:
        return None


def find_hf_token(*, environ=None) -> tuple[str | None, str]:
    """(token, where it came from): the `HF_TOKEN` environment variable, else a Colab or Kaggle secret named
    HF_TOKEN. Every notebook calls this (through `use_hf_token` or `hf_login`): each runs in its own kernel."""
    environ = os.environ if environ is None else environ
    if environ.get("HF_TOKEN"):
        return environ["HF_TOKEN"], "the HF_TOKEN environment variable"
    for reader, where in ((_colab_secret, "Colab secret HF_TOKEN"), (_kaggle_secret, "Kaggle secret HF_TOKEN")):
        token = reader("HF_TOKEN")
        if token:
            return token, where
    return None, ""
