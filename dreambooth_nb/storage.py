"""Everything training writes to disk, written so that nothing is ever half there.

Layout of `output_dir`:

    config.json                 the config of the run
    history.json                loss and learning rate per step
    states/state-000100/        everything needed to resume (rotated: the last K are kept)
    snapshots/step-000400/      inference-ready pipelines kept for comparison (never rotated)

Every file and folder is written under a temporary name and renamed into place when complete, so a
Colab disconnect or a kill at any moment leaves either the old version or the new one, never a mix.
Leftover temporary folders are removed on the next start.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from dreambooth_nb.errors import ConfigError, DataError, TrainingStopped

_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
STATE_MARKER = "state.json"  # written last inside a state: its presence means the state is complete
FORMAT = 2
"""The version of what this package writes into a project and its runs (config.json, states, snapshot.json). A
reader meeting another refuses it with a message (`check_format`) instead of guessing at what it meant.
1: what versions before this number wrote (none of them wrote it)."""


def check_format(data: dict, *, source: str, what: str) -> None:
    """Refuse `data` (a config.json, a state's or a snapshot's JSON) written in another format than this one."""
    found = data.get("format", 1) if isinstance(data, dict) else None
    if found != FORMAT:
        raise ConfigError(f"{source}: written by {'an earlier' if (found or 0) < FORMAT else 'a later'} version of "
                          f"dreambooth-nb (format {found}; this one reads format {FORMAT}). {what}")
_STATE_RE = re.compile(r"^state-(\d+)$")
_SNAPSHOT_RE = re.compile(r"^step-(\d+)$")
_OLD_RE = re.compile(r"^\.old-(.+)-[0-9a-f]{8}$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some FUSE file systems (Drive) do not open folders; rename is still ordered there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        _stop_if_disk_full(err, path)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_file(path: Path):
    """Yield a binary handle on a temporary file beside `path`, for files written piece by piece (an export
    streamed tensor by tensor); on success it replaces `path` in one rename, on failure `path` is untouched.
    Leftovers of an earlier write of `path` that was killed (a Colab disconnect) are deleted first: an export
    leaves gigabytes there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f"{_TMP_PREFIX}{path.name}-*"):
        leftover.unlink(missing_ok=True)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(f"No space left on the disk while writing {path} ({err.strerror}); nothing was left "
                            "half-written. Free some space (on Google Drive, empty the Trash too: deleted files count "
                            "until then) and run it again.") from err
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def atomic_folder(final: Path):
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename.

    If the block raises, the temporary folder is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
        if final.exists():  # replacing: move the old one aside first, so some complete version always exists
            old = final.with_name(f"{_OLD_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _stop_if_disk_full(err, final)
        raise


def _stop_if_disk_full(err: BaseException, path: Path) -> None:
    """A full disk or quota mid-run (Drive, a shared disk) is a message to act on, not an OSError trace."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        raise TrainingStopped(
            f"No space left on the disk while saving {path} ({err.strerror}). That save was dropped whole; "
            "everything saved before it is intact. Free some space (or lower checkpoints_total_limit, save "
            "fewer snapshot_steps, choose another output_dir), then run training again: it resumes from "
            "the last complete state.") from err


def remove_partial(root: Path) -> list[Path]:
    """Delete temporary leftovers of an interrupted write anywhere under `root`; return what was removed."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for folder in [root, root / "states", root / "snapshots"]:
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):
            # `.old-NAME-xxxxxxxx` without NAME: killed between `atomic_folder`'s two renames. The old
            # version is complete (it was renamed whole) and the new one is not: put the old one back.
            match = _OLD_RE.match(child.name)
            if match and child.is_dir() and not (folder / match.group(1)).exists():
                os.rename(child, folder / match.group(1))
                continue
            if child.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
                removed.append(child)
    return removed


