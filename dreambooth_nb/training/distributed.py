"""Several GPUs (Kaggle's 2×T4): the same `train(config)` in N processes, data-parallel, one writer.

    train(config, num_processes=2)      # from a notebook; None: all visible GPUs (1 on Colab)

`launch` starts N fresh worker processes with torch's launcher (`python -m torch.distributed.run`, what
`accelerate launch` runs), each running `train` under accelerate (DDP: NCCL on GPUs, gloo on CPU), and
relays rank 0's progress to the notebook's callbacks. Fresh processes, not accelerate's `notebook_launcher`:
that one forks the notebook's kernel, which breaks once CUDA or bitsandbytes has been initialised there —
accelerate itself refuses ("Libraries known to initialize device upon import have been imported already"),
and every notebook of this suite has imported diffusers, which imports bitsandbytes, before it trains.

Every process dies with the one that started it: the launcher with the notebook's kernel ("Restart kernel"
SIGKILLs it), each worker with the launcher (`worker._die_with`), so a dead kernel never leaves workers holding the
GPUs. A collective that waits longer than `TIMEOUT` (a rank that hangs) ends the run with a message.

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
from datetime import timedelta
from pathlib import Path

from dreambooth_nb.environment import COLAB, detect_platform
from dreambooth_nb.errors import ConfigError, TrainingStopped
from dreambooth_nb.progress import report

EVENT = "DREAMBOOTH_NB_EVENT "  # a line of rank 0's stdout that carries a callback, as JSON
STOPPED = "DREAMBOOTH_NB_STOPPED "  # a line (any rank) that carries the message of a TrainingStopped
TIMEOUT = timedelta(minutes=30)
"""How long a rank waits for the others at a collective before the run ends with a message. Longer than the
longest thing one rank does alone while the others wait (saving a state or the final pipeline to Google
Drive: minutes), far shorter than a night of GPUs held by a hung run."""
WATCH_SECONDS = 0.5  # how often a process checks that the one that started it is still alive


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes) under the launcher; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def in_worker() -> bool:
    return rank_and_world()[1] > 1


def visible_gpus() -> int:
    """How many processes `num_processes=None` means: every visible GPU, except on Colab (one GPU there)."""
    import torch

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

    folder = Path(tempfile.mkdtemp(prefix="dreambooth-nb-"))
    path = folder / "config.json"
    config.to_json(path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "yes"  # accelerate's multi-CPU (gloo) mode; with GPUs it picks NCCL itself
    # torch's launcher (what `torchrun` runs), started through `launcher_main` so that it dies with this process.
    command = [sys.executable, "-m", "dreambooth_nb.training.worker", "--launcher", str(os.getpid()), "--nnodes=1",
               f"--nproc_per_node={config.num_processes}", "--rdzv_backend=c10d",
               f"--rdzv_endpoint=127.0.0.1:{_free_port()}", "-m", "dreambooth_nb.training.worker", str(path)]
    print(f"Training in {config.num_processes} processes (effective batch {config.effective_batch}).", flush=True)
    stopped, final, tail, timed_out = None, None, [], False
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        try:
            for line in proc.stdout:
                if line.startswith(EVENT):
                    event = json.loads(line[len(EVENT):])
                    if event["kind"] == "step":
                        if on_step is not None:
                            on_step(event["step"], event["loss"], event["lr"])
                        report("training", event["step"], config.max_train_steps)  # (a Stop ends every rank)
                    elif event["kind"] == "validation" and on_validation is not None:
                        on_validation(event["step"], event["losses"])
                    elif event["kind"] == "done":
                        final = Path(event["final"])
                elif line.startswith(STOPPED):
                    stopped = stopped or json.loads(line[len(STOPPED):])["message"]
                elif not _launcher_noise(line):
                    print(line, end="", flush=True)
                    tail = (tail + [line])[-20:]
                    timed_out = timed_out or _timed_out(line)
            returncode = proc.wait()
        except KeyboardInterrupt:  # the kernel's interrupt or a panel's Stop: stop every rank, then say so
            os.killpg(proc.pid, 2)
            proc.wait()
            raise
    if stopped is not None:
        raise TrainingStopped(stopped)
    if returncode and timed_out:
        raise TrainingStopped(f"Training in {config.num_processes} processes stopped: one process waited more than "
                              f"{TIMEOUT.total_seconds() / 60:.0f} minutes for another (a hung GPU or process). Saved "
                              "states are intact: run training again to resume; if it happens again, train on one "
                              "GPU (GPUs: 1 in the panel, or num_processes=1).")
    if returncode or final is None:
        raise TrainingStopped(f"Training in {config.num_processes} processes failed (exit code {returncode}). Its last "
                              "lines:\n" + "".join(tail[-8:]) + "Saved states are intact: run training again to resume.")
    return final


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _timed_out(line: str) -> bool:
    """A line of a worker's error saying that a collective timed out (NCCL's watchdog: "Watchdog caught
    collective operation timeout"; gloo: "Timed out waiting 5000ms for recv operation")."""
    lowered = line.lower()
    return "collective operation timeout" in lowered or ("timed out" in lowered and "gloo" in lowered)


def _launcher_noise(line: str) -> bool:
    """torch's launcher's own banner (about OMP_NUM_THREADS) and its worker-failure report, which repeats
    what the STOPPED line already says; and DDP's warning that it found no unused parameters in SDXL's first
    text encoder, a false positive (its own words): its last layer feeds the encoder's output, which DDP sees,
    but not the loss, and without the search the run stops at the second step."""
    return line.startswith(("*****", "Setting OMP_NUM_THREADS", "W1", "E1", "[W", "[E")) or "torch.distributed" in line \
        or "find_unused_parameters=True was specified in DDP constructor" in line
