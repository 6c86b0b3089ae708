"""Find the object in a (generated) shapes-world image and read its attributes back.

GenEval-style and deliberately simple, so that a wrong picture cannot pass: colour by the nearest
palette entry to the object's mean colour, position by the third of the picture its centroid is in, size by the box's
longer side, shape by how much of its bounding box the object fills (square 1, circle pi/4, triangle 1/2).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from dimoo_npu.shapes.world import PALETTE, REGION_BOUNDS, SIZES, position_name

# A pixel belongs to an object when it is this far (summed over RGB) from white.
_INK_THRESHOLD = 120
# Fill ratio boundaries: triangle (0.5) | circle (0.785) | square (1.0).
_TRIANGLE_CIRCLE = 0.64
_CIRCLE_SQUARE = 0.9
_MIN_PIXELS = 12  # fewer ink pixels than this means no object was drawn
_WHOLE_ASPECT = 1.3  # an object cut in half has a box twice as long as wide


@dataclass(frozen=True)
class Detection:
    """Attributes of one detected object (names from the world's tables)."""

    shape: str
    colour: str
    size: str
    position: str
    fill_ratio: float
    pixels: int
    box: tuple[int, int] = (0, 0)  # (height, width) in pixels

    @property
    def whole(self) -> bool:
        """A box about as high as wide, as every object of the world is: half an object is not whole."""
        return max(self.box) <= _WHOLE_ASPECT * min(self.box)


def ink_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels clearly not background."""
    distance = (255 - image.astype(np.int32)).sum(axis=-1)  # (H, W)
    return distance > _INK_THRESHOLD


def ink_mask_strong(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels far from white, used for the colour estimate."""
    distance = (255 - image.astype(np.int32)).sum(axis=-1)  # (H, W)
    return distance > 2 * _INK_THRESHOLD


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(PALETTE)
    table = np.array([PALETTE[n] for n in names], dtype=np.float64)  # (C, 3)
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def _third(coordinate: float) -> int:
    """0, 1 or 2: which third of the picture (the world's region bounds) a pixel coordinate falls in."""
    return bisect.bisect_right(REGION_BOUNDS, coordinate)


def _shape_from_fill(fill: float) -> str:
    if fill >= _CIRCLE_SQUARE:
        return "square"
    return "circle" if fill >= _TRIANGLE_CIRCLE else "triangle"


def describe_mask(image: np.ndarray, mask: np.ndarray) -> Detection | None:
    """Attributes of the object covered by ``mask`` (None when it is too small to be one)."""
    ys, xs = np.nonzero(mask)
    if len(ys) < _MIN_PIXELS:
        return None
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / float(height * width)
    # Mean over the object's core, away from anti-aliased edges, which blend into white.
    core = mask & ink_mask_strong(image)
    colour_pixels = image[core] if core.any() else image[mask]
    size_threshold = (SIZES["small"] + SIZES["large"]) / 2
    return Detection(
        shape=_shape_from_fill(fill),
        colour=nearest_colour(colour_pixels.astype(np.float64).mean(axis=0)),
        size="large" if max(height, width) >= size_threshold else "small",
        position=position_name(_third(float(ys.mean())), _third(float(xs.mean()))),
        fill_ratio=fill,
        pixels=int(len(ys)),
        box=(int(height), int(width)),
    )


def detect_objects(image: np.ndarray) -> list[Detection]:
    """Every object, as connected components of the ink mask, largest first."""
    mask = ink_mask(image)
    labels, count = _connected_components(mask)
    found = [describe_mask(image, labels == label) for label in range(1, count + 1)]
    return sorted((d for d in found if d is not None), key=lambda d: -d.pixels)


def detect_object(image: np.ndarray) -> Detection | None:
    """The largest object of ``image`` (uint8 (H, W, 3)), or None when the image is blank."""
    found = detect_objects(image)
    return found[0] if found else None


def _connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected labelling by flood fill (images are 128 x 128; no SciPy dependency)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    count = 0
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        count += 1
        labels[y0, x0] = count
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = count
                    stack.append((ny, nx))
    return labels, count
