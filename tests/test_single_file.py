"""Any base model as input: a single .safetensors / .ckpt file becomes a cached diffusers folder, and training,
snapshots and loading accept it where they accept a folder or a Hub id.

The files are exported from tiny SD-topology models, whose configs stand in for `known_models/` (the real
SD 1.5 / 2.1 configs do not fit a tiny file: that mismatch is tested too, as the message users would see).
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sd_runs import train_run

from dreambooth_nb import preset
from dreambooth_nb.model import single_file, snapshots
from dreambooth_nb import storage
from dreambooth_nb.config import model_location
from dreambooth_nb.errors import ConfigError
from dreambooth_nb.results.export import export
from dreambooth_nb.model.single_file import KnownBase, diffusers_folder, prediction_type
from dreambooth_nb.toy.tiny import build_sd_topology_pipeline

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{version: (base folder, exported fp16 file)}."""
    root = tmp_path_factory.mktemp("single-files")
    made = {}
    for version in (1, 2):
        base = build_sd_topology_pipeline(root / f"sd{version}-base", version=version)
        made[version] = base, export(base, root / f"community-sd{version}.safetensors")
    return made


@pytest.fixture(autouse=True)
def cache_and_bases(files, tmp_path, monkeypatch):
    """The cache in this test's folder; the tiny bases as the known ones."""
    monkeypatch.setenv(single_file.CACHE_ENV, str(tmp_path / "cache"))
    for version, (base, _) in files.items():
        monkeypatch.setitem(single_file.KNOWN_BASES, f"sd{version}", KnownBase(f"tiny/sd{version}", base))


def state(folder, part):
    name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
    with safe_open(folder / part / name, framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


@pytest.mark.parametrize("version", [1, 2])
def test_a_file_becomes_its_diffusers_folder_once(files, version, monkeypatch, capsys):
    base, file = files[version]
    folder = diffusers_folder(file)
    assert f"Converting {file.name} (SD{version}" in capsys.readouterr().out
    for part in ("unet", "vae", "text_encoder"):
        got, want = state(folder, part), state(base, part)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k].half(), want[k].half()) for k in want), part
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == ("epsilon" if version == 1 else "v_prediction")
    assert json.loads((folder / single_file.MARKER).read_text())["family"] == f"sd{version}"
    assert next(iter(state(folder, "unet").values())).dtype == torch.float16  # the file's precision is kept
    monkeypatch.setattr(single_file, "_load", lambda *a, **k: pytest.fail("converted twice"))
    assert diffusers_folder(file) == folder
    assert single_file.resolve(str(file)) == str(folder) and single_file.resolve("owner/model") == "owner/model"


def test_a_changed_file_is_converted_again(files, tmp_path):
    base, file = files[1]
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(file.read_bytes())
    first = diffusers_folder(copy)
    export(base, copy, half=False)  # same name, other content
    assert diffusers_folder(copy) != first


def test_a_ckpt_file_is_read_as_weights_only(files, tmp_path):
    base, file = files[1]
    with safe_open(file, framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 10}, ckpt)
    folder = diffusers_folder(ckpt)
    assert torch.equal(state(folder, "unet")["conv_in.weight"].half(), state(base, "unet")["conv_in.weight"].half())


def test_config_accepts_a_file_and_names_what_it_may_be(files, tmp_path, photos):
    _, file = files[1]
    assert model_location(str(file)) == "file"
    assert model_location(str(tmp_path / "missing.safetensors")) is None
    preset(pretrained_model_name_or_path=str(file), instance_data_dir=str(photos), instance_prompt=PROMPT).validate()
    with pytest.raises(ConfigError, match=r"neither an existing folder, a \.safetensors or \.ckpt file, nor a Hub id"):
        preset(pretrained_model_name_or_path=str(tmp_path / "missing.safetensors"),
               instance_data_dir=str(photos), instance_prompt=PROMPT).validate()


def test_training_from_a_file_and_loading_its_partial_snapshot(files, tmp_path):
    base, file = files[1]
    run = train_run(tmp_path, file)
    partial = storage.snapshot_path(run, 1)
    meta = snapshots.info(partial)
    assert meta["base"] == str(file.resolve()) and meta["complete"] is False  # the file, not the cache folder
    pipe = snapshots.load_pipeline(partial, device=torch.device("cpu"))
    want = state(base, "vae")
    got = pipe.vae.state_dict()
    assert all(torch.equal(got[k].half(), want[k].half()) for k in want)  # the frozen VAE came from the file
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    class_images = snapshots.load_pipeline(str(file), device=torch.device("cpu"))  # as priors.py loads the base
    assert torch.equal(class_images.vae.state_dict()["decoder.conv_out.bias"].half(), want["decoder.conv_out.bias"].half())
    exported = export(partial, tmp_path / "again.safetensors")  # the VAE and text encoder from the file's folder
    with safe_open(exported, framework="pt") as handle:
        assert handle.metadata()["dreambooth_nb.base_model"] == f"local: {file.name}"
        assert torch.equal(handle.get_tensor("first_stage_model.decoder.conv_out.bias"),
                           want["decoder.conv_out.bias"].half())


