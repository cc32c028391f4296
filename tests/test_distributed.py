"""Several processes, data-parallel (Kaggle's 2×T4), run for real on CPU: torch's launcher starts two worker
processes and accelerate joins them with gloo, exactly the code path two GPUs take with NCCL.

Equality with one process is checked on the weight updates with AdamW's epsilon set far above the gradients'
size (`adam_epsilon=10`): AdamW's step is then lr·m̂/ε, linear in the gradient, so the runs' updates differ
only as much as their gradients do — fp32 sums in another order, ≈1e-6 of their norm (see the README's
Development). With the usual ε, Adam divides by |g| and turns rounding on near-zero gradients into steps of up
to one learning rate, whatever the code does. 8-bit AdamW adds one effect: a moment within 1e-6 of one of its
256 quantization levels may round to the neighbouring level, a change of ≤ 1 % of its block's largest value,
for ≈1e-6 / 1e-2 = 1e-4 of the moments: ≈ √1e-4 × 1e-2 = 1e-4 of the norm (measured: 5e-5). 1e-3 of the
update's norm lies above both and far below any real error (another sample, a missing 1/N: order 1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dreambooth_nb import TrainingStopped, train
from dreambooth_nb import storage
from dreambooth_nb.training.distributed import for_processes, sample_positions

# Each launch starts two fresh Python processes that import torch and diffusers (~10 s on 2 cores).
pytestmark = pytest.mark.timeout(600)
LINEAR_ADAM = dict(adam_epsilon=10.0, adam_weight_decay=0.0, learning_rate=1e-3)
TOLERANCE = 1e-3


def updates(final: Path, base: Path) -> torch.Tensor:
    """The UNet's weights minus the base model's, flattened."""
    from safetensors.torch import load_file

    trained = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    start = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    return torch.cat([(trained[k].double() - start[k].double()).flatten() for k in sorted(trained)])


def assert_same_training(a: Path, b: Path, base: Path) -> None:
    da, db = updates(a, base), updates(b, base)
    assert da.norm() > 0
    relative = ((da - db).norm() / da.norm()).item()
    assert relative < TOLERANCE, f"the weight updates differ by {relative:.2e} of their norm"


def test_the_sample_stream_splits_by_rank_exactly():
    one = [list(sample_positions(m, batch=2, rank=0, world=1)) for m in range(3)]
    two = [sorted(sum((list(sample_positions(m, batch=1, rank=r, world=2)) for r in (0, 1)), [])) for m in range(3)]
    assert one == two == [[0, 1], [2, 3], [4, 5]]


def test_for_processes_keeps_the_effective_batch(make_config):
    config = make_config(train_batch_size=1, gradient_accumulation_steps=4)
    two = for_processes(config, 2)
    assert (two.train_batch_size, two.gradient_accumulation_steps, two.num_processes) == (1, 2, 2)
    assert two.effective_batch == config.effective_batch == 4
    assert for_processes(two, 1).effective_batch == 4  # back to one process (a resume on Colab)


def test_two_processes_train_what_one_does_with_prior_preservation_and_8bit_adam(make_config, tiny_model, tmp_path):
    common = dict(max_train_steps=3, with_prior_preservation=True, class_prompt="a photo of a dog",
                  class_data_dir=str(tmp_path / "class"), num_class_images=2, use_8bit_adam=True, **LINEAR_ADAM)
    one = train(make_config(train_batch_size=2, output_dir=str(tmp_path / "one"), **common), num_processes=1)
    two = train(make_config(train_batch_size=2, output_dir=str(tmp_path / "two"), **common), num_processes=2)
    saved = json.loads((tmp_path / "two" / "config.json").read_text())
    assert (saved["num_processes"], saved["train_batch_size"], saved["gradient_accumulation_steps"]) == (2, 1, 1)
    assert_same_training(one, two, tiny_model)
    # With accumulation: 2 processes × batch 1 × 2 accumulated = 1 process × batch 4.
    four = train(make_config(train_batch_size=4, output_dir=str(tmp_path / "four"), **common), num_processes=1)
    accumulated = train(make_config(train_batch_size=1, gradient_accumulation_steps=2, num_processes=2,
                                    output_dir=str(tmp_path / "acc"), **common), num_processes=2)
    assert_same_training(four, accumulated, tiny_model)
    # Only rank 0 writes: the folder holds exactly what a single process writes.
    files = {run: sorted(str(p.relative_to(tmp_path / run)) for p in (tmp_path / run).rglob("*") if p.is_file())
             for run in ("one", "two")}
    assert files["one"] == files["two"]


LAUNCH = textwrap.dedent("""
    import sys
    from dreambooth_nb import TrainConfig, train
    train(TrainConfig.from_json(sys.argv[1]), num_processes=2)
