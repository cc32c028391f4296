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
# # 3 · Training
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dreambooth-nb/dreambooth-nb/blob/main/notebooks/03_training.ipynb)
#
# Set the knobs in the panel (prefilled from notebook 1's preset) and press **Train**. The loss plot and
# the progress bar update while it runs; snapshots are saved at the steps you choose, and sample images of
# the final one appear at the end. If Colab disconnects, run the notebook again: training **resumes** from
# the last saved state (it says "Resuming from ...") and a finished run is not trained twice.

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
# The study's advice. **Objects:** learning rate ~2e-6, ~400 steps, batch 4. **Faces:** 1e-6 or 2e-6,
# 800–1200 steps, batch 2, with prior preservation. Too high a rate or too many steps *overfit*: samples
# turn noisy and look like copies of your photos. Training the text encoder gives better results but needs
# about 1 GB more; EMA made no clear difference. 0 / empty keep notebook 1's values.
#
# The panel's "Fit the memory savers to this GPU" starts as notebook 1's `FIT_TO_GPU` saved it: gradient
# checkpointing, batch or accumulation and 8-bit Adam become the fastest that fit the GPU of this runtime (the
# same effective batch, the same training), re-chosen when a run resumes on another GPU and never as large as
# what ran out of memory there before; set a saver by hand to override it.
#
# On a runtime with several GPUs (Kaggle's 2×T4) the panel shows **GPUs**: training runs data-parallel on
# that many (all by default; batch size is per GPU) and the panel shows the effective batch.
#
# `TRAIN_NOW` starts training when the cell runs, without the button. It is automatic when the notebook
# runs headless (papermill, nbclient, CI), where nobody can click.
#
# **Stopping:** the panel's **Stop** button (or the kernel's ■ interrupt) ends training at the next step,
# with one line saying which state is kept; **Train** again resumes from it, as after a Colab disconnect.

# %% tags=["parameters"]
#@title Settings { display-mode: "form" }
PROJECT_DIR = ""  #@param {type:"string"}
LEARNING_RATE = 0.0  #@param {type:"number"}
MAX_STEPS = 0  #@param {type:"integer"}
#@markdown Steps with an extra snapshot to compare later, e.g. `200, 400` (empty: halfway, every quarter with early stop; the last step is always saved).
SNAPSHOT_STEPS = ""  #@param {type:"string"}
#@markdown Inference steps of the sample images shown after training.
SAMPLE_INFERENCE_STEPS = 50  #@param {type:"slider", min:10, max:150, step:5}
#@markdown Save the full training state every N steps, so a disconnect loses at most N steps (0: automatic, every 100 steps where the disk allows it).
CHECKPOINTING_STEPS = 0  #@param {type:"integer"}
TRAIN_NOW = False  #@param {type:"boolean"}

# %%
from dreambooth_nb.environment import is_headless
from dreambooth_nb.notebook import platform, project as projects, settings, ui, views

views.show_errors_as_messages()  # our errors show as one message, not a stack trace
platform.use_hf_token()  # a token in HF_TOKEN or a Colab/Kaggle secret, for gated models; never shown
project = projects.open_project(PROJECT_DIR, create=False)
config = settings.apply_parameters(project.load_config(), learning_rate=LEARNING_RATE, max_train_steps=MAX_STEPS,
                                   snapshot_steps=SNAPSHOT_STEPS, checkpointing_steps=CHECKPOINTING_STEPS)

# %% [markdown]
# ## Train
# Each setting gets its own run folder under `PROJECT_DIR/runs` (named after the learning rate), so trying
# another learning rate never overwrites a finished run, and notebook 4 can put them side by side.
# Memory: batch size × gradient accumulation is the effective batch; accumulation costs time, not memory.
# Under the settings, the fit says which savers it turned on or off and why; rerunning after a disconnect
# (on this GPU or another) resumes, re-fitted within what may change on resume, and the log says so.

# %%
panel = ui.TrainingPanel(config, run_dir_for=project.run_dir_for, sample_steps=SAMPLE_INFERENCE_STEPS).show()
if TRAIN_NOW or is_headless():
    panel.start()  # exactly what the Train button does (headless: here, the cell waits for it)
