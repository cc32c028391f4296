"""`with_subject`: a one-subject config with that subject's settings changed (a test's shorthand for
replacing the first of `concepts`, which is all a one-subject run has)."""
from __future__ import annotations

import dataclasses

from dreambooth_nb import TrainConfig


def with_subject(config: TrainConfig, **changes) -> TrainConfig:
    (subject,) = config.concepts
    return config.replace(concepts=[dataclasses.replace(subject, **changes)])
