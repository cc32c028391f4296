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
# # 5 · Sweep: learning rate × steps
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dreambooth-nb/dreambooth-nb/blob/main/notebooks/05_sweep.ipynb)
#
# The study's core experiment in one cell: train the same subject at several learning rates, keep a
# snapshot at several steps, and see them side by side: the base model's column, then each rate's steps
# (rows: prompts × seeds). The snapshots are measured and each rate's suggested snapshot is framed (★), with
# the metrics plotted against steps, one line per rate. Each run takes as long as a normal training run, so
# start small (two rates). Finished runs are skipped and interrupted ones resume when you run the notebook
# again.

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
# The study compared 5e-6 with 2e-6 (objects) and 1e-6 with 2e-6 (faces), at 400, 800 and 1200 steps:
# high rates overfit within a few hundred steps. Everything else comes from notebook 1's settings.
# `RUN_NOW` starts the sweep without the button (automatic when the notebook runs headless).

# %% tags=["parameters"]
#@title Settings { display-mode: "form" }
PROJECT_DIR = ""  #@param {type:"string"}
LEARNING_RATES = "5e-6, 2e-6"  #@param {type:"string"}
SAVE_AT = "400, 800, 1200"  #@param {type:"string"}
SCHEDULER = "ddim"  #@param ["ddim", "pndm", "dpm", "euler"]
INFERENCE_STEPS = 50  #@param {type:"slider", min:10, max:150, step:5}
#@markdown Guidance, 0: the model's own (7.5 for SD and SDXL, 7 for SD 3.5, FLUX.1-dev's distilled guidance 3.5; the embedded toy model prefers about 4). Scheduler: a flow model (SD 3.5, FLUX.1) always uses its own Euler sampler.
GUIDANCE = 0.0  #@param {type:"slider", min:0, max:15, step:0.5}
CONTEXTS = "in the snow; as an oil painting"  #@param {type:"string"}
RUN_NOW = False  #@param {type:"boolean"}

# %%
from dreambooth_nb.environment import is_headless
from dreambooth_nb.notebook import platform, project as projects, ui, views
from dreambooth_nb.results.evaluate import EvalSpec

views.show_errors_as_messages()  # our errors show as one message, not a stack trace
platform.use_hf_token()  # a token in HF_TOKEN or a Colab/Kaggle secret, for gated models; never shown
project = projects.open_project(PROJECT_DIR, create=False)
config = project.load_config()
spec = EvalSpec.for_config(config, contexts=[c.strip() for c in CONTEXTS.split(";") if c.strip()],
                           scheduler=SCHEDULER, num_inference_steps=INFERENCE_STEPS, guidance_scale=GUIDANCE)

# %% [markdown]
# ## Run the sweep
# Runs go to `PROJECT_DIR/sweeps/sweep/lr2e-6`, … (named as notebook 3's runs are), each sweep's grid to its own
# file there (`sweep-grid-lr5e-6_2e-6-steps400_800_1200.png`); notebook 4 can compare the runs with your other
# runs too. **Stop** (or the kernel's ■) ends the sweep at the next step or image; Run sweep again goes on.

# %%
panel = ui.SweepPanel(config, lrs=LEARNING_RATES, save_at=SAVE_AT, spec=spec,
                      sweep_dir_for=project.sweep_dir_for).show()
if RUN_NOW or is_headless():
    panel.start()  # exactly what the Run sweep button does (headless: here, the cell waits for it)
