import json

import pytest

from dreambooth_nb.storage import FORMAT
import torch

from dreambooth_nb import ConfigError, TrainConfig, preset
from dreambooth_nb.config import PRESETS


def test_presets_follow_the_study():
    obj = preset("object")
    assert (obj.learning_rate, obj.max_train_steps, obj.train_batch_size, obj.with_prior_preservation) == \
        (2e-6, 400, 4, False)
    face = preset("face")
    assert (face.learning_rate, face.train_batch_size, face.with_prior_preservation) == (1e-6, 2, True)
    assert 800 <= face.max_train_steps <= 1200


def test_16gb_profile_combines_and_keeps_the_effective_batch():
    config = preset("object", "16gb")
    assert config.use_8bit_adam and config.gradient_checkpointing and config.cache_latents
    assert config.attention_backend == "sdpa"
    assert config.train_batch_size * config.gradient_accumulation_steps == 4
    assert config.learning_rate == 2e-6  # the object preset's values survive the memory profile


def test_preset_overrides_and_unknown_names():
    assert preset("face", max_train_steps=800).max_train_steps == 800
    with pytest.raises(ConfigError, match="preset 'cat'"):
        preset("cat")
    with pytest.raises(ConfigError, match="unknown setting"):
        preset("object", learnin_rate=1e-6)


def test_json_round_trip(tmp_path):
    config = preset("face", instance_data_dir="x", class_prompt="a photo of a person", snapshot_steps=[400, 800])
    path = tmp_path / "config.json"
    config.to_json(path)
    assert TrainConfig.from_json(path) == config
    assert json.loads(path.read_text())["snapshot_steps"] == [400, 800]


@pytest.mark.parametrize("key,value,message", [
    ("learning_rate", "2e-6", "learning_rate must be float"),
    ("max_train_steps", 4.5, "max_train_steps must be int"),
    ("train_text_encoder", "yes", "train_text_encoder must be bool"),
    ("snapshot_steps", [1, "2"], "snapshot_steps must be a list"),
    ("lerning_rate", 1e-6, "unknown setting.*lerning_rate"),
    ("concepts", [{"instance_data_dir": "x", "instance_prompt": None}], "instance_prompt must not be null"),
    ("concepts", [{"instance_data_dir": "x"}], "a subject needs instance_data_dir and instance_prompt"),
    ("instance_prompt", "a photo of sks dog", "instance_prompt describe a subject.*concepts=.*preset"),
])
def test_from_json_rejects_bad_keys_and_types(tmp_path, key, value, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"format": FORMAT, key: value}))
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_json(path)


def test_from_json_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="no config file"):
        TrainConfig.from_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.from_json(tmp_path / "bad.json")


def test_ints_are_accepted_where_floats_are_expected():
    assert TrainConfig.from_dict({"prior_loss_weight": 1}).prior_loss_weight == 1.0


@pytest.mark.parametrize("changes,field", [
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(learning_rate=-1e-6), "learning_rate"),
    (dict(learning_rate=2e-3), "learning_rate"),
    (dict(text_encoder_learning_rate=5e-3), "text_encoder_learning_rate"),
    (dict(max_train_steps=0), "max_train_steps"),
    (dict(train_batch_size=0), "train_batch_size"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    (dict(resolution=0), "resolution"),
    (dict(resolution=500), "resolution"),
    (dict(checkpointing_steps=0), "checkpointing_steps"),
    (dict(lr_warmup_steps=-1), "lr_warmup_steps"),
    (dict(lr_scheduler="step"), "lr_scheduler"),
    (dict(mixed_precision="fp8"), "mixed_precision"),
    (dict(attention_backend="flash"), "attention_backend"),
    (dict(stop_text_encoder_training=-5), "stop_text_encoder_training"),
    (dict(cache_latents=True, center_crop=False), "cache_latents"),
    (dict(prior_loss_weight=-1.0), "prior_loss_weight"),
    (dict(snr_gamma=0.0), "snr_gamma"),
    (dict(offset_noise=-0.1), "offset_noise"),
    (dict(ema_decay=1.5), "ema_decay"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(checkpoints_total_limit=0), "checkpoints_total_limit"),
    (dict(instance_prompt="  "), "instance_prompt"),
    (dict(snapshot_steps=[5000]), "snapshot_steps"),
    (dict(with_prior_preservation=True, class_prompt=None), "class_prompt"),
    (dict(with_prior_preservation=True, class_prompt="a dog", class_data_dir=None), "class_data_dir"),
    (dict(resume_from_checkpoint="/no/such/state"), "resume_from_checkpoint"),
    (dict(instance_data_dir=""), "instance_data_dir"),
    (dict(instance_data_dir="/no/such/folder"), "instance_data_dir"),
    (dict(pretrained_model_name_or_path=""), "pretrained_model_name_or_path"),
    (dict(pretrained_model_name_or_path="/tmp/not-a-model"), "pretrained_model_name_or_path"),
])
def test_every_validation_error_names_the_field(make_config, changes, field):
    config = make_config(**changes)
    with pytest.raises(ConfigError) as err:
        config.validate()
    assert str(err.value).startswith(field + ":")
    assert len(str(err.value)) > len(field) + 20  # says what to do, not just what is wrong


def test_precision_is_decided_where_training_runs(make_config):
    """A config written on a CPU runtime ("auto") trains in fp16 on a T4; "fp16" on CPU is refused by train()
    before anything loads, naming the setting."""
    from dreambooth_nb import train
    from dreambooth_nb.model.loading import resolve_precision

    assert preset("object", "16gb").mixed_precision == "auto"
    assert resolve_precision("auto", torch.device("cpu")) == "no"
    with pytest.raises(ConfigError, match="^mixed_precision: 'fp16' needs a CUDA GPU"):
        train(make_config(mixed_precision="fp16"))


def test_a_valid_config_passes(make_config):
    make_config().validate()
    make_config(pretrained_model_name_or_path="some-owner/some-model").validate()  # Hub ids are not checked offline


def test_presets_are_known():
    assert set(PRESETS) == {"object", "face", "lora", "sdxl", "sd3", "flux", "16gb"}
