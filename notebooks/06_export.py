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
# # 6 · Export and share
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dreambooth-nb/dreambooth-nb/blob/main/notebooks/06_export.ipynb)
#
# Take the model out of the suite: one `.safetensors` file in the original Stable Diffusion layout, the file
# AUTOMATIC1111 and ComfyUI load, written into `PROJECT_DIR/exports` (on Drive on Colab). Optionally, push
# the model to the Hugging Face Hub as well: a **private** repository by default, with a model card and your
# samples. By default the snapshot notebook 4 suggested for your run (★ in its grid), else its last one; set
# `STEP` to take another.

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
# `RUN` is a run folder as notebook 4 lists them (`lr2e-6`, `lr1e-4-lora`, a sweep's `sweeps/lr5e-6`); empty
# means the run of your project settings, the one notebook 3 trained. `STEP` picks its snapshot (0: the one
# notebook 4 suggested, else the last). fp16 (`HALF`) halves the file — 2.1 GB for SD 1.5 — and is what
# AUTOMATIC1111 and ComfyUI compute in anyway.
#
# To push to the Hub, add a Hugging Face token **with write access** as a secret named `HF_TOKEN` (Colab: the
# key icon; Kaggle: Add-ons > Secrets) and set `REPO_ID` to `your-name/model-name`.

# %% tags=["parameters"]
#@title Settings { display-mode: "form" }
PROJECT_DIR = ""  #@param {type:"string"}
RUN = ""  #@param {type:"string"}
STEP = 0  #@param {type:"integer"}
HALF = True  #@param {type:"boolean"}
#@markdown A LoRA run exports its adapters (a few MB, loaded as a LoRA); `MERGED` exports base + LoRA as one checkpoint instead.
MERGED = False  #@param {type:"boolean"}
#@markdown File name in `PROJECT_DIR/exports` (empty: the run's name and step).
FILE_NAME = ""  #@param {type:"string"}
PUSH_TO_HUB = False  #@param {type:"boolean"}
REPO_ID = ""  #@param {type:"string"}
PRIVATE = True  #@param {type:"boolean"}

# %%
from IPython.display import Markdown, display

from dreambooth_nb.results import hub
from dreambooth_nb.notebook import platform, project as projects, views
from dreambooth_nb.results.export import export, file_name, how_to_use, snapshot_in_project

views.show_errors_as_messages()  # our errors show as one message, not a stack trace
platform.use_hf_token()  # a token in HF_TOKEN or a Colab/Kaggle secret; never shown
project = projects.open_project(PROJECT_DIR, create=False)
snapshot = snapshot_in_project(project, RUN, step=STEP)

# %% [markdown]
# ## The single file
# Streamed tensor by tensor, so it needs almost no memory; SD 2.x models that predict v also get the `.yaml`
# AUTOMATIC1111 needs beside the file. The file's metadata names the base model, the trigger prompt, the
# steps and the learning rate (never a token or your folders).

# %%
exported = export(snapshot, project.exports_dir / file_name(snapshot, FILE_NAME), half=HALF, merged=MERGED)

# %% [markdown]
# ## The Hub (optional)
# Uploads this snapshot as a complete diffusers model, the file above, a model card and your sample images;
# never training states, cached latents or your photos.

# %%
if PUSH_TO_HUB:
    print(f"Pushed: {hub.push_to_hub(snapshot, REPO_ID, private=PRIVATE, single_file=exported)}")
else:
    print("Not pushed to the Hub (PUSH_TO_HUB is off).")

# %%
display(Markdown(how_to_use(exported, repo_id=REPO_ID if PUSH_TO_HUB else None)))