# --- Weights, a shard at a time ----------------------------------------------------------------------
MAX_SHARD_BYTES = 500 * 1024**2
"""Weights are written in shards of at most this size (measured in the source dtype), each copied to the
CPU, written and freed before the next: saving never holds a second copy of a model in host RAM (Colab's
VM has ≈12.7 GB, and SD 1.5's fp32 UNet alone is 3.44 GB). diffusers and transformers load the sharded
layout (`<name>-00001-of-00007.safetensors` + `<name>.safetensors.index.json`) like a single file."""


def save_weights(tensors: dict, folder: Path, *, filename: str, dtype=None,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write `tensors` (on any device) as safetensors into `folder/filename`, sharded when large; return the files."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    stem = filename.removesuffix(".safetensors")
    split = split_torch_state_dict_into_shards(tensors, filename_pattern=stem + "{suffix}.safetensors",
                                               max_shard_size=max_shard_bytes)
    written = []
    for name, keys in split.filename_to_tensors.items():
        shard = {k: tensors[k].detach().to("cpu", dtype or tensors[k].dtype).contiguous() for k in keys}
        save_file(shard, Path(folder) / name, metadata={"format": "pt"})
        written.append(Path(folder) / name)
        del shard
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        write_json(Path(folder) / f"{filename}.index.json", index)
    return written


def load_weights(folder: Path, *, filename: str):
    """Yield the tensors saved by `save_weights` one shard at a time (a dict per shard)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / f"{filename}.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [filename]
    for name in files:
        yield load_file(folder / name)


def weights_exist(folder: Path, *, filename: str) -> bool:
    folder = Path(folder)
    return (folder / filename).is_file() or (folder / f"{filename}.index.json").is_file()


# --- Training states (for resume) ---------------------------------------------------------------------
def state_path(output_dir, step: int) -> Path:
    return Path(output_dir) / "states" / f"state-{step:06d}"


def _numbered(folder: Path, pattern: re.Pattern, *markers: str) -> list[tuple[int, Path]]:
    """(step, path) of the complete folders in `folder` named by `pattern` (holding one of `markers`), oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = pattern.match(child.name)
        if match and any((child / marker).is_file() for marker in markers):
            found.append((int(match.group(1)), child))
    return sorted(found)


def list_states(output_dir) -> list[tuple[int, Path]]:
    """Complete training states, oldest first."""
    return _numbered(Path(output_dir) / "states", _STATE_RE, STATE_MARKER)


def latest_state(output_dir) -> Path | None:
    states = list_states(output_dir)
    return states[-1][1] if states else None


def rotate_states(output_dir, *, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` states; return the deleted folders."""
    if keep is None:
        return []
    states = list_states(output_dir)
    doomed = [path for _, path in states[:-keep]] if len(states) > keep else []
    for path in doomed:
        # Renamed first, so a kill during the deletion leaves a `.tmp-` leftover, never a state that
        # still has its marker but lost some of its files.
        trash = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


# --- Snapshots (inference-ready pipelines) -------------------------------------------------------------
def snapshot_path(output_dir, step: int) -> Path:
    return Path(output_dir) / "snapshots" / f"step-{step:06d}"


SNAPSHOT_MARKER = "snapshot.json"  # written into every snapshot (see `snapshots`)


def list_snapshots(output_dir) -> list[tuple[int, Path]]:
    """Complete snapshots, oldest first (runs of earlier versions saved full pipelines without a marker)."""
    return _numbered(Path(output_dir) / "snapshots", _SNAPSHOT_RE, SNAPSHOT_MARKER, "model_index.json")


# --- Disk space ---------------------------------------------------------------------------------------
def free_bytes(folder) -> int:
    """Free space where `folder` is (or would be created). On Colab's Drive mount this is the quota left."""
    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


COLAB_DRIVE = Path("/content/drive")


def deletes_go_to_trash(folder, *, drive_root: Path = COLAB_DRIVE) -> bool:
    """Whether deleting under `folder` frees no quota: files deleted on Colab's Google Drive mount go to Drive's
    Trash and count against the quota until it is emptied or 30 days pass (see `memory.disk_plan`)."""
    folder = Path(folder).absolute()
    return folder == drive_root or drive_root in folder.parents
