"""Picture augmentation for the rollouts' inputs: a picture the policy reads (a caption's subject, an edit's source)
is shifted in colour and given pixel noise, so what it learns holds beyond the shapes world's exact renderer."""

from __future__ import annotations

import numpy as np
from PIL import Image

COLOUR_SHIFT = 12  # largest per-channel shift, in 8-bit levels
NOISE_SIGMA = 4.0  # standard deviation of the per-pixel noise, in 8-bit levels


def augmented(picture: Image.Image, seed: int) -> Image.Image:
    """``picture`` with one random shift per channel and Gaussian pixel noise, both drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(picture.convert("RGB"), dtype=np.float32)
    pixels = pixels + rng.integers(-COLOUR_SHIFT, COLOUR_SHIFT + 1, size=3) + rng.normal(0, NOISE_SIGMA, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
