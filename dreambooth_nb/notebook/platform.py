"""Where the notebook runs and what it has: Colab, Kaggle or local; GPU; bitsandbytes; xformers; Hub login.

Every function here is safe to call anywhere: on a laptop without a GPU, in a headless test run, on Colab.
Nothing here ever prints, logs or writes a Hugging Face token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth_nb.environment import COLAB, KAGGLE, KAGGLE_WORKING, detect_platform, find_hf_token, is_headless
from dreambooth_nb.errors import ConfigError
from dreambooth_nb.model.loading import bf16_supported, bitsandbytes_works, gpu_problem, xformers_works
from dreambooth_nb.storage import COLAB_DRIVE, atomic_write_bytes


def default_project_dir(platform: str | None = None) -> Path:
    """Where the project lives when PROJECT_DIR is left empty.

    Colab: on Google Drive (mounted when needed), so photos, class images and snapshots survive a
    disconnect. Kaggle: /kaggle/working (the only writable place kept as the notebook's output). Local:
    `dreambooth-project` in the current folder.
    """
    platform = platform or detect_platform()
    if platform == COLAB:
        return COLAB_DRIVE / "MyDrive" / "dreambooth"
    if platform == KAGGLE:
        return KAGGLE_WORKING / "dreambooth"
    return Path("dreambooth-project")


def resolve_project_dir(project_dir: str | os.PathLike | None, *, platform: str | None = None) -> Path:
    """The project folder for a PROJECT_DIR setting ("" means the platform default); refuses read-only places."""
    platform = platform or detect_platform()
    path = Path(project_dir).expanduser() if project_dir not in (None, "") else default_project_dir(platform)
    if str(path).startswith("/kaggle/input"):
        raise ConfigError(f"PROJECT_DIR: {path} is read-only on Kaggle; use a folder under /kaggle/working "
                          "(attached datasets can still be used as INSTANCE_DIR).")
    return path


def mount_drive_if_needed(path: Path, *, platform: str | None = None) -> bool:
    """Mount Google Drive when `path` is on it and we are on Colab; True if a mount was made."""
    platform = platform or detect_platform()
    path = Path(path)
    if platform != COLAB or COLAB_DRIVE not in (path, *path.parents):
        return False
    if (COLAB_DRIVE / "MyDrive").is_dir():
        return False
    from google.colab import drive  # type: ignore[import-not-found]

    drive.mount(str(COLAB_DRIVE))
    return True


# --- Hardware report ----------------------------------------------------------------------------------
@dataclass
class Environment:
    """What the setup notebook reports: platform, device, GPU memory and the optional speed-ups."""

    platform: str
    device: str
    gpu_name: str | None = None
    gpu_memory_gb: float | None = None
    bf16: bool = False
    bitsandbytes: tuple[bool, str] = (False, "not checked")
    xformers: tuple[bool, str] = (False, "not checked")
    torch_version: str = ""
    notes: list[str] = field(default_factory=list)
    problem: str | None = None
    """Why training cannot use the GPU here (this torch has no kernels for it), said first; None: it can."""

    def summary(self) -> str:
        if self.problem:
            return "\n".join([self.problem, f"Platform: {self.platform}, torch {self.torch_version}"])
        gpu = f"{self.gpu_name}, {self.gpu_memory_gb:.1f} GB" if self.gpu_name else "no CUDA GPU (CPU only)"
        lines = [f"Platform: {self.platform}", f"torch {self.torch_version}, device: {self.device} ({gpu})",
                 f"8-bit Adam (bitsandbytes): {'yes' if self.bitsandbytes[0] else 'no'} - {self.bitsandbytes[1]}",
                 f"xformers: {'yes' if self.xformers[0] else 'no'} - {self.xformers[1]} "
                 "(PyTorch SDPA is used otherwise, within a few percent of xformers)"]
        lines += self.notes
        return "\n".join(lines)


def check_environment(*, probe: bool = True) -> Environment:
    """Detect the platform and GPU, and (with `probe`) run bitsandbytes and xformers for real once."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    env = Environment(platform=detect_platform(), device=device.type, torch_version=torch.__version__)
    env.problem = gpu_problem() if cuda else None
    if env.problem:  # said in one line, instead of failing at the first kernel (nothing more to probe there)
        env.gpu_name = torch.cuda.get_device_properties(0).name
        return env
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.gpu_name = props.name
        env.gpu_memory_gb = props.total_memory / 1024**3
        env.bf16 = bf16_supported(device)  # compute capability ≥ 8.0; a T4 only emulates it
        env.notes.append("Mixed precision 'auto' uses " + ("bf16 here (native on this GPU; safer than fp16)."
                                                           if env.bf16 else "fp16 here (this GPU has no native bf16)."))
    else:
        env.notes.append("No GPU: training a real Stable Diffusion model on CPU is far too slow. On Colab: "
                         "Runtime > Change runtime type > T4 GPU. On Kaggle: Settings > Accelerator > GPU.")
    if probe:
        env.bitsandbytes = bitsandbytes_works(device)
        env.xformers = xformers_works(device)
    return env


# --- Hugging Face login -------------------------------------------------------------------------------
def use_hf_token(*, environ=None) -> bool:
    """Make a token found by `find_hf_token` available to downloads in this kernel, silently when there is
    none (the default model needs none); never prints or saves the token itself."""
    environ = os.environ if environ is None else environ
    token, source = find_hf_token(environ=environ)
    if token:
        environ["HF_TOKEN"] = token
        print(f"Hugging Face token from {source} is set for this session. It is not printed or saved.")
    return bool(token)


def hf_login(*, environ=None, ask=None, verify: bool = True) -> bool:
    """Make a Hugging Face token available to downloads in this session, without ever showing or saving it.

    Looks, in order, at the `HF_TOKEN` environment variable, a Colab secret or a Kaggle secret named
    HF_TOKEN, then (only when someone can type) a hidden `getpass` prompt. The token goes into this
    process's environment only (`HF_TOKEN`), never to disk: unlike `huggingface_hub.login()` nothing is
    written to ~/.cache, so nothing leaks into Drive or a saved notebook. Returns True if a token is set.
    SD 1.5 (the default model) needs no token; gated or private models do.
    """
    environ = os.environ if environ is None else environ
    token, source = find_hf_token(environ=environ)
    if not token and ask is None and not is_headless(environ=environ):
        import getpass

        ask = getpass.getpass
    if not token and ask is not None:
        try:
            token = ask("Hugging Face token (hidden; Enter to skip): ").strip()
            source = "the prompt"
        except Exception:  # no way to type here (headless run)
            token = None
    if not token:
        print("No Hugging Face token: downloads are anonymous (fine for the default SD 1.5 model). For a gated "
              "model add a secret named HF_TOKEN (Colab: the key icon; Kaggle: Add-ons > Secrets) and rerun.")
        return False
    environ["HF_TOKEN"] = token
    who = _whoami(token) if verify else None
    print(f"Hugging Face token from {source} is set for this session" + (f" (user {who})." if who else ".")
          + " It is not printed or saved.")
    return True


def _whoami(token: str) -> str | None:
    """The token's user name, or None (offline, or invalid) — never an error message that could echo it."""
    try:
        from huggingface_hub import whoami

        return whoami(token=token).get("name")
    except Exception:
        return None


# --- Instance photos ----------------------------------------------------------------------------------
def upload_photos(folder: Path, *, platform: str | None = None, only_if_empty: bool = True) -> list[Path]:
    """On Colab, open the browser's file picker and save the chosen photos into `folder`.

    With `only_if_empty` (the default) a folder that already holds files is left alone, so rerunning the
    notebook after a disconnect does not ask again.

    Elsewhere nothing is uploaded: copy the photos into the folder (Jupyter: drag them into the file
    browser; Kaggle: attach a dataset and set INSTANCE_DIR to its folder under /kaggle/input).
    """
    platform = platform or detect_platform()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if only_if_empty and any(not p.name.startswith(".") for p in folder.iterdir()):
        return []
    if platform != COLAB:
        print(f"Put your photos into {folder.resolve()} (uploading from the browser works on Colab only).")
        return []
    from google.colab import files  # type: ignore[import-not-found]

    saved = []
    for name, data in files.upload().items():
        target = folder / Path(name).name
        atomic_write_bytes(target, data)
        saved.append(target)
    print(f"Saved {len(saved)} file(s) into {folder}.")
    return saved
