"""How training cuts a photo: the shorter side scaled to the resolution, then a square crop.

One place for this geometry, because three parts of the package must agree on it exactly: training
(`training.data` crops the pixels and, with `masked_loss`, the masks), the photo audit (`dataset.audit`: is the
subject cut off?) and the notebook's thumbnails (the square training keeps, drawn on the photo).
"""

from __future__ import annotations


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) after scaling so that the shorter side is `resolution`."""
    w, h = size
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def center_crop_origin(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(top, left) of the centred square crop of an image of `size` (width, height) at `resolution`."""
    w, h = resized_size(size, resolution)
    return (h - resolution) // 2, (w - resolution) // 2


def centre_crop_box(size: tuple[int, int], resolution: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in the pixels of an image of `size` (width, height): the part of it that the
    centre crop keeps (the square above, mapped back onto the unscaled image), to draw or to measure against."""
    width, height = resized_size(size, resolution)
    top, left = center_crop_origin(size, resolution)
    sx, sy = width / size[0], height / size[1]
    return (round(left / sx), round(top / sy), round((left + resolution) / sx), round((top + resolution) / sy))
