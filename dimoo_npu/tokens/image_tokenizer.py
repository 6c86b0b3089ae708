"""The image tokenizer: the checkpoint's aMUSEd-layout VQ model (diffusers ``VQModel`` in ``vqvae/``).

Encoding takes pixels in [0, 1] as they are (no [-1, 1] normalisation) and returns the nearest code's
index per 16 x 16 cell; decoding looks the codes up from indices, clips to [0, 1] and rounds x*255.
Code indices here are 0..codebook_size-1; token ids add the checkpoint's ``image_offset``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from PIL import Image

from dimoo_npu.tokens.image_prep import pixels
from dimoo_npu.utils.errors import CheckpointError, InputError

logger = logging.getLogger(__name__)

VQ_SUBFOLDER = "vqvae"


def load_vq_model(folder: str | os.PathLike) -> torch.nn.Module:
    """The diffusers ``VQModel`` of a checkpoint's ``vqvae/`` folder: safetensors only, fp32, CPU, eval, no grad.

    The one VQ loader: the image tokenizer and the ONNX exporter both read the folder through it.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"no image tokenizer in {folder} (config.json missing): pass the checkpoint's vqvae/ folder, "
            "with config.json and diffusion_pytorch_model.safetensors"
        )
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(
            f"{folder} has no .safetensors weights (pickled .bin files are not loaded): convert them to safetensors"
        )
    from diffusers import VQModel

    try:
        model = VQModel.from_pretrained(
            str(folder), use_safetensors=True, torch_dtype=torch.float32, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot load the VQ model in {folder}: {err}") from None
    return model.eval().requires_grad_(False)


class ImageTokenizer:
    """Pixels <-> code indices through a diffusers VQModel, kept in fp32 (it is small and quantisation-sensitive)."""

    def __init__(self, vq_model: torch.nn.Module):
        self.vq = vq_model.eval().requires_grad_(False)  # also for a model built here rather than loaded
        self.scale_factor = 2 ** (len(vq_model.config.block_out_channels) - 1)
        self.codebook_size = int(vq_model.config.num_vq_embeddings)

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> ImageTokenizer:
        """Load ``<checkpoint>/vqvae`` (safetensors only)."""
        return cls(load_vq_model(Path(checkpoint) / VQ_SUBFOLDER).to(device))

    @property
    def device(self) -> torch.device:
        return next(self.vq.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [0, 1], sides multiples of the scale factor -> (B, H/16, W/16) code indices."""
        height, width = images.shape[-2:]
        if height % self.scale_factor or width % self.scale_factor:
            raise InputError(f"image of {width}x{height} pixels: both sides must be multiples of {self.scale_factor}")
        latents = self.vq.encode(images.to(self.device, torch.float32)).latents  # (B, C, h, w)
        indices = self.vq.quantize(latents)[2][2]  # (B*h*w,) nearest-code indices
        return indices.reshape(latents.shape[0], latents.shape[2], latents.shape[3])

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """One PIL image (sides multiples of 16) -> (h, w) code indices on CPU."""
        return self.encode(pixels(image)[None])[0].cpu()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code indices -> (B, 16h, 16w, 3) uint8 RGB on CPU."""
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise InputError(
                f"image codes must lie in [0, {self.codebook_size}): subtract the image_offset from token ids"
            )
        batch, rows, cols = codes.shape
        shape = (batch, rows, cols, int(self.vq.config.latent_channels))
        images = self.vq.decode(codes.to(self.device), force_not_quantize=True, shape=shape).sample.clip(0, 1)
        return (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()  # (B, H, W, 3)

    def decode_images(self, codes: torch.Tensor) -> list[Image.Image]:
        """(B, h, w) code indices -> B PIL images."""
        return [Image.fromarray(array.numpy()) for array in self.decode(codes)]
