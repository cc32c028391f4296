"""The processes of a run on several GPUs (`distributed.launch` starts them): torch's launcher, in a process
that dies with the notebook's kernel, and one worker per rank, each running `train` and dying with the launcher.

    python -m dreambooth_nb.training.worker --launcher <kernel pid> <torch launcher arguments>
    python -m dreambooth_nb.training.worker <config.json>        # what the launcher runs, once per rank

A worker speaks to the kernel through lines of its stdout (`distributed.EVENT`, `distributed.STOPPED`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import torch

from dreambooth_nb.config import TrainConfig
from dreambooth_nb.errors import DreamboothError
from dreambooth_nb.training.distributed import EVENT, STOPPED, WATCH_SECONDS, rank_and_world
from dreambooth_nb.training.train import train


# --- Dying with the parent ---------------------------------------------------------------------------------
def _die_with(parent: int, *, signum: int = signal.SIGKILL) -> None:
    """End this process with `signum` when its parent `parent` ends, however it ends (a SIGKILLed kernel runs
    no cleanup). Linux delivers `signum` the moment the parent dies (PR_SET_PDEATHSIG); everywhere, a thread
    checks every `WATCH_SECONDS` that this process was not handed to another parent (what happens when the
    parent dies), and also covers a parent that died before the request was made."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signum))  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass  # the watchdog below still acts

    def watch():
        while os.getppid() == parent:
            time.sleep(WATCH_SECONDS)
        os.kill(os.getpid(), signum)

    threading.Thread(target=watch, name="dreambooth-nb-parent-watch", daemon=True).start()


def launcher_main(argv: list[str]) -> int:
    """torch's launcher in a process that ends with the notebook's kernel (`argv`: the kernel's pid, then the
    launcher's arguments). SIGTERM, not SIGKILL: the launcher then stops its workers as it does on any stop
    (each worker also watches the launcher: `main`)."""
    from torch.distributed.run import main as run

    parent, *arguments = argv
    _die_with(int(parent), signum=signal.SIGTERM)
    run(arguments)
    return 0


def nccl_environment(environ=None) -> dict:
    """NCCL settings for one machine's GPUs, set in each worker before the process group starts (set values
    are kept): no InfiniBand (one machine), no peer-to-peer copies where the GPUs cannot reach each other (two
    T4s on Kaggle have neither NVLink nor P2P; NCCL may hang probing it), and a failed or timed-out collective
    ends the process, so the launcher stops the run instead of waiting forever."""
    environ = os.environ if environ is None else environ
    wanted = {"NCCL_IB_DISABLE": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    count = torch.cuda.device_count()
    if count > 1 and not all(torch.cuda.can_device_access_peer(a, b)
                             for a in range(count) for b in range(count) if a != b):
        wanted["NCCL_P2P_DISABLE"] = "1"
    for key, value in wanted.items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in wanted}


# --- A worker (one per rank) --------------------------------------------------------------------------------
def _emit(prefix: str, data: dict) -> None:
    sys.__stdout__.write(prefix + json.dumps(data) + "\n")
    sys.__stdout__.flush()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--launcher":
        return launcher_main(argv[1:])
    _die_with(os.getppid())  # the launcher: a worker never outlives it
    if torch.cuda.is_available():
        nccl_environment()
    rank, _world = rank_and_world()
    if rank:
        sys.stdout = open(os.devnull, "w")  # one rank speaks: the others' prints are the same lines
    config = TrainConfig.from_json(argv[0])
    try:
        final = train(config, num_processes=config.num_processes, progress_bar=False,
                      on_step=lambda step, loss, lr: _emit(EVENT, {"kind": "step", "step": step, "loss": loss, "lr": lr}),
                      on_validation=lambda step, losses: _emit(EVENT, {"kind": "validation", "step": step,
                                                                       "losses": losses}))
    except DreamboothError as err:
        _emit(STOPPED, {"message": str(err), "rank": rank})
        return 3
    if rank == 0:
        _emit(EVENT, {"kind": "done", "final": str(final)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
