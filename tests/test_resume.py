"""Nothing lost: a run killed with SIGKILL at any moment resumes to the very weights of an unbroken run.

Real processes are killed. `train_worker.py --serve` imports torch and diffusers once and forks one
fresh training process per run (a few ms instead of ~5 s of imports), kills it with SIGKILL at the
moment asked, and reports. One test also kills a freshly started `python train_worker.py` process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from photos import write_photos

from dreambooth_nb import Concept, TrainConfig, train
from dreambooth_nb.model import snapshots
from dreambooth_nb import storage

WORKER = Path(__file__).with_name("train_worker.py")
FIRST_STATE = "states/state-*/state.json"


class Server:
    """Client of `train_worker.py --serve`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.log = open(folder / "worker.log", "w")
        env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, str(WORKER), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        assert "ready" in json.loads(self._line())
        self.count = 0

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("training server died:\n" + self.log_tail())
        return line

    def log_tail(self, n=4000) -> str:
        self.log.flush()
        return (self.folder / "worker.log").read_text()[-n:]

    def run(self, config: TrainConfig, *, kill_after=None, kill_when=None, timeout=120) -> dict:
        self.count += 1
        path = self.folder / f"config-{self.count}.json"
        config.to_json(path)
        job = {"config": str(path), "kill_after": kill_after, "kill_when": kill_when, "timeout": timeout}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def finish(self, config: TrainConfig) -> Path:
        """Run to the end (resuming if there is a state): the final snapshot."""
        result = self.run(config)
        assert result["returncode"] == 0 and not result["killed"], self.log_tail()
        return storage.snapshot_path(config.output_dir, config.max_train_steps)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"))
    yield s
    s.close()


# --- Helpers ----------------------------------------------------------------------------------------------
def snapshot_weights(snapshot: Path, parts=("unet", "text_encoder", "vae")) -> dict[str, torch.Tensor]:
    """Every saved tensor of the snapshot's `parts` (those it holds: an intermediate one has the trained parts)."""
    out = {}
    for part in parts:
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        if (snapshot / part).is_dir():
            for shard in storage.load_weights(snapshot / part, filename=name):
                out.update({f"{part}.{k}": v for k, v in shard.items()})
    for name in (snapshots.LORA_WEIGHTS, snapshots.KOHYA_WEIGHTS):  # a LoRA snapshot: its adapters, both files
        if (snapshot / name).is_file():
            out.update({f"{name}:{k}": v for k, v in load_file(snapshot / name).items()})
    assert out, f"{snapshot} holds no weights"
    return out


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ (max |diff| {worst:g}), e.g. {different[:3]}"


def _tensor_dtypes(tree):
    if torch.is_tensor(tree):
        yield tree.dtype
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensor_dtypes(value)


def check_state(path: Path) -> dict:
    """Everything in a listed state loads: marker, weights, optimizer, schedule, RNG, EMA."""
    meta = json.loads((path / storage.STATE_MARKER).read_text())
    assert meta["step"] == int(path.name.split("-")[1])
    weights = ["unet"] + (["text_encoder"] if meta["config"]["train_text_encoder"] else []) + \
        (["ema"] if meta["config"]["use_ema"] else [])
    for name in weights:
        assert list(storage.load_weights(path, filename=f"{name}.safetensors"))
    if meta["config"]["use_ema"]:
        assert json.loads((path / "ema.json").read_text())["optimization_step"] >= 1
    for name in ("optimizer.pt", "lr_scheduler.pt", "rng.pt"):
        torch.load(path / name, map_location="cpu", weights_only=True)
    return meta


def check_snapshot(path: Path, *, full: bool) -> None:
    """A listed snapshot has every weight file it names; `full` loads it as a pipeline (composed with the
    base model when it holds only the trained parts)."""
    meta = snapshots.info(path)
    assert set(meta["trained"]) <= {part.split(".")[0] for part in snapshot_weights(path)}
    if full:
        snapshots.load_pipeline(path, device=torch.device("cpu"))