""")


def test_a_killed_launch_resumes_with_two_processes_or_one(make_config, tiny_model, tmp_path):
    """SIGKILL to the launcher and its workers right after the first state; resumed with 2 processes and
    (a copy) with 1, both end where a run never interrupted ends."""
    import shutil

    config = make_config(max_train_steps=6, checkpointing_steps=2, train_batch_size=2, **LINEAR_ADAM,
                         output_dir=str(tmp_path / "killed"))
    path = tmp_path / "config.json"
    config.to_json(path)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(path)], stdout=log, stderr=log, env=env,
                                start_new_session=True)
        deadline = time.monotonic() + 300
        while storage.latest_state(config.output_dir) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert storage.latest_state(config.output_dir) is not None, (tmp_path / "log.txt").read_text()[-3000:]
    assert not (storage.snapshot_path(config.output_dir, 6)).exists(), "finished before the kill: proves nothing"
    shutil.copytree(tmp_path / "killed", tmp_path / "killed-one")
    resumed_two = train(config, num_processes=2)
    resumed_one = train(config.replace(output_dir=str(tmp_path / "killed-one")), num_processes=1)
    unbroken = train(config.replace(output_dir=str(tmp_path / "unbroken")), num_processes=1)
    assert_same_training(unbroken, resumed_two, tiny_model)
    assert_same_training(unbroken, resumed_one, tiny_model)


NAN_IN_RANK_1 = textwrap.dedent("""
    import os
    if os.environ.get("RANK") == "1":  # only the second worker: its loss becomes NaN at its second step
        import importlib, torch
        train = importlib.import_module("dreambooth_nb.training.train")
        real, calls = train.compute_loss, []

        def poisoned(*args, **kwargs):
            calls.append(1)
            loss = real(*args, **kwargs)
            return loss * float("nan") if len(calls) == 2 else loss

        train.compute_loss = poisoned
