"""dreambooth-nb: teach Stable Diffusion a new subject with Dreambooth on a 16 GB GPU.

    from dreambooth_nb import TrainConfig, preset, train
    config = preset("object", "16gb", instance_data_dir="photos", instance_prompt="a photo of sks mug")
    final = train(config)
"""

from .config import PRESETS, TrainConfig, preset
from .errors import ConfigError, DataError, DreamboothError, TrainingStopped
from .train import train
from .priors import generate_class_images
from .evaluate import EvalSpec
from .compare import compare
from .sweep import sweep

__all__ = ["TrainConfig", "preset", "PRESETS", "train", "DreamboothError", "ConfigError", "DataError",
           "TrainingStopped", "generate_class_images", "EvalSpec", "compare", "sweep"]