def test_the_known_configs_must_fit_the_file(files, monkeypatch):
    """The real SD 1.5 configs (known_models/) against a tiny SD 1.x file: refused before any conversion."""
    _, file = files[1]
    monkeypatch.setitem(single_file.KNOWN_BASES, "sd1", KnownBase(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", single_file.KNOWN_MODELS / "stable-diffusion-v1-5" /
        "stable-diffusion-v1-5"))
    with pytest.raises(ConfigError, match=r"is an SD1 checkpoint but not shaped like stable-diffusion-v1-5/.*differ"):
        diffusers_folder(file)


def test_missing_configs_and_tokenizer_are_named(files, tmp_path, monkeypatch):
    base, file = files[1]
    monkeypatch.setitem(single_file.KNOWN_BASES, "sd1", KnownBase("nobody/nothing", tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"configs of nobody/nothing.*missing:.*model_index\.json.*Reinstall"):
        diffusers_folder(file)
    configs = tmp_path / "configs"  # the configs alone, as known_models/ ships them: no tokenizer
    for source in base.rglob("*.json"):
        if source.parent.name != "tokenizer":
            (configs / source.relative_to(base)).parent.mkdir(parents=True, exist_ok=True)
            (configs / source.relative_to(base)).write_text(source.read_text())
    monkeypatch.setitem(single_file.KNOWN_BASES, "sd1", KnownBase("nobody/nothing", configs))
    with pytest.raises(ConfigError, match=r"tokenizer of nobody/nothing.*Connect to the internet once"):
        diffusers_folder(file)


def test_other_checkpoints_are_refused_with_the_reason(files, tmp_path):
    _, file = files[1]
    with safe_open(file, framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}

    def refused(name, changed, match):
        path = tmp_path / name
        save_file(changed, path)
        with pytest.raises(ConfigError, match=match):
            diffusers_folder(path)

    refused("xl.safetensors", {**tensors, "conditioner.embedders.1.model.positional_embedding": torch.zeros(1)}, "SDXL")
    refused("unet.safetensors", {k: v for k, v in tensors.items() if k.startswith("model.")}, "no SD 1.x or 2.x text")
    refused("novae.safetensors", {k: v for k, v in tensors.items() if not k.startswith("first_stage")}, "no VAE")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    inpaint = {**tensors, key: torch.zeros(tensors[key].shape[0], 9, *tensors[key].shape[2:], dtype=torch.float16)}
    refused("inpaint.safetensors", inpaint, "9 input channels")


def test_prediction_type_from_metadata_yaml_or_weights(files, tmp_path):
    _, file = files[2]
    assert prediction_type(file, "sd2", {"modelspec.prediction_type": "epsilon"}) == "epsilon"
    assert prediction_type(file, "sd2", {}) == "v_prediction"  # the .yaml export wrote beside it
    (file.with_suffix(".yaml")).rename(tmp_path / "moved.yaml")
    try:  # no metadata, no yaml: ComfyUI's test of the weights (a random tiny model's norm bias is 0: epsilon)
        assert prediction_type(file, "sd2", {}) == "epsilon"
    finally:
        (tmp_path / "moved.yaml").rename(file.with_suffix(".yaml"))
    with safe_open(file, framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    tensors[key] = torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(0)).half()  # std ≈ 1
    save_file(tensors, tmp_path / "trained-v.safetensors")
    assert prediction_type(tmp_path / "trained-v.safetensors", "sd2", {}) == "v_prediction"
    assert prediction_type(files[1][1], "sd1", {}) == "epsilon"


def test_the_memory_plan_reads_a_file_without_converting_it(files, tmp_path, photos):
    """Notebook 1 plans before anything is loaded: for a file, from the configs it would be converted with."""
    from dreambooth_nb import plan

    base, file = files[1]
    from_file = plan(preset(pretrained_model_name_or_path=str(file), instance_data_dir=str(photos), instance_prompt=PROMPT), gpu="T4")
    from_folder = plan(preset(pretrained_model_name_or_path=str(base), instance_data_dir=str(photos),
                              instance_prompt=PROMPT), gpu="T4")
    assert from_file.gpu_peak_bytes == from_folder.gpu_peak_bytes and from_file.fits
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("model_index.json"))
