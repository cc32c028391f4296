"""Single-file export, proven by diffusers' own loader: every tensor of every kind of snapshot comes back.

On tiny models with SD 1.x's and SD 2.x's topology (`tiny.build_sd_topology_pipeline`), trained for two steps
so that there is a partial snapshot (step 1: trained parts only, the rest from the base) and a complete one.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from sd_runs import PROMPT, train_run

from dreambooth_nb.model import snapshots
from dreambooth_nb import storage
from dreambooth_nb.errors import ConfigError, DataError
from dreambooth_nb.errors import ExportError
from dreambooth_nb.model.layout import layout_for
from dreambooth_nb.results.export import choose_snapshot, export, how_to_use
from dreambooth_nb.toy.tiny import build_sd_topology_pipeline

# The package exports the function `export`, which hides the module of the same name as an attribute.
export_module = importlib.import_module("dreambooth_nb.results.export")
FAKE_TOKEN = "hf_FAKEexportNeverWritten0123456789abcd"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {v: build_sd_topology_pipeline(root / f"sd{v}-base", version=v) for v in (1, 2)}


@pytest.fixture(scope="module")
def runs(bases, tmp_path_factory):
    """SD 1.x with the text encoder trained (partial snapshot: unet + text_encoder), SD 2.x UNet only (v-prediction)."""
    return {1: train_run(tmp_path_factory.mktemp("run1"), bases[1], train_text_encoder=True),
            2: train_run(tmp_path_factory.mktemp("run2"), bases[2])}


def file_tensors(path) -> dict:
    with safe_open(path, framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def file_metadata(path) -> dict:
    with safe_open(path, framework="pt") as handle:
        return handle.metadata()


def assert_round_trip(file, snapshot, base, *, half: bool):
    """diffusers' loader reads `file` back into exactly the snapshot's weights (fp16-rounded with `half`)."""
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_single_file(str(file), config=str(base), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    source = snapshots.load_pipeline(snapshot, device=torch.device("cpu"), dtype=torch.float32)
    compared = 0
    for part in ("unet", "vae", "text_encoder"):
        got, want = getattr(loaded, part).state_dict(), getattr(source, part).state_dict()
        assert got.keys() == want.keys(), part
        for key, tensor in want.items():
            expected = tensor.half() if half else tensor
            assert torch.equal(got[key].to(expected.dtype), expected), f"{part}: {key}"
            compared += 1
    return compared


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("step", [1, 2], ids=["partial", "complete"])
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_diffusers_loads_every_tensor_back(runs, bases, tmp_path, version, step, half):
    snapshot = storage.snapshot_path(runs[version], step)
    assert snapshots.info(snapshot)["complete"] is (step == 2)
    file = export(runs[version], tmp_path / "model.safetensors", half=half, step=step)
    dtypes = {t.dtype for t in file_tensors(file).values()}
    assert dtypes == {torch.float16 if half else torch.float32}
    assert assert_round_trip(file, snapshot, bases[version], half=half) > 900


def test_the_layout_is_the_original_one(runs, tmp_path):
    """The keys AUTOMATIC1111, ComfyUI and diffusers recognise an SD 1.x / 2.x checkpoint by."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    sd1 = file_tensors(export(runs[1], tmp_path / "sd1.safetensors"))
    assert infer_diffusers_model_type(sd1) == "v1"
    for key in ("model.diffusion_model.output_blocks.11.0.skip_connection.weight",
                "model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.output_blocks.2.1.conv.weight",
                "model.diffusion_model.output_blocks.5.2.conv.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
                "first_stage_model.decoder.up.0.block.2.conv1.weight", "first_stage_model.encoder.down.0.downsample.conv.weight",
                "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"):
        assert key in sd1, key
    attention = sd1["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert attention.dim() == 4 and attention.shape[2:] == (1, 1)  # ldm's 1×1 convolution
    sd2 = file_tensors(export(runs[2], tmp_path / "sd2.safetensors"))
    hidden = sd2["cond_stage_model.model.token_embedding.weight"].shape[1]
    assert sd2["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * hidden, hidden)
    assert "cond_stage_model.model.positional_embedding" in sd2
    assert not [k for k in sd2 if k.startswith("cond_stage_model.transformer.")]


def test_metadata_says_what_was_trained_and_nothing_private(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    file = export(runs[2], tmp_path / "sd2.safetensors")
    meta = file_metadata(file)
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.trigger_phrase"] == PROMPT and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["dreambooth_nb.base_model"] == "local: sd2-base"
    assert meta["dreambooth_nb.learning_rate"] == "0.0001" and meta["dreambooth_nb.step"] == "2"
    assert meta["dreambooth_nb.instance_prompt"] == PROMPT and meta["dreambooth_nb.class_prompt"] == "a photo of a dog"
    assert file_metadata(export(runs[1], tmp_path / "sd1.safetensors"))["modelspec.architecture"] == "stable-diffusion-v1"
    raw = file.read_bytes()
    assert FAKE_TOKEN.encode() not in raw
    assert str(runs[2].parent).encode() not in raw and b"/photos" not in raw  # no local paths in the header


def test_v_prediction_gets_the_yaml_automatic1111_reads(runs, tmp_path):
    export(runs[2], tmp_path / "sd2.safetensors")
    config = yaml.safe_load((tmp_path / "sd2.yaml").read_text())["model"]["params"]
    assert config["parameterization"] == "v"
    assert config["cond_stage_config"]["params"]["layer"] == "penultimate"
    unet = config["unet_config"]["params"]
    assert unet["use_linear_in_transformer"] is True and unet["num_res_blocks"] == 2
    assert unet["channel_mult"] == [1, 2, 4, 4] and unet["attention_resolutions"] == [4, 2, 1]
    export(runs[1], tmp_path / "sd1.safetensors")
    assert not (tmp_path / "sd1.yaml").exists()  # epsilon models need none


def test_a_run_means_its_last_snapshot_or_the_step_asked(runs, tmp_path):
    assert choose_snapshot(runs[1]) == storage.snapshot_path(runs[1], 2)
    assert choose_snapshot(runs[1], step=1) == storage.snapshot_path(runs[1], 1)
    assert choose_snapshot(storage.snapshot_path(runs[1], 1)) == storage.snapshot_path(runs[1], 1)
    with pytest.raises(ConfigError, match="STEP: .* no snapshot at step 3; it has steps 1, 2"):
        choose_snapshot(runs[1], step=3)
    with pytest.raises(DataError, match="no snapshot there"):
        choose_snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"must end in \.safetensors"):
        export(runs[1], tmp_path / "model.ckpt")


def test_a_hub_base_is_read_from_the_cache_with_only_the_needed_files(runs, bases, tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "step-000001"
    shutil.copytree(storage.snapshot_path(runs[2], 1), snapshot)
    meta = json.loads((snapshot / "snapshot.json").read_text())
    (snapshot / "snapshot.json").write_text(json.dumps({**meta, "base": "someone/tiny-sd2", "variant": None}))
    calls = []

    def snapshot_download(repo, *, revision=None, allow_patterns=None):
        calls.append((repo, sorted(allow_patterns)))
        return str(bases[2])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    file = export(snapshot, tmp_path / "hub.safetensors", half=False)
    assert_round_trip(file, storage.snapshot_path(runs[2], 1), bases[2], half=False)
    assert calls == [("someone/tiny-sd2", ["model_index.json", "scheduler/*.json", "text_encoder/config.json",
                                           "text_encoder/model.safetensors",
                                           "text_encoder/model.safetensors.index.json", "vae/config.json",
                                           "vae/diffusion_pytorch_model.safetensors",
                                           "vae/diffusion_pytorch_model.safetensors.index.json"])]

    def offline(repo, **kwargs):
        raise OSError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ExportError, match="base model 'someone/tiny-sd2'.*Connect to the internet"):
        export(snapshot, tmp_path / "offline.safetensors")


def test_fp16_overflow_and_other_families_are_refused(runs, tmp_path):
    snapshot = tmp_path / "big"
    shutil.copytree(storage.snapshot_path(runs[1], 2), snapshot)
    unet = snapshot / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = file_tensors(unet)
    tensors["conv_in.bias"] = tensors["conv_in.bias"] + 1e6  # beyond fp16's 65504

    save_file(tensors, unet)
    with pytest.raises(ExportError, match=r"input_blocks\.0\.0\.bias has values beyond .*half=False"):
        export(snapshot, tmp_path / "x.safetensors")
    assert export(snapshot, tmp_path / "x.safetensors", half=False).is_file()
    with pytest.raises(ExportError, match="SDXL"):
        layout_for({"unet": {"addition_embed_type": "text_time"}, "text_encoder": {}})
    # (a LoRA snapshot exports its adapters: tests/test_lora.py)


def test_how_to_use_names_the_file_prompt_and_base(runs, tmp_path):
    file = export(runs[2], tmp_path / "sks.safetensors")
    text = how_to_use(file, repo_id="you/sks")
    assert 'from_pretrained("you/sks"' in text and 'from_single_file("sks.safetensors"' in text
    assert "models/Stable-diffusion/" in text and "sks.yaml" in text and "ComfyUI/models/checkpoints/" in text
    assert f'pipe("{PROMPT}, in the snow")' in text


RSS_SCRIPT = textwrap.dedent("""
    import gc, sys
    from dreambooth_nb.results.export import export

    def peak_kib():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))

    export(sys.argv[1], sys.argv[3] + ".warm.safetensors")  # imports and first-use allocations, not measured
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS (Linux)
    before = peak_kib()
    export(sys.argv[2], sys.argv[3], half=sys.argv[4] == "half")
    print(peak_kib() - before)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("half", [True, False], ids=["fp16", "fp32"])
def test_export_streams_instead_of_copying_the_model(bases, tmp_path_factory, half):
    """Peak RSS while exporting a 75 MB model: a copy of the model would add its size; streaming adds about one
    tensor. Measured in a fresh process (VmHWM reset through /proc/self/clear_refs after a warm-up export)."""
    big = tmp_path_factory.getbasetemp() / "rss-model"
    if not big.exists():
        build_sd_topology_pipeline(big, width=48)
    out = tmp_path_factory.mktemp("rss") / "big.safetensors"
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(bases[1]), str(big), str(out),
                             "half" if half else "full"], capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    added_mib = int(result.stdout.split()[-1]) / 1024
    size_mib = out.stat().st_size / 2**20
    print(f"export of {size_mib:.0f} MiB ({'fp16' if half else 'fp32'}) added {added_mib:.1f} MiB to the peak RSS")
    assert size_mib > 35
    assert added_mib < 0.25 * size_mib


def test_a_full_disk_leaves_the_old_file_and_no_leftovers(runs, tmp_path, monkeypatch):
    import errno

    target = tmp_path / "model.safetensors"
    export(runs[1], target)
    before = target.read_bytes()
    (tmp_path / ".tmp-model.safetensors-0123abcd").write_bytes(b"x" * 100)  # a disconnect's leftover

    def full(self, dtype):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module.Entry, "tensor", full)
    with pytest.raises(DataError, match=r"No space left on the disk while writing .*model\.safetensors.*Trash"):
        export(runs[1], target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
