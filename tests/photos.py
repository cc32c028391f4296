"""Photos for tests: random RGB noise patterns written as PNG files."""

import numpy as np
from PIL import Image


def write_photos(folder, n=4, *, size=(40, 48), seed=0):
    """`n` random RGB photos, each a different size-jittered noise pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        array = (rng.rand(size[0] + i, size[1], 3) * 255).astype("uint8")
        Image.fromarray(array).save(folder / f"photo-{i}.png")
    return folder
