"""Input images and masks: loading, aspect-ratio buckets, centre crops, and masks on the latent grid.

Buckets are the public code's crop-size lists (sizes of ``budget/32`` squared 32-pixel patches, aspect
at most 4:1); an image goes to the bucket whose aspect is closest to its own, is scaled to cover it
and centre-cropped (the public code picks a random offset; the spec asks for the centre).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from dimoo_npu.utils.errors import InputError
from dimoo_npu.utils.validate import input_file

PATCH = 32  # bucket granularity in pixels
PIXELS_PER_CELL = 16  # VQ downsampling: one image token per 16 x 16 pixels


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Open an image file fully (so a truncated file fails here, not later), converted to ``mode``."""
    file = input_file(path, "image")
    try:
        with Image.open(file) as image:
            image.load()
            return to_8bit(image).convert(mode)
    except Image.DecompressionBombError:
        raise InputError(
            f"image {file} has more pixels than Pillow reads safely (a possible decompression bomb): "
            "pass a smaller image"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(f"cannot read image {file} ({err}): pass a readable PNG or JPEG file") from None


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey images scaled to 8 bits (Pillow's own conversion clips them to white)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        wide = image.mode != "I" or values.max(initial=0) > 255  # an "I" image of 8-bit values stays as is
        return Image.fromarray((values >> 8 if wide else values).astype(np.uint8))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        values = np.nan_to_num(values * 255 if values.max(initial=0) <= 1 else values)
        return Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8))
    return image


def crop_size_list(budget: int, patch: int = PATCH, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """Bucket sizes (width, height) of about ``budget`` x ``budget`` pixels, aspect at most ``max_ratio``."""
    if budget < patch or budget % patch:
        raise InputError(f"image budget {budget} must be a positive multiple of {patch} (e.g. 512 or 1024)")
    num_patches = (budget // patch) ** 2
    sizes, wp, hp = [], num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            sizes.append((wp * patch, hp * patch))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    return sizes


def closest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket keeping the largest share of the image (ties: the larger bucket, as the public code)."""

    def kept(size: tuple[int, int]) -> float:
        sx, sy = size[0] / width, size[1] / height
        return min(sx, sy) / max(sx, sy)

    return max(buckets, key=lambda size: (kept(size), size))


def center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale ``image`` to cover ``size`` (halving by box filter first while it is 2x larger), crop the centre."""
    target_w, target_h = size
    while image.width >= 2 * target_w and image.height >= 2 * target_h:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = max(target_w / image.width, target_h / image.height)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left, top = (image.width - target_w) // 2, (image.height - target_h) // 2
    return image.crop((left, top, left + target_w, top + target_h))


def fit_image(image: Image.Image, budget: int | None) -> Image.Image:
    """To the closest bucket of ``budget`` (None: keep the size, centre-crop to multiples of 16 pixels)."""
    if budget is None:
        width = image.width - image.width % PIXELS_PER_CELL
        height = image.height - image.height % PIXELS_PER_CELL
        if not width or not height:
            raise InputError(f"image of {image.width}x{image.height} is smaller than 16x16 pixels: use a larger image")
        left, top = (image.width - width) // 2, (image.height - height) // 2
        return image.crop((left, top, left + width, top + height))
    return center_crop(image, closest_bucket(image.width, image.height, crop_size_list(budget)))


def pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]: what the VQ encoder takes (no [-1, 1] normalisation)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def grid_size(image: Image.Image) -> tuple[int, int]:
    """(rows, columns) of image tokens for an image whose sides are multiples of 16."""
    return image.height // PIXELS_PER_CELL, image.width // PIXELS_PER_CELL


def box_cell_mask(
    height: int, width: int, grid: tuple[int, int], mask_h_ratio: float, mask_w_ratio: float, outside: bool
) -> torch.Tensor:
    """(rows, cols) bool: cells covered (> 0.5 by area) by a centred box, or by its outside when ``outside``."""
    for name, ratio in (("mask height ratio", mask_h_ratio), ("mask width ratio", mask_w_ratio)):
        if not 0.0 < ratio <= 1.0:
            raise InputError(f"{name} {ratio} is outside (0, 1]: give the box size as a fraction of the image")
    box_h, box_w = int(round(height * mask_h_ratio)), int(round(width * mask_w_ratio))
    top, left = (height - box_h) // 2, (width - box_w) // 2
    covered = torch.zeros(height, width)
    covered[top : top + box_h, left : left + box_w] = 1.0
    return downsample_mask(1.0 - covered if outside else covered, grid)


def image_cell_mask(mask: Image.Image, grid: tuple[int, int]) -> torch.Tensor:
    """(rows, cols) bool from a user mask (white = regenerate): area average per cell, masked when > 0.5."""
    values = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)  # (H, W)
    return downsample_mask(values, grid)


def downsample_mask(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area-downsample a (H, W) coverage map to the latent grid; a cell is masked when strictly > 0.5."""
    cells = F.interpolate(values[None, None].float(), size=grid, mode="area")  # (1, 1, rows, cols)
    return cells[0, 0] > 0.5


def check_mask_size(mask: Image.Image, image: Image.Image, mask_name: str = "mask") -> None:
    """A user mask must have the source image's size (before any crop), pixel for pixel."""
    if mask.size != image.size:
        raise InputError(
            f"{mask_name} is {mask.width}x{mask.height} but the image is {image.width}x{image.height}: "
            "draw the mask at the image's size (white = regenerate, black = keep)"
        )