""")


def test_a_nan_in_one_rank_stops_every_rank_with_its_message(make_config, tmp_path, monkeypatch):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(NAN_IN_RANK_1)  # imported by every new Python process
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "inject") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.monotonic()
    with pytest.raises(TrainingStopped, match=r"The loss became nan at step 2: training diverged"):
        train(make_config(max_train_steps=4, train_batch_size=2, output_dir=str(tmp_path / "run")), num_processes=2)
    assert time.monotonic() - started < 240  # stopped, not hung


# --- The text encoder, SDXL's two, and LoRA on two processes -------------------------------------------------
def test_two_processes_with_the_text_encoder_finish_and_train_what_one_does(make_config, tiny_model, tmp_path):
    """Rank 0 measures the validation loss alone: through the plain encoder, never its DDP wrapper (a
    collective the other rank would never join: the run hung forever)."""
    from safetensors.torch import load_file

    common = dict(max_train_steps=4, train_text_encoder=True, snapshot_steps=[2], **LINEAR_ADAM)
    started = time.monotonic()
    two = train(make_config(train_batch_size=1, output_dir=str(tmp_path / "two"), **common), num_processes=2)
    assert time.monotonic() - started < 240  # finished, not hung
    one = train(make_config(train_batch_size=2, output_dir=str(tmp_path / "one"), **common), num_processes=1)
    assert_same_training(one, two, tiny_model)
    history = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [v["step"] for v in history["validation"]] == [2, 4]
    encoder = "text_encoder/model.safetensors"
    a, b, base = (load_file(Path(p) / encoder) for p in (one, two, tiny_model))
    da = torch.cat([(a[k].double() - base[k].double()).flatten() for k in sorted(a)])
    db = torch.cat([(b[k].double() - base[k].double()).flatten() for k in sorted(a)])
    assert da.norm() > 0 and ((da - db).norm() / da.norm()).item() < TOLERANCE


def _lora_ups(snapshot: Path) -> torch.Tensor:
    """The LoRA up (B) weights, which start at zero: the update itself."""
    from safetensors.torch import load_file

    from dreambooth_nb.model.snapshots import LORA_WEIGHTS

    tensors = load_file(snapshot / LORA_WEIGHTS)
    keys = sorted(k for k in tensors if "lora_B" in k or "lora_up" in k)
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("text_encoder_2.") for k in keys)
    return torch.cat([tensors[k].double().flatten() for k in keys])


def test_sdxl_lora_with_both_text_encoders_on_two_processes(make_config, tiny_sdxl_model, tmp_path):
    """SDXL's first encoder gives only its penultimate hidden state: its last layer gets no gradient, which DDP
    refuses ("Expected to have finished reduction") unless told to look for unused parameters."""
    common = dict(pretrained_model_name_or_path=str(tiny_sdxl_model), method="lora", train_text_encoder=True,
                  max_train_steps=3, adam_epsilon=10.0, adam_weight_decay=0.0, learning_rate=1e-3)
    two = train(make_config(train_batch_size=1, output_dir=str(tmp_path / "two"), **common), num_processes=2)
    one = train(make_config(train_batch_size=2, output_dir=str(tmp_path / "one"), **common), num_processes=1)
    a, b = _lora_ups(one), _lora_ups(two)
    assert a.norm() > 0 and ((a - b).norm() / a.norm()).item() < TOLERANCE


# --- Dying with the notebook's kernel ------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid:
                found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc (Linux) to find the workers")
def test_workers_die_with_the_kernel_that_started_them(make_config, tmp_path):
    """"Restart kernel" SIGKILLs the process that called train(num_processes=2): the launcher and both workers
    end with it (nothing left holding the GPUs), and the next run in the new kernel resumes as usual."""
    config = make_config(max_train_steps=100_000, checkpointing_steps=100_000, output_dir=str(tmp_path / "run"))
    path = tmp_path / "config.json"
    config.to_json(path)
    with open(tmp_path / "log.txt", "w") as log:
        kernel = subprocess.Popen([sys.executable, "-c", LAUNCH, str(path)], stdout=log, stderr=log,
                                  env={**os.environ, "TQDM_DISABLE": "1"})
        workers = []
        try:
            deadline = time.monotonic() + 240
            while " parameters (full, sd)" not in (tmp_path / "log.txt").read_text() and time.monotonic() < deadline:
                assert kernel.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
                time.sleep(0.2)
            workers = _descendants(kernel.pid)
            assert len(workers) >= 3, workers  # the launcher and two workers
        finally:
            kernel.kill()  # SIGKILL: no cleanup runs in it
            kernel.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if _alive(pid)], "workers outlived the kernel"
    final = train(config.replace(max_train_steps=2, resume_from_checkpoint="latest"), num_processes=2)
    assert final.is_dir()


HANG_IN_RANK_1 = textwrap.dedent("""
    import os
    from datetime import timedelta
    import dreambooth_nb.training.distributed as distributed
    distributed.TIMEOUT = timedelta(seconds=5)
    if os.environ.get("RANK") == "1":  # the second worker stops answering at its second step
        import importlib, time
        train = importlib.import_module("dreambooth_nb.training.train")
        real, calls = train.compute_loss, []

        def hung(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                time.sleep(600)
            return real(*args, **kwargs)

        train.compute_loss = hung
""")


def test_a_hung_rank_ends_the_run_with_a_message(make_config, tmp_path, monkeypatch):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(HANG_IN_RANK_1)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "inject") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.monotonic()
    with pytest.raises(TrainingStopped, match=r"one process waited more than .* for another"):
        train(make_config(max_train_steps=4, train_batch_size=2, output_dir=str(tmp_path / "run")), num_processes=2)
    assert time.monotonic() - started < 240


def test_nccl_settings_keep_what_is_set():
    from dreambooth_nb.training.worker import nccl_environment

    environ = {"NCCL_IB_DISABLE": "0"}
    settings = nccl_environment(environ)
    assert environ["NCCL_IB_DISABLE"] == "0" and settings["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
