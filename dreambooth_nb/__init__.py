"""dreambooth-nb: teach Stable Diffusion a new subject with Dreambooth on a 16 GB GPU.

    from dreambooth_nb import TrainConfig, preset, train
    config = preset("object", "16gb", instance_data_dir="photos", instance_prompt="a photo of sks mug")
    final = train(config)
"""

from . import quiet

quiet.install()  # before torch, diffusers and transformers load: see quiet.HARMLESS for what and why

from .config import PRESETS, Concept, TrainConfig, preset  # noqa: E402
from .errors import ConfigError, DataError, DreamboothError, TrainingStopped  # noqa: E402
from .train import train  # noqa: E402
from .priors import generate_class_images  # noqa: E402
from .evaluate import EvalSpec  # noqa: E402
from .compare import compare  # noqa: E402
from .sweep import sweep  # noqa: E402
from .export import export  # noqa: E402
from .hub import push_to_hub  # noqa: E402
from .planner import MemoryPlan, plan  # noqa: E402
from .fitting import FitReport, fit, fit_report  # noqa: E402

__all__ = ["TrainConfig", "Concept", "preset", "PRESETS", "train", "DreamboothError", "ConfigError", "DataError",
           "TrainingStopped", "generate_class_images", "EvalSpec", "compare", "sweep", "plan", "MemoryPlan",
           "fit", "fit_report", "FitReport", "export", "push_to_hub"]
