"""Training runs on tiny models with Stable Diffusion's topology, for the export, single-file and Hub tests.

Single-file checkpoints name weights by SD's block layout, so these tests need `build_sd_topology_pipeline`'s
models (64 px images), not the 2-block `tiny_model`. A run of 2 steps saves a partial snapshot at step 1
(the trained parts only) and a complete one at step 2, in a project-like layout: <root>/project/runs/<name>.
"""

from pathlib import Path

from photos import write_photos

PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of a dog"


def train_run(root: Path, model: Path, *, name: str = "lr1e-4", **overrides) -> Path:
    from dreambooth_nb import preset, train

    values = dict(pretrained_model_name_or_path=str(model), instance_data_dir=str(write_photos(root / "photos")),
                  instance_prompt=PROMPT, class_prompt=CLASS_PROMPT, resolution=64, max_train_steps=2,
                  snapshot_steps=[1], learning_rate=1e-4, checkpointing_steps=1000,
                  output_dir=str(root / "project" / "runs" / name))
    train(preset(**{**values, **overrides}), progress_bar=False)
    return Path(values["output_dir"])
