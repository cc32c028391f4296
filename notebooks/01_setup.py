# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1 · Setup: GPU, project folder, photos, settings
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dreambooth-nb/dreambooth-nb/blob/main/notebooks/01_setup.ipynb)
#
# Dreambooth teaches Stable Diffusion one new subject (your dog, your mug, your face) from 3–10 photos —
# or several at once (`CONCEPTS` below), each photo optionally with its own caption (`photo.txt`).
# This notebook checks the machine, makes the project folder, checks your photos and writes the
# settings (`config.json`) that notebooks 2–6 read. Run it top to bottom; nothing here trains yet.

# %%
#@title Install (Colab and Kaggle only; keeps the preinstalled torch)
import importlib.util, os, sys
from importlib.metadata import version

HOSTED = "google.colab" in sys.modules or "KAGGLE_KERNEL_RUN_TYPE" in os.environ or os.path.isdir("/kaggle/working")
if HOSTED and importlib.util.find_spec("dreambooth_nb") is None:
    torch_before = version("torch")
    # This is `%pip install -q ...` (pip of this kernel), written as a call so that it can sit under `if`.
    get_ipython().run_line_magic("pip", "install -q dreambooth-nb@git+https://github.com/dreambooth-nb/dreambooth-nb.git")
    if version("torch") != torch_before:
        print("pip replaced torch: Runtime > Restart session, then run this notebook again.")

# %% [markdown]
# ## Settings
# `PRESET` follows the Diffusers Dreambooth study: **object** = learning rate 2e-6, 400 steps, batch 4;
# **face** = learning rate 1e-6, 1200 steps, batch 2, with prior preservation. Memory: fp16 (bf16 where the
# GPU has it) and cached latents always; `FIT_TO_GPU` then lets the memory plan choose the other savers
# (gradient checkpointing, batch or accumulation, 8-bit Adam): the fastest that fit this GPU, never changing
# what is trained. Off, every saver stays on (the fixed 16 GB profile, for a T4 whatever GPU is here). The
# choice is saved with the settings: notebook 3's panel follows it (its box can still change it there).
# `METHOD = "lora"` trains LoRA adapters instead (learning rate 1e-4, diffusers' LoRA example): 3 MB
# snapshots that load in AUTOMATIC1111 and ComfyUI, less memory, faster steps.
# A rare token like `sks` is not required: "a photo of Bob's mug" works too. 0 means "the preset's value".

# %% tags=["parameters"]
#@title Settings { display-mode: "form" }
#@markdown Project folder (empty: Google Drive `MyDrive/dreambooth` on Colab, `/kaggle/working/dreambooth` on Kaggle, `./dreambooth-project` locally).
PROJECT_DIR = ""  #@param {type:"string"}
#@markdown Photo folder (empty: `PROJECT_DIR/instance`). On Colab an upload button appears when it is empty.
INSTANCE_DIR = ""  #@param {type:"string"}
UPLOAD_PHOTOS = True  #@param {type:"boolean"}
#@markdown Base model: a Hub id (SD 1.x / 2.x, SDXL, `stabilityai/stable-diffusion-3.5-medium`, or `black-forest-labs/FLUX.1-dev`: gated and non-commercial, accept its license on its Hub page and turn on HF_LOGIN; on a T4 it trains in 4 bits), a diffusers folder, or one `.safetensors` / `.ckpt` file in the original layout (a community SD 1.x / 2.x model, e.g. from Civitai, on Drive; converted once, cached).
MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"  #@param {type:"string"}
HF_LOGIN = False  #@param {type:"boolean"}
PRESET = "object"  #@param ["object", "face"]
#@markdown `full` fine-tunes the whole model (the study's method); `lora` trains small adapters (3 MB snapshots, learning rate 1e-4).
METHOD = "full"  #@param ["full", "lora"]
#@markdown Fit the memory savers to the GPU (off: every saver on, the 16 GB profile). Saved; notebook 3 follows it.
FIT_TO_GPU = True  #@param {type:"boolean"}
INSTANCE_PROMPT = "a photo of sks dog"  #@param {type:"string"}
CLASS_PROMPT = "a photo of a dog"  #@param {type:"string"}
PRIOR_PRESERVATION = "preset"  #@param ["preset", "on", "off"]
NUM_CLASS_IMAGES = 0  #@param {type:"integer"}
#@markdown Resolution 0: the model's own (512 for SD 1.5; 1024 for SDXL and SD 3.5, 512 for FLUX.1 — these three always train a LoRA).
RESOLUTION = 0  #@param {type:"integer"}
LEARNING_RATE = 0.0  #@param {type:"number"}
MAX_STEPS = 0  #@param {type:"integer"}
#@markdown Stop by itself at the snapshot notebook 4 would suggest (each snapshot rendered and measured as it is saved; the judge downloads once), or train to MAX_STEPS. Off by default: measuring a snapshot costs about half the training between snapshots (the summary below says how much for your settings).
STOP_WHEN = "end"  #@param ["end", "suggested"]
#@markdown Your photos: the captioning model "Draft captions" uses below (Florence-2 base: about a second per photo on a T4; or `Salesforce/blip-image-captioning-large`), and whether to draft when the cell runs (the button does the same).
CAPTIONER = "florence-community/Florence-2-base"  #@param {type:"string"}
DRAFT_CAPTIONS = False  #@param {type:"boolean"}
#@markdown How the audit finds near-duplicate photos: small thumbnails compared (offline), or DINOv2 image embeddings (the comparison's judge; downloads once).
NEAR_DUPLICATES = "thumbnails"  #@param ["thumbnails", "DINOv2"]
#@markdown Masked loss: learn the subject, not the room — the background counts 0.3 in the loss. A photo's mask is `photo.mask.png` beside it (white = subject), else made by the segmenter from the class word ("Make masks" below).
MASKED_LOSS = False  #@param {type:"boolean"}
MASK_SEGMENTER = "CIDAS/clipseg-rd64-refined"  #@param {type:"string"}
#@markdown With prior preservation and captions: generate each class image from a photo's caption (the class prompt in place of [trigger]), so the class images show the same scenes.
CLASS_IMAGES_FROM_CAPTIONS = False  #@param {type:"boolean"}
# More subjects in the same run (optional), one row each after the one above: (photo folder, instance prompt,
# class prompt). Every batch then holds the subjects in turn. Captions: `photo.txt` beside `photo.jpg` in a
# photo folder describes that photo ("[trigger] wearing a hat"; [trigger] stands for the instance prompt).
CONCEPTS = [
    # ("/content/drive/MyDrive/dreambooth/cat", "a photo of sks cat", "a photo of a cat"),
]