def leftovers(out: Path) -> list[Path]:
    return [p for folder in (out, out / "states", out / "snapshots") if folder.is_dir()
            for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def kill_then_resume(server: Server, config: TrainConfig) -> dict:
    killed = server.run(config, kill_when=FIRST_STATE)
    assert killed["killed"] and killed["returncode"] == -signal.SIGKILL, (killed, server.log_tail())
    out = Path(config.output_dir)
    assert storage.latest_state(out) is not None
    assert not snapshots.is_snapshot(storage.snapshot_path(out, config.max_train_steps)), \
        "the run finished before the kill: the test proves nothing"
    return killed


# --- 1. Resume exactness ----------------------------------------------------------------------------------
def test_sigkilled_process_resumes_to_bitwise_identical_weights(make_config, tmp_path, server):
    """A fresh `python train_worker.py` process is killed right after its first state; resumed, it ends
    with the same weights, bit for bit, and the same loss history as a run never interrupted."""
    config = make_config(max_train_steps=8, checkpointing_steps=3, snapshot_steps=[2, 5],
                         output_dir=str(tmp_path / "killed"))
    path = tmp_path / "config.json"
    config.to_json(path)
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, str(WORKER), str(path)], stdout=log, stderr=log, env=env)
        out = Path(config.output_dir)
        deadline = time.monotonic() + 120
        while not list(out.glob(FIRST_STATE)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-3000:]
    assert storage.latest_state(out) is not None
    assert not snapshots.is_snapshot(storage.snapshot_path(out, 8))

    resumed = server.finish(config)
    unbroken = server.finish(config.replace(output_dir=str(tmp_path / "unbroken")))
    assert_bitwise_equal(snapshot_weights(resumed), snapshot_weights(unbroken))
    for step in (2, 5):  # intermediate snapshots too
        assert_bitwise_equal(snapshot_weights(storage.snapshot_path(out, step)),
                             snapshot_weights(storage.snapshot_path(tmp_path / "unbroken", step)))
    history = json.loads((out / "history.json").read_text())
    assert history == json.loads((tmp_path / "unbroken" / "history.json").read_text())
    assert history["steps"] == list(range(1, 9))


VARIANTS = {
    # Everything that carries state across a resume at once: 8-bit moments (real bitsandbytes), the text
    # encoder's weights and moments, accumulation, class images, EMA, a warm-up + cosine schedule.
    "8bit-te-accum-prior-ema-cosine": dict(
        use_8bit_adam=True, train_text_encoder=True, gradient_accumulation_steps=2, with_prior_preservation=True,
        class_prompt="a photo of a dog", num_class_images=3, sample_batch_size=3, use_ema=True,
        lr_scheduler="cosine", lr_warmup_steps=3, max_train_steps=8, checkpointing_steps=3),
    # A linear warm-up schedule, a text encoder frozen midway, random flips and crops, offset noise, min-SNR.
    "linear-te-stop-flip-crop": dict(
        train_text_encoder=True, stop_text_encoder_training=4, lr_scheduler="linear", lr_warmup_steps=2,
        random_flip=True, center_crop=False, offset_noise=0.1, snr_gamma=5.0, max_train_steps=7,
        checkpointing_steps=2, text_encoder_learning_rate=5e-5),
    # LoRA: the states hold the adapters (UNet and text encoder) and their 8-bit moments, with EMA.
    "lora-8bit-te-accum-prior-ema": dict(
        method="lora", learning_rate=1e-3, use_8bit_adam=True, train_text_encoder=True,
        gradient_accumulation_steps=2, with_prior_preservation=True, class_prompt="a photo of a dog",
        num_class_images=3, sample_batch_size=3, use_ema=True, max_train_steps=7, checkpointing_steps=3),
    # Two subjects, each with class images, one photo captioned; random flips, the text encoder training.
    "two-concepts-captions-prior-te": dict(
        concepts=True, with_prior_preservation=True, sample_batch_size=3, train_text_encoder=True,
        random_flip=True, train_batch_size=2, gradient_accumulation_steps=2, max_train_steps=6,
        checkpointing_steps=2),
    # SD3: a transformer's adapters trained on a flow (logit-normal σ from each sample's generator), class
    # images drawn by the SD3 pipeline, EMA, 8-bit moments, accumulation.
    "sd3-lora-8bit-accum-prior-ema": dict(
        sd3=True, method="lora", learning_rate=1e-3, use_8bit_adam=True, gradient_accumulation_steps=2,
        with_prior_preservation=True, class_prompt="a photo of a dog", num_class_images=3, sample_batch_size=3,
        use_ema=True, max_train_steps=7, checkpointing_steps=3),
    # FLUX.1: packed latents, guidance embedding; class images drawn by the Flux pipeline, accumulation.
    "flux-lora-accum-prior": dict(
        flux=True, method="lora", learning_rate=1e-3, gradient_accumulation_steps=2, with_prior_preservation=True,
        class_prompt="a photo of a dog", num_class_images=3, sample_batch_size=3, max_train_steps=6,
        checkpointing_steps=2),
    # SDXL: two text encoders with adapters, added time ids from random crops and flips.
    "sdxl-lora-te-crop-flip": dict(
        sdxl=True, method="lora", learning_rate=1e-3, train_text_encoder=True, center_crop=False, random_flip=True,
        gradient_accumulation_steps=2, max_train_steps=6, checkpointing_steps=2),
}


