"""Stop at the suggested snapshot (`stop_when="suggested"`), on the embedded toy model and its own judge.

The toy runs: batch 4, a snapshot every 25 steps, each rendered for the instance prompt, the class prompt and
the toy world's one context ("… on a black background") with 8 seeds, 10 DDIM steps. At a high learning rate
(3e-4) the subject is learned and then lost within 150 steps (the study's "overfits fast"); at a low one (1e-5)
subject fidelity is still rising at step 100.
"""

from __future__ import annotations

import pytest

from dreambooth_nb import ConfigError, preset, storage, train
from dreambooth_nb.results import early_stop, quality
from dreambooth_nb.results.evaluate import EvalSpec
from dreambooth_nb.results.export import choose_snapshot
from dreambooth_nb.toy import world as toyworld
from dreambooth_nb.toy.world import TOY_MODEL_DIR
from dreambooth_nb.training.train import STOPPED_FILE, stopped_early

SPEC = EvalSpec(prompts=[toyworld.SUBJECT_INSTANCE_PROMPT, toyworld.SUBJECT_CLASS_PROMPT,
                         toyworld.SUBJECT_CONTEXT_PROMPT], seeds=list(range(8)), num_inference_steps=10,
                guidance_scale=4.0)


def toy_run(tmp_path, *, learning_rate: float, steps: int, **overrides):
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    for i, image in enumerate(toyworld.subject_images()):
        image.save(photos / f"subject-{i}.png")
    return preset(pretrained_model_name_or_path=str(TOY_MODEL_DIR), instance_data_dir=str(photos),
                  instance_prompt=toyworld.SUBJECT_INSTANCE_PROMPT, class_prompt=toyworld.SUBJECT_CLASS_PROMPT,
                  resolution=32, learning_rate=learning_rate, train_batch_size=4, max_train_steps=steps,
                  cache_latents=True, checkpointing_steps=25, snapshot_steps=list(range(25, steps, 25)),
                  output_dir=str(tmp_path / "runs" / "run"), stop_when="suggested", **overrides)


def test_an_overfitting_run_stops_and_keeps_a_snapshot_as_good_as_the_best(tmp_path, capsys):
    """LR 3e-4 stops before its last step and keeps the suggested snapshot; the same run then trained to the end
    (stop_when="end" resumes it) has no snapshot more than 0.05 better in the toy judge's subject fidelity."""
    config = toy_run(tmp_path, learning_rate=3e-4, steps=150)
    kept = train(config, spec=SPEC, progress_bar=False)
    stopped = stopped_early(config.output_dir)
    assert stopped["step"] < config.max_train_steps and kept == storage.snapshot_path(config.output_dir, stopped["kept"])
    assert f"stopped, kept {stopped['kept']}" in stopped["why"] and "subject learned at step" in stopped["why"]
    assert f"Stopped at step {stopped['step']}: subject learned" in capsys.readouterr().out
    assert choose_snapshot(config.output_dir) == kept  # export takes it
    # Asked again, it stays stopped: nothing trains.
    assert train(config, spec=SPEC, progress_bar=False) == kept
    assert "Training stopped early at step" in capsys.readouterr().out
    # The same run to its end, and every snapshot measured alike (the renders are cached).
    train(config.replace(stop_when="end"), progress_bar=False)
    assert "Resuming from state-" in capsys.readouterr().out
    watcher = early_stop.Watcher(config.replace(stop_patience=100), spec=SPEC)
    for step, snapshot in storage.list_snapshots(config.output_dir):
        watcher(step, snapshot)
    fidelity = {step: metrics["subject_fidelity"] for step, metrics in watcher.steps.items()}
    assert max(fidelity) == config.max_train_steps  # (measured to the end)
    assert fidelity[stopped["kept"]] >= max(fidelity.values()) - 0.05


def test_a_run_still_learning_runs_to_its_end(tmp_path):
    config = toy_run(tmp_path, learning_rate=1e-5, steps=100)
    final = train(config, spec=SPEC, progress_bar=False)
    assert final == storage.snapshot_path(config.output_dir, 100) and stopped_early(config.output_dir) is None
    assert not (tmp_path / "runs" / "run" / STOPPED_FILE).exists()
    measured = quality.suggested_step(config.output_dir)[0]  # the watcher's latest suggestion: the newest snapshot
    assert measured == 75


def test_stop_settings_are_checked_and_one_process_is_asked_for(make_config):
    with pytest.raises(ConfigError, match="stop_when: 'early' is unknown"):
        make_config(stop_when="early").validate()
    with pytest.raises(ConfigError, match="stop_patience: must be 1 or more"):
        make_config(stop_when="suggested", stop_patience=0).validate()
    with pytest.raises(ConfigError, match="stop_when: stopping at the suggested snapshot .* one GPU's for now"):
        train(make_config(stop_when="suggested"), num_processes=2)