# %% [markdown]
# ## The machine
# Which GPU and how much memory; whether 8-bit Adam (bitsandbytes) and xformers actually *run* here (both
# are optional: without them training falls back to torch AdamW and PyTorch's own fast attention).

# %%
from pathlib import Path

from dreambooth_nb import plan
from dreambooth_nb.dataset import images
from dreambooth_nb.notebook import platform, project as projects, settings, views

views.show_errors_as_messages()  # our errors show as one message, not a stack trace
print(platform.check_environment().summary())

# %% [markdown]
# ## Hugging Face login (optional)
# The default model needs no login. For a gated model add a secret named `HF_TOKEN` (Colab: the key icon
# on the left; Kaggle: Add-ons › Secrets) or type it when asked. The token is never printed or saved.

# %%
if HF_LOGIN:
    platform.hf_login()  # asks for the token when none is set
else:
    platform.use_hf_token()  # a token in HF_TOKEN or a Colab/Kaggle secret, for gated models; never shown

# %% [markdown]
# ## Project folder
# Everything lives here: photos, class images, training states and snapshots, comparison grids. On Colab it
# is on Google Drive, so a disconnect loses nothing: rerun the notebook and it continues where it stopped.

# %%
project = projects.open_project(PROJECT_DIR)
print(f"Project folder: {project.root}")

# %% [markdown]
# ## Your photos
# 3–5 photos for an object, 5–10 for a face or pet: different angles, backgrounds and light, the subject
# clearly visible. Files that cannot be used are listed with the reason; they are skipped, not fatal.
# Photos with a caption (`photo.txt`) are listed with the prompt they train with.

# %%
instance_dir = Path(INSTANCE_DIR) if INSTANCE_DIR else project.instance_dir
if UPLOAD_PHOTOS:
    platform.upload_photos(instance_dir)
resolution = RESOLUTION or projects.default_resolution(MODEL_ID)
for folder, prompt, *_ in [(instance_dir, INSTANCE_PROMPT), *CONCEPTS]:
    report = images.scan_images(folder, resolution=resolution, instance_prompt=prompt)
    print(report.summary())
    views.show_image(images.thumbnail_grid(report.usable))

# %% [markdown]
# ## Save the settings
# Written to `PROJECT_DIR/config.json`; notebooks 2–6 read it. Change a setting above and rerun this cell
# to update it. Snapshots: one halfway and one at the end; every quarter with `STOP_WHEN = "suggested"` (notebook 3
# can add more).

# %%
config, fitted = projects.setup_config(
    project, kind=PRESET, method=METHOD, fit_to_gpu=FIT_TO_GPU, model=MODEL_ID,
    instance_dir=instance_dir, instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT,
    prior_preservation=PRIOR_PRESERVATION, num_class_images=NUM_CLASS_IMAGES, resolution=resolution,
    learning_rate=LEARNING_RATE, max_steps=MAX_STEPS, concepts=CONCEPTS, stop_when=STOP_WHEN, masked_loss=MASKED_LOSS,
    mask_segmenter=MASK_SEGMENTER, class_images_from_captions=CLASS_IMAGES_FROM_CAPTIONS, with_report=True)
print(f"Saved {project.save_config(config)}\n")
print(settings.config_summary(config))

# %% [markdown]
# ## Your photos, one by one: captions, audit, masks
# Each photo as training sees it: the yellow square is what the centre crop keeps of a photo that is not
# square; with masked loss, the tinted part is background. Beside it, its caption (`photo.txt`: edit it and it
# is saved as you leave the box; `[trigger]` stands for the instance prompt) and what the audit found:
# near-duplicates, a subject too small or cut off by the crop, a very long photo, a low resolution — each with
# what to do; nothing is deleted. **Draft captions** writes a caption for every photo without one (the class
# word becomes `[trigger]`; captions you wrote are never touched): read and edit them before training.
# **Make masks** (with masked loss) masks the photos without `photo.mask.png`, as training will (cached).

# %%
from dreambooth_nb.notebook import ui

tables = [ui.PhotoTable(config, subject=subject, captioner=CAPTIONER, duplicates_by=NEAR_DUPLICATES).show()
          for subject in config.concepts]
if DRAFT_CAPTIONS:
    for table in tables:
        table.start()  # what the Draft captions button does

# %% [markdown]
# ## Will it fit? The fastest settings that fit
# The memory plan for these settings, from the model's configs alone (nothing downloaded yet): GPU memory
# at the peak and what it is made of, host RAM, disk; on the GPU of this runtime, or a T4 when there is
# none. With `FIT_TO_GPU` it first lists each memory saver the fit turned on or off and why, with the plan
# before (every saver on) and after. Notebook 3 fits again to the GPU it trains on, also when it resumes a
# run on another GPU. When nothing fits, the plan names what would. Training checks the same plan first.

# %%
fitted if fitted is not None else plan(config)