def two_concepts(photos: str, tmp_path: Path) -> list[Concept]:
    """The test's dog photos (one captioned) and three cat photos, each subject with 2 class images."""
    (Path(photos) / "photo-1.txt").write_text("[trigger] in the snow")
    cats = write_photos(tmp_path / "cats", n=3, seed=1)
    return [Concept(photos, "a photo of sks dog", str(tmp_path / "class-dog"), "a photo of a dog", 2),
            Concept(str(cats), "a photo of sks cat", str(tmp_path / "class-cat"), "a photo of a cat", 2)]


@pytest.mark.parametrize("name", VARIANTS)
def test_resume_is_bitwise_for_every_stateful_option(make_config, tmp_path, server, name, request):
    options = dict(VARIANTS[name])
    if options.pop("sdxl", False):
        options["pretrained_model_name_or_path"] = str(request.getfixturevalue("tiny_sdxl_model"))
    for family in ("sd3", "flux"):
        if options.pop(family, False):
            options["pretrained_model_name_or_path"] = str(request.getfixturevalue(f"tiny_{family}_model"))
    if options.pop("concepts", False):
        options["concepts"] = two_concepts(make_config().concepts[0].instance_data_dir, tmp_path)
    elif options.get("with_prior_preservation"):
        options["class_data_dir"] = str(tmp_path / "class")
    config = make_config(output_dir=str(tmp_path / "killed"), **options)
    kill_then_resume(server, config)
    state = storage.latest_state(config.output_dir)
    if config.use_8bit_adam and config.method == "full":  # the 8-bit moments really are 8-bit, and survive
        # the round trip (bitsandbytes keeps tensors under 4096 elements in 32 bits: all of a tiny LoRA)
        moments = torch.load(state / "optimizer.pt", weights_only=True)["state"]
        assert torch.uint8 in set(_tensor_dtypes(moments))
    resumed = server.finish(config)
    unbroken = server.finish(config.replace(output_dir=str(tmp_path / "unbroken")))
    assert_bitwise_equal(snapshot_weights(resumed), snapshot_weights(unbroken))
    assert json.loads((tmp_path / "killed" / "history.json").read_text()) == \
        json.loads((tmp_path / "unbroken" / "history.json").read_text())


# --- 2. Rotation ------------------------------------------------------------------------------------------
def test_rotation_keeps_the_last_k_states_and_every_snapshot(make_config):
    config = make_config(max_train_steps=7, checkpointing_steps=1, checkpoints_total_limit=2, snapshot_steps=[1, 2, 4])
    train(config)
    out = Path(config.output_dir)
    assert [s for s, _ in storage.list_states(out)] == [5, 6]
    assert [s for s, _ in storage.list_snapshots(out)] == [1, 2, 4, 7]
    assert sorted(p.name for p in (out / "states").iterdir()) == ["state-000005", "state-000006"]
    for _, path in storage.list_states(out):
        check_state(path)


