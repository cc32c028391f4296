"""A training process for the tests to kill: `python tests/train_worker.py CONFIG.json` or `--serve`.

One-shot: runs `train(TrainConfig.from_json(CONFIG.json))`; exit 0 when done, 3 on `TrainingStopped`
(its message on stderr), 1 on any other error.

`--serve`: imports torch, diffusers and the package once, then for every JSON line on stdin
`{"config": path, "kill_after": seconds | null, "kill_when": glob | null, "timeout": seconds}` forks a
fresh child that trains, sends it SIGKILL after `kill_after` seconds or as soon as `kill_when` matches a
file under the run's output_dir, reaps it, and answers one JSON line
`{"pid", "killed", "returncode", "seconds"}`. Forking saves the ~5 s of imports per training process,
which is what lets the torture test kill 20+ real processes in well under a minute. The server kills
and reaps its own children, so a pid is never reused under it. Children write to stderr only: stdout
is the answer channel.
"""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import glob  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # as the pytest process (conftest)

from dreambooth_nb import TrainConfig, TrainingStopped, train  # noqa: E402


def run_once(config_path: str) -> int:
    try:
        train(TrainConfig.from_json(config_path))
        return 0
    except TrainingStopped as err:
        print(f"TrainingStopped: {err}", file=sys.stderr)
        return 3
    except BaseException:
        traceback.print_exc()
        return 1


def _child(config_path: str) -> None:
    os.dup2(2, 1)  # stdout is the server's answer channel
    code = 1
    try:
        code = run_once(config_path)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _status(raw: int) -> int:
    return -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)


def serve() -> None:
    # Load everything a run touches before the first fork, so children start in milliseconds.
    import bitsandbytes  # noqa: F401
    import diffusers.optimization  # noqa: F401
    import diffusers.training_utils  # noqa: F401
    from accelerate import Accelerator  # noqa: F401
    from diffusers import StableDiffusionPipeline  # noqa: F401

    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        out = TrainConfig.from_json(job["config"]).output_dir
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(job["config"])
        killed, raw = False, None
        deadline = start + job.get("timeout", 120)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                raw = status
                break
            now = time.monotonic()
            due = job.get("kill_after") is not None and now - start >= job["kill_after"]
            if job.get("kill_when") and glob.glob(os.path.join(out, job["kill_when"])):
                due = True
            if due or now > deadline:
                os.kill(pid, signal.SIGKILL)
                killed = True
                raw = os.waitpid(pid, 0)[1]
                break
            time.sleep(0.002)
        print(json.dumps({"pid": pid, "killed": killed, "returncode": _status(raw),
                          "seconds": round(time.monotonic() - start, 3)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        sys.exit(run_once(sys.argv[1]))
