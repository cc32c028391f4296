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
# # 2 · Class images for prior preservation
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dreambooth-nb/dreambooth-nb/blob/main/notebooks/02_class_images.ipynb)
#
# With prior preservation the model trains on your photos *and* on images of the class ("a photo of a
# dog") that the base model makes itself, so it keeps knowing what an ordinary dog looks like and does not
# turn every dog into yours. The study found it necessary for faces; objects usually do without. The images
# are made once (about 7 s each on a T4) and kept in the project folder; a rerun makes only the missing ones.
# Have a regularization set already (hundreds of class photos)? Put it in the class folder first: your
# images count, and only the shortfall up to the number asked for is generated. With
# `CLASS_IMAGES_FROM_CAPTIONS` in notebook 1, each image is drawn from one of your photos' captions with the
# class prompt for `[trigger]` ("a photo of a dog on a beach"), so the class images show the same scenes; each
# keeps its prompt beside it (`class-00003.txt`) and trains with it.

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
#@markdown The project folder of notebook 1 (empty: the same default as there).
PROJECT_DIR = ""  #@param {type:"string"}

# %%
from dreambooth_nb import generate_class_images
from dreambooth_nb.dataset import classes, images
from dreambooth_nb.notebook import platform, project as projects, settings, views

views.show_errors_as_messages()  # our errors show as one message, not a stack trace
platform.use_hf_token()  # a token in HF_TOKEN or a Colab/Kaggle secret, for gated models; never shown
project = projects.open_project(PROJECT_DIR, create=False)
config = project.load_config()
print(settings.config_summary(config))

# %% [markdown]
# ## What the class folder already holds
# Images you put there yourself (a regularization set of "person" or "dog" photos, say) count: training
# uses yours first and only the shortfall is generated. Unusable files are named and skipped.

# %%
if config.with_prior_preservation:
    for subject in config.concepts:  # (several with CONCEPTS)
        found = classes.class_images(subject, resolution=config.resolution)
        print(found.summary())
        if found.yours:
            print("Yours (up to 16):")
            views.show_image(images.thumbnail_grid(found.yours[:16], size=96))

# %% [markdown]
# ## Generate the missing class images
# Image *i* always comes from the same seed, so an interrupted run continues with the very same images.

# %%
if config.with_prior_preservation:
    generate_class_images(config)  # every subject's, one pipeline load
    for subject in config.concepts:
        files = classes.class_images(subject, resolution=config.resolution).selected
        print(f"{len(files)} class images of '{subject.class_prompt}' for training. A sample:")
        views.show_image(images.thumbnail_grid(files[:16], size=128))
else:
    print("Prior preservation is off in this project's settings: no class images are needed. "
          "(Turn it on in notebook 1 with PRIOR_PRESERVATION = 'on', or in the training panel of notebook 3.)")