def test_rotation_killed_midway_never_leaves_a_listed_half_state(tmp_path, monkeypatch):
    """A kill while a rotated state is being deleted must not leave a folder that looks complete."""
    out = tmp_path / "out"
    for step in (1, 2, 3):
        with storage.atomic_folder(storage.state_path(out, step)) as tmp:
            (tmp / "unet.safetensors").write_bytes(b"weights")
            (tmp / "optimizer.pt").write_bytes(b"moments")
            storage.write_json(tmp / storage.STATE_MARKER, {"step": step})
    real_rmtree = shutil.rmtree

    def dies_after_one_file(path, *args, **kwargs):  # delete one file but the marker, then "SIGKILL"
        victim = next(p for p in sorted(Path(path).iterdir()) if p.name != storage.STATE_MARKER)
        victim.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.shutil, "rmtree", dies_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        storage.rotate_states(out, keep=1)
    monkeypatch.setattr(storage.shutil, "rmtree", real_rmtree)
    for _, path in storage.list_states(out):
        assert {p.name for p in path.iterdir()} == {"unet.safetensors", "optimizer.pt", storage.STATE_MARKER}
    assert storage.latest_state(out).name == "state-000003"
    storage.remove_partial(out)
    storage.rotate_states(out, keep=1)
    assert sorted(p.name for p in (out / "states").iterdir()) == ["state-000003"]


# --- 4. Partial saves -------------------------------------------------------------------------------------
def test_partial_saves_are_cleaned_and_never_resumed_from(make_config, capsys):
    config = make_config(max_train_steps=6, checkpointing_steps=2)
    out = Path(config.output_dir)
    train(config.replace(max_train_steps=3))  # leaves state-000002 (max_train_steps may change on resume)
    shutil.rmtree(out / "snapshots")
    # What a kill leaves behind: a temporary state folder, a temporary file, a snapshot being written,
    # and a state folder whose marker was never written (copied by hand, or an older version's crash).
    (out / "states" / ".tmp-state-000004-deadbeef").mkdir()
    (out / "states" / ".tmp-state-000004-deadbeef" / "unet.safetensors").write_bytes(b"half")
    (out / ".tmp-history.json-cafecafe").write_text("{")
    (out / "snapshots").mkdir()
    (out / "snapshots" / ".tmp-step-000006-0badf00d").mkdir()
    half = storage.state_path(out, 5)
    shutil.copytree(storage.state_path(out, 2), half)
    (half / storage.STATE_MARKER).unlink()
    assert storage.latest_state(out).name == "state-000002"
    assert [s for s, _ in storage.list_states(out)] == [2]

    capsys.readouterr()
    train(config)
    printed = capsys.readouterr().out
    assert "Resuming from state-000002" in printed
    assert printed.count("an incomplete save") == 3
    assert leftovers(out) == []
    assert snapshots.is_snapshot(storage.snapshot_path(out, 6))


def test_a_snapshot_caught_between_its_two_renames_is_restored(tmp_path):
    """Replacing a folder moves the old one aside, then renames the new one in: a kill between the two
    leaves only `.old-…` and `.tmp-…`. The complete old version must come back, not be deleted."""
    out = tmp_path / "out"
    final = storage.snapshot_path(out, 4)
    with storage.atomic_folder(final) as tmp:
        (tmp / "model_index.json").write_text("{}")
    old = final.with_name(f".old-{final.name}-12345678")
    os.rename(final, old)
    (final.parent / f".tmp-{final.name}-87654321").mkdir()  # the new version, not yet renamed in
    storage.remove_partial(out)
    assert [s for s, _ in storage.list_snapshots(out)] == [4]
    assert leftovers(out) == []


