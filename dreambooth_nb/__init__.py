"""dreambooth-nb: teach Stable Diffusion a new subject with Dreambooth on a 16 GB GPU.

    from dreambooth_nb import TrainConfig, preset, train
    config = preset("object", "16gb", instance_data_dir="photos", instance_prompt="a photo of sks mug")
    final = train(config)
"""

from dreambooth_nb import quiet

quiet.install()  # before torch, diffusers and transformers load: see quiet.HARMLESS for what and why

from dreambooth_nb.config import PRESETS, Concept, TrainConfig, preset  # noqa: E402
from dreambooth_nb.errors import ConfigError, DataError, DreamboothError, TrainingStopped  # noqa: E402
from dreambooth_nb.results.early_stop import train  # noqa: E402  (training.train, watched for stop_when)
from dreambooth_nb.training.priors import generate_class_images  # noqa: E402
from dreambooth_nb.results.evaluate import EvalSpec  # noqa: E402
from dreambooth_nb.results.compare import compare  # noqa: E402
from dreambooth_nb.results.sweep import sweep  # noqa: E402
from dreambooth_nb.results.export import export  # noqa: E402
from dreambooth_nb.results.hub import push_to_hub  # noqa: E402
from dreambooth_nb.planning.planner import MemoryPlan, plan  # noqa: E402
from dreambooth_nb.planning.fitting import FitReport, fit, fit_report  # noqa: E402

__all__ = ["TrainConfig", "Concept", "preset", "PRESETS", "train", "DreamboothError", "ConfigError", "DataError",
           "TrainingStopped", "generate_class_images", "EvalSpec", "compare", "sweep", "plan", "MemoryPlan",
           "fit", "fit_report", "FitReport", "export", "push_to_hub"]
