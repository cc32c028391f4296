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
# # 4 · Compare snapshots and runs
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dreambooth-nb/dreambooth-nb/blob/main/notebooks/04_comparison.ipynb)
#
# Every snapshot of every run, rendered with the same prompts and seeds, in one labelled grid: each run's
# steps side by side (grouped by run, after the **base model**, step 0), a row per prompt and seed. Look for
# the step where the subject is right *and* the new contexts ("in the snow") still work and the class prompt
# still draws what the base model drew; after it, images get noisy or copy your photos. That is
# overfitting: use the earlier snapshot or a lower learning rate. Noisy images also improve with the DDIM
# scheduler or ~100 inference steps (the study).
#
# The renders are also measured — subject fidelity, prompt fidelity, prior preservation, diversity (the
# DreamBooth paper's metrics, with DINOv2 and CLIP, downloaded once) — and each run's **suggested snapshot**
# is framed (★) in the grid; the rule and its inputs are printed under it. Notebook 6 exports the suggested
# snapshot unless you name a step.

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

# %% tags=["parameters"]
#@title Settings { display-mode: "form" }
PROJECT_DIR = ""  #@param {type:"string"}
SCHEDULER = "ddim"  #@param ["ddim", "pndm", "dpm", "euler"]
INFERENCE_STEPS = 50  #@param {type:"slider", min:10, max:150, step:5}
#@markdown Guidance, 0: the model's own (7.5 for SD and SDXL, 7 for SD 3.5, FLUX.1-dev's distilled guidance 3.5; the embedded toy model prefers about 4). Scheduler: a flow model (SD 3.5, FLUX.1) always uses its own Euler sampler.
GUIDANCE = 0.0  #@param {type:"slider", min:0, max:15, step:0.5}
#@markdown New settings for the subject, added after the instance prompt; separate them with `;`.
CONTEXTS = "in the snow; as an oil painting"  #@param {type:"string"}
SEEDS = "0, 1"  #@param {type:"string"}
#@markdown Runs to compare (folder names under `PROJECT_DIR/runs`, separated by `,`; empty: all of them).
RUNS = ""  #@param {type:"string"}
COLUMNS = "step"  #@param ["step", "prompt"]
#@markdown Also score each run the DreamBooth paper's way (DreamBench: 25 prompts × 4 images, DINO ViT-S/16 and CLIP ViT-B/32), to put beside its Table 1.
DREAMBENCH = False  #@param {type:"boolean"}

# %%
from dreambooth_nb.errors import ConfigError
from dreambooth_nb.notebook import platform, project as projects, settings, ui, views
from dreambooth_nb.results import dreambench
from dreambooth_nb.results.evaluate import EvalSpec

views.show_errors_as_messages()  # our errors show as one message, not a stack trace
platform.use_hf_token()  # a token in HF_TOKEN or a Colab/Kaggle secret, for gated models; never shown
project = projects.open_project(PROJECT_DIR, create=False)
config = project.load_config()
project.select_runs(RUNS)  # (a misspelt name stops here, with the runs there are)
spec = EvalSpec.for_config(config, contexts=[c.strip() for c in CONTEXTS.split(";") if c.strip()],
                           seeds=settings.parse_int_list(SEEDS, name="SEEDS", allow_zero=True), scheduler=SCHEDULER,
                           num_inference_steps=INFERENCE_STEPS, guidance_scale=GUIDANCE)

# %% [markdown]
# ## The grid, the metrics and the suggested snapshot
# Drawn at once with the settings above and saved as PNG (with a JSON file listing every cell, the metrics
# and the suggestion) in `PROJECT_DIR/comparisons`, with the metrics plotted against steps (one line per
# run). Change the scheduler, the steps or the guidance in the panel and press **Draw** to redraw: runs trained
# since are drawn too. **Stop** (or the kernel's ■) ends a drawing at the next image; the images rendered so
# far are kept, so Draw goes on from there.

# %%
panel = ui.ComparePanel(lambda: project.select_runs(RUNS), spec, out_dir=project.comparisons_dir, columns=COLUMNS,
                        title=config.subjects_label, samplers=settings.sampler_choices(config)).show()
panel.start()  # the first grid, as Draw makes it (headless: here, the cell waits for it)

# %% [markdown]
# ## DreamBench numbers (optional)
# With `DREAMBENCH = True`: each run's suggested snapshot (else its last) rendered with DreamBench's 25
# prompts for its class (outfits for a dog or cat, settings for an object) × 4 seeds — 100 images per subject,
# cached like the grid's — and scored as the DreamBooth paper does (DINO ViT-S/16 and CLIP ViT-B/32, ≈700 MB,
# downloaded once): DINO and CLIP-I against your photos, CLIP-T against each prompt. The table puts them
# beside the paper's (Stable Diffusion: DINO 0.668, CLIP-I 0.803, CLIP-T 0.305). Run it once the grid says Done.

# %%
if DREAMBENCH:
    if panel.runner.busy:
        raise ConfigError("DREAMBENCH: the grid above is still drawing; run this cell again when it says Done "
                          "(one thing renders on the GPU at a time).")
    for folder in project.select_runs(RUNS).values():
        print(dreambench.measure(folder, num_inference_steps=INFERENCE_STEPS, guidance_scale=GUIDANCE).table, "\n")