# --- 3. Torture: kill at random moments, over and over ---------------------------------------------------
def test_random_kills_never_leave_a_broken_save_and_lose_nothing(make_config, tmp_path, server):
    """24 real processes killed on one output_dir: 16 at seeded random moments (loading, training,
    saving), 8 in the middle of writing a state or a snapshot. After every kill everything listed loads
    and the newest state never goes backwards; then a last run finishes with the weights, bit for bit,
    and the loss history of a run never interrupted.

    The killed runs aim at 1000 steps so none finishes however fast the machine is (a constant schedule
    after warm-up, so the final max_train_steps changes nothing but where it ends)."""
    snapshot_every = 4
    config = make_config(max_train_steps=1000, checkpointing_steps=1, checkpoints_total_limit=2,
                         snapshot_steps=list(range(snapshot_every, 1001, snapshot_every)), use_ema=True,
                         lr_scheduler="constant_with_warmup", lr_warmup_steps=3,
                         output_dir=str(tmp_path / "tortured"))
    out = Path(config.output_dir)
    rng = random.Random(20240601)
    verified: dict[Path, float] = {}  # snapshots already loaded as pipelines (path → mtime)
    newest, kills, interrupted_saves = 0, 0, 0
    started = time.monotonic()
    for trial in range(24):
        if trial % 3 == 2:  # kill in the middle of a save: the 2nd state of this run, or its next snapshot
            if trial % 6 == 2:
                target = f"states/.tmp-state-{newest + 2:06d}-*"
            else:
                target = f"snapshots/.tmp-step-{(newest // snapshot_every + 1) * snapshot_every:06d}-*"
            result = server.run(config, kill_when=target, timeout=20)
        else:
            result = server.run(config, kill_after=rng.uniform(0.0, 2.0))
        assert result["killed"] and result["returncode"] == -signal.SIGKILL, (result, server.log_tail())
        kills += 1
        interrupted_saves += bool(leftovers(out))
        states = storage.list_states(out)
        for step, path in states:
            check_state(path)
        assert len(states) <= 3  # K = 2, plus the newest one when killed between its save and the rotation
        if states:
            assert states[-1][0] >= newest, "the newest state went backwards: work was lost"
            newest = states[-1][0]
        for step, path in storage.list_snapshots(out):
            mtime = (path / storage.SNAPSHOT_MARKER).stat().st_mtime
            check_snapshot(path, full=verified.get(path) != mtime)
            verified[path] = mtime
        if (out / "history.json").is_file():  # written after each state: at most one state behind
            steps = json.loads((out / "history.json").read_text())["steps"]
            assert steps == list(range(1, len(steps) + 1)) and len(steps) <= newest
            assert len(states) < 2 or len(steps) >= states[-2][0]
    took = time.monotonic() - started
    print(f"torture: {kills} kills, {interrupted_saves} left a save half-written, newest state {newest}, "
          f"{len(verified)} snapshots, {took:.1f} s")
    assert interrupted_saves >= 4 and newest >= 4

    end = newest + 3
    finished = config.replace(max_train_steps=end, snapshot_steps=[s for s in config.snapshot_steps if s <= end])
    final = server.finish(finished)
    check_snapshot(final, full=True)
    assert leftovers(out) == []
    assert len(storage.list_states(out)) == 2
    assert json.loads((out / "history.json").read_text())["steps"] == list(range(1, end + 1))
    unbroken = server.finish(finished.replace(output_dir=str(tmp_path / "unbroken"), checkpointing_steps=1000))
    assert_bitwise_equal(snapshot_weights(final), snapshot_weights(unbroken))
    assert json.loads((out / "history.json").read_text()) == \
        json.loads((tmp_path / "unbroken" / "history.json").read_text())
    for step, path in storage.list_snapshots(out):  # every intermediate snapshot too
        assert_bitwise_equal(snapshot_weights(path), snapshot_weights(storage.snapshot_path(unbroken.parent.parent, step)))


def test_a_kill_right_after_the_final_snapshot_keeps_the_whole_loss_history(make_config, monkeypatch):
    """A finished run is never trained again, so its history must be on disk before the final snapshot."""
    config = make_config(max_train_steps=4, checkpointing_steps=2)
    real_rename = os.rename

    def killed_after_final_snapshot(src, dst):
        real_rename(src, dst)
        if Path(dst) == storage.snapshot_path(config.output_dir, 4):
            raise KeyboardInterrupt

    monkeypatch.setattr(storage.os, "rename", killed_after_final_snapshot)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.undo()
    train(config)  # "already finished"
    assert json.loads((Path(config.output_dir) / "history.json").read_text())["steps"] == [1, 2, 3, 4]
