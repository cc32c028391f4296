"""Several GPUs (Kaggle's 2×T4): the same `train(config)` in N processes, data-parallel, one writer.

    train(config, num_processes=2)      # from a notebook; None: all visible GPUs (1 on Colab)

`launch` starts N fresh worker processes with torch's launcher (`python -m torch.distributed.run`, what
`accelerate launch` runs), each running `train` under accelerate (DDP: NCCL on GPUs, gloo on CPU), and
relays rank 0's progress to the notebook's callbacks. Fresh processes, not accelerate's `notebook_launcher`:
that one forks the notebook's kernel, which breaks once CUDA or bitsandbytes has been initialised there —
accelerate itself refuses ("Libraries known to initialize device upon import have been imported already"),
and every notebook of this suite has imported diffusers, which imports bitsandbytes, before it trains.

What differs between ranks is only which samples each draws (`sample_positions`: N processes × batch b see
exactly the samples one process with batch N·b would, so the result is the same up to float rounding) and
who writes: rank 0 prints, saves states and snapshots, rotates, writes the history; the others wait. A
`TrainingStopped` in any rank (out of memory, a NaN) ends every rank — the launcher stops the others — and
reaches the notebook as that one message.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import ConfigError, TrainingStopped

EVENT = "DREAMBOOTH_NB_EVENT "  # a line of rank 0's stdout that carries a callback, as JSON
STOPPED = "DREAMBOOTH_NB_STOPPED "  # a line (any rank) that carries the message of a TrainingStopped


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes) under the launcher; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def in_worker() -> bool:
    return rank_and_world()[1] > 1


def visible_gpus() -> int:
    """How many processes `num_processes=None` means: every visible GPU, except on Colab (one GPU there)."""
    import torch

    from .platform import COLAB, detect_platform

    if detect_platform() == COLAB or not torch.cuda.is_available():
        return 1
    return torch.cuda.device_count()


def for_processes(config, num_processes: int):
    """`config` for `num_processes` processes, keeping the effective batch where the arithmetic allows:
    accumulation is divided among the processes first (batch 1 × 4 accumulated on 2 GPUs becomes 1 × 2 on
    each), then the batch; otherwise each process keeps its batch and the effective batch grows (said)."""
    if num_processes < 1:
        raise ConfigError(f"num_processes: {num_processes!r} must be 1 or more.")
    batch, accumulation = config.train_batch_size, config.gradient_accumulation_steps
    total = batch * accumulation * config.num_processes
    if accumulation * config.num_processes % num_processes == 0:
        accumulation = accumulation * config.num_processes // num_processes
    elif batch * config.num_processes % num_processes == 0:
        batch = batch * config.num_processes // num_processes
    changed = config.replace(train_batch_size=batch, gradient_accumulation_steps=accumulation,
                             num_processes=num_processes)
    if changed.effective_batch != total:
        print(f"With {num_processes} processes the effective batch is {changed.effective_batch} (it was {total}): "
              f"{total} does not divide among them.")
    return changed


def sample_positions(micro: int, *, batch: int, rank: int, world: int) -> range:
    """The stream positions rank `rank` trains on in micro-batch `micro`: its share of the `world × batch`
    positions one process with batch `world × batch` would draw there."""
    start = (micro * world + rank) * batch
    return range(start, start + batch)


# --- The launcher (in the notebook's process) -------------------------------------------------------------
def launch(config, *, on_step=None, on_validation=None) -> Path:
    """Train `config` (whose `num_processes` > 1) in that many fresh processes; return the final snapshot."""
    import torch

    from .storage import write_json

    folder = Path(tempfile.mkdtemp(prefix="dreambooth-nb-"))
    path = folder / "config.json"
    write_json(path, config.to_dict())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "yes"  # accelerate's multi-CPU (gloo) mode; with GPUs it picks NCCL itself
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={config.num_processes}",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{_free_port()}", "-m", "dreambooth_nb.distributed",
               str(path)]
    print(f"Training in {config.num_processes} processes (effective batch {config.effective_batch}).", flush=True)
    stopped, final, tail = None, None, []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        try:
            for line in proc.stdout:
                if line.startswith(EVENT):
                    event = json.loads(line[len(EVENT):])
                    if event["kind"] == "step" and on_step is not None:
                        on_step(event["step"], event["loss"], event["lr"])
                    elif event["kind"] == "validation" and on_validation is not None:
                        on_validation(event["step"], event["losses"])
                    elif event["kind"] == "done":
                        final = Path(event["final"])
                elif line.startswith(STOPPED):
                    stopped = stopped or json.loads(line[len(STOPPED):])["message"]
                elif not _launcher_noise(line):
                    print(line, end="", flush=True)
                    tail = (tail + [line])[-20:]
            returncode = proc.wait()
        except KeyboardInterrupt:  # the notebook's Stop button: stop every rank, then say so as usual
            os.killpg(proc.pid, 2)
            proc.wait()
            raise
    if stopped is not None:
        raise TrainingStopped(stopped)
    if returncode or final is None:
        raise TrainingStopped(f"Training in {config.num_processes} processes failed (exit code {returncode}). Its last "
                              "lines:\n" + "".join(tail[-8:]) + "Saved states are intact: run training again to resume.")
    return final


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launcher_noise(line: str) -> bool:
    """torch's launcher's own banner (about OMP_NUM_THREADS) and its worker-failure report, which repeats
    what the STOPPED line already says."""
    return line.startswith(("*****", "Setting OMP_NUM_THREADS", "W1", "E1", "[W", "[E")) or "torch.distributed" in line


# --- A worker (one per rank) --------------------------------------------------------------------------------
def _emit(prefix: str, data: dict) -> None:
    sys.__stdout__.write(prefix + json.dumps(data) + "\n")
    sys.__stdout__.flush()


def main(argv=None) -> int:
    from . import train
    from .config import TrainConfig
    from .errors import DreamboothError

    rank, _world = rank_and_world()
    if rank:
        sys.stdout = open(os.devnull, "w")  # one rank speaks: the others' prints are the same lines
    config = TrainConfig.from_json((argv or sys.argv[1:])[0])
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
