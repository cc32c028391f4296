"""The Hub push, everything up to the network call: what is uploaded, the model card, and the token's hygiene.

`huggingface_hub.create_repo` / `upload_folder` are replaced by recorders: the test sees their arguments and
the folder that would go up, and nothing leaves the machine.
"""

import huggingface_hub
import pytest
import torch
import yaml
from PIL import Image
from sd_runs import CLASS_PROMPT, PROMPT, train_run

from dreambooth_nb.results import hub
from dreambooth_nb import storage
from dreambooth_nb.errors import ConfigError
from dreambooth_nb.results.evaluate import render_dir
from dreambooth_nb.results.export import export
from dreambooth_nb.dataset.images import png_bytes
from dreambooth_nb.toy.tiny import build_sd_topology_pipeline

FAKE_TOKEN = "hf_FAKEhubNeverPrinted0123456789abcdef"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project with one run (partial snapshot at step 1, complete at 2), samples of step 1, a comparison grid
    and a latent cache; the export of step 1."""
    root = tmp_path_factory.mktemp("hub")
    base = build_sd_topology_pipeline(root / "sd1-base")
    run = train_run(root, base, cache_latents=True, latent_cache_dir=str(root / "project" / "latent-cache"))
    samples = render_dir(storage.snapshot_path(run, 1)) / "settings-key"
    for seed in (0, 1):
        image = Image.new("RGB", (64, 64), (seed * 200, 80, 40))
        storage.atomic_write_bytes(samples / f"prompt-s{seed}.png",
                                   png_bytes(image, text={"prompt": f"{PROMPT} in the snow", "seed": seed}))
    grid = root / "project" / "comparisons" / "compare-1.png"
    storage.atomic_write_bytes(grid, png_bytes(Image.new("RGB", (128, 64))))
    exported = export(run, root / "project" / "exports" / "sks-dog.safetensors", step=1)
    return {"root": root, "run": run, "base": base, "file": exported}


@pytest.fixture
def recorded(monkeypatch):
    calls = {}

    def create_repo(repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}

    def upload_folder(**kwargs):
        folder = kwargs["folder_path"]
        calls["upload_folder"] = kwargs
        calls["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        calls["bytes"] = b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())
        calls["card"] = (folder / "README.md").read_text()

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    return calls


def test_push_uploads_a_complete_pipeline_the_file_and_the_gallery_only(project, recorded, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    url = hub.push_to_hub(project["run"], "someone/sks-dog", step=1, single_file=project["file"])
    assert url == "https://huggingface.co/someone/sks-dog"
    assert recorded["create_repo"] == {"repo_id": "someone/sks-dog", "token": FAKE_TOKEN, "private": True,
                                       "exist_ok": True, "repo_type": "model"}
    assert recorded["upload_folder"]["token"] == FAKE_TOKEN and recorded["upload_folder"]["repo_id"] == "someone/sks-dog"
    files = recorded["files"]
    assert "README.md" in files and "sks-dog.safetensors" in files and "model_index.json" in files
    assert {f.split("/")[0] for f in files if "/" in f} == {"unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                                            "images"}
    assert [f for f in files if f.startswith("images/")] == ["images/00.png", "images/01.png", "images/02.png"]
    assert [f for f in files if "/" not in f] == ["README.md", "model_index.json", "sks-dog.safetensors"]
    assert list((project["root"] / "project" / "latent-cache").rglob("*.safetensors")), "the run cached latents"
    assert not [f for f in files if f.endswith(("snapshot.json", ".pt", ".npy")) or "state" in f or "latent" in f]
    assert FAKE_TOKEN.encode() not in recorded["bytes"]
    assert FAKE_TOKEN not in capsys.readouterr().out


def test_the_uploaded_folder_loads_as_a_pipeline(project, tmp_path):
    from diffusers import StableDiffusionPipeline

    staged = hub.stage(storage.snapshot_path(project["run"], 1), tmp_path, repo_id="someone/sks-dog")
    pipe = StableDiffusionPipeline.from_pretrained(staged)
    trained = StableDiffusionPipeline.from_pretrained(project["base"]).unet.state_dict()
    unet = pipe.unet.state_dict()
    assert any(not torch.equal(unet[k], trained[k]) for k in trained)  # the trained UNet, not the base's
    assert not (staged / "snapshot.json").exists() and not list(staged.glob("*.safetensors"))


def test_the_card_describes_the_run(project, recorded, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    hub.push_to_hub(project["run"], "someone/sks-dog", step=1, single_file=project["file"], private=False)
    assert recorded["create_repo"]["private"] is False
    card = recorded["card"]
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "diffusers" and "dreambooth-nb" in front["tags"]
    assert front["instance_prompt"] == PROMPT and "license" not in front  # a local base: license unknown
    assert front["widget"][0] == {"text": f"{PROMPT} in the snow (seed 0)", "output": {"url": "images/00.png"}}
    assert "base_model" not in front  # a local folder is not a Hub id
    for text in (f"| Trigger (instance prompt) | {PROMPT} |", f"| Class prompt | {CLASS_PROMPT} |",
                 "| Steps | 1 of 2 |", "| Learning rate | 0.0001 |", "| Text encoder trained | no |",
                 "from_pretrained(\"someone/sks-dog\"", "sks-dog.safetensors", "models/Stable-diffusion/",
                 "![Every snapshot side by side", "The base model's license applies", "dreambooth-nb",
                 "local: sd1-base"):
        assert text in card, text
    assert str(project["root"]) not in card and FAKE_TOKEN not in card


def test_license_and_base_come_from_the_hub_base(project):
    assert hub.base_license("stable-diffusion-v1-5/stable-diffusion-v1-5").id == "creativeml-openrail-m"  # offline
    assert hub.base_license("stabilityai/stable-diffusion-2-1").id == "openrail++"
    flux = hub.base_license("black-forest-labs/FLUX.1-dev")  # gated: its card cannot be read without a token
    assert (flux.id, flux.name) == ("other", "flux-1-dev-non-commercial-license") and flux.link.endswith("LICENSE.md")
    assert hub.base_license(str(project["base"])) is None
    meta = {"base": "stable-diffusion-v1-5/stable-diffusion-v1-5", "step": 1}
    card = hub.model_card(storage.snapshot_path(project["run"], 1), meta, repo_id="a/b", images=[])
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "creativeml-openrail-m"
    assert front["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert "`creativeml-openrail-m`, applies" in card and "## Images" not in card
    # FLUX.1-dev's own license: "other" for the Hub, with its name and terms
    card = hub.model_card(storage.snapshot_path(project["run"], 1), {**meta, "base": "black-forest-labs/FLUX.1-dev"},
                          repo_id="a/b", images=[])
    front = yaml.safe_load(card.split("---")[1])
    assert (front["license"], front["license_name"]) == ("other", "flux-1-dev-non-commercial-license")
    assert "`flux-1-dev-non-commercial-license` ([terms](https://huggingface.co/black-forest-labs" in card


def test_no_token_no_push(project, recorded, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("dreambooth_nb.results.hub.find_hf_token", lambda: (None, ""))
    with pytest.raises(ConfigError, match="HF_TOKEN: pushing to the Hub needs a token with write access"):
        hub.push_to_hub(project["run"], "someone/sks-dog")
    assert recorded == {}
    with pytest.raises(ConfigError, match="single_file: .* does not exist"):
        hub.stage(storage.snapshot_path(project["run"], 2), project["root"] / "x", repo_id="a/b",
                  single_file=project["root"] / "missing.safetensors")
