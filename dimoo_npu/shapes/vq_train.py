"""Train the small image tokenizer of the embedded model: a diffusers ``VQModel`` on shapes-world images.

aMUSEd layout (5 levels = 16x downsampling, so 8 x 8 codes for 128 x 128) with small channels and
a small codebook, so the weights stay well under a few MB. Pixels are in [0, 1] as DiMOO's VQ expects.
Codes are local by construction: the distinct 16 x 16 cells of the training images (127 in this
world: white, and each quarter of each object look, a large square's four being one) are enumerated
and each gets its own code.
The encoder is trained to put every cell nearest its content's code, and the decoder to draw images
from those codes, on the training images and on copies rolled by whole cells. So a white cell or a
quarter of a red circle has one code wherever it is, and the transformer can compose unseen scenes
from known codes. (Trained as a plain VQ-VAE, the encoder's image-wide group norms and wide receptive
field gave white cells 236 different codes, and held-out prompts failed on them.)
Run: ``python -m dimoo_npu.shapes.vq_train --out DIR``.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dimoo_npu.files.atomic import replace_directory
from dimoo_npu.shapes import world

logger = logging.getLogger(__name__)


@dataclass
class VQTrainConfig:
    """Model shape and optimisation settings; the defaults are the shipped tokenizer's."""

    block_out_channels: tuple[int, ...] = (16, 16, 32, 32, 64)
    layers_per_block: int = 1
    latent_channels: int = 16
    num_vq_embeddings: int = 256
    norm_num_groups: int = 8
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 50
    train_images: int = 1200
    two_object_share: float = 0.4
    classify_weight: float = 0.1  # weight of the encoder's which-code cross-entropy
    seed: int = 0


def build_vq_model(cfg: VQTrainConfig):
    """A fresh ``diffusers.VQModel`` of the configured shape (deterministic under ``torch.manual_seed``)."""
    from diffusers import VQModel

    levels = len(cfg.block_out_channels)
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        vq_embed_dim=cfg.latent_channels,
        num_vq_embeddings=cfg.num_vq_embeddings,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=world.IMAGE_SIZE,
        lookup_from_codebook=True,
        mid_block_add_attention=False,
        force_upcast=False,
    )


def render_batch(scenes: list[world.Scene]) -> torch.Tensor:
    """(N, 3, 128, 128) uint8 renders of ``scenes``."""
    arrays = np.stack([world.render_array(scene) for scene in scenes])  # (N, H, W, 3)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def world_images(count: int, seed: int, split: str, two_object_share: float) -> torch.Tensor:
    """(N, 3, 128, 128) uint8: every single object of ``split`` once, then random scenes up to ``count``."""
    scenes = [world.Scene((obj,)) for obj in world.split_objects(split)]
    scenes += list(world.sample_scenes(seed, max(count - len(scenes), 0), split, two_object_share))
    return render_batch(scenes[:count])


def heldout_images(seed: int = 1234) -> torch.Tensor:
    """Held-out single objects plus two-object scenes from a seed no training run uses."""
    return world_images(len(world.split_objects("heldout")) + 48, seed, "heldout", 1.0)


def single_object_images() -> torch.Tensor:
    """All 324 single-object images (training and held-out), (N, 3, H, W) uint8."""
    return render_batch([world.Scene((obj,)) for obj in world.all_single_objects()])


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


@torch.no_grad()
def reconstruction_psnr(model, images: torch.Tensor, batch_size: int = 32) -> float:
    """Mean PSNR (dB) of uint8 (N, 3, H, W) images against their round trip through code indices."""
    from dimoo_npu.tokens.image_tokenizer import ImageTokenizer

    tokenizer = ImageTokenizer(model)  # the encode/decode path DiMOO uses (eval mode, no grad)
    values = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        recon = tokenizer.decode(tokenizer.encode(to_unit(batch))).permute(0, 3, 1, 2)  # (B, 3, H, W)
        mse = ((recon.float() - batch.float()) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-3)
        values.extend((10 * torch.log10(255.0**2 / mse)).tolist())
    return float(np.mean(values))


@torch.no_grad()
def codes_per_cell_content(model, images: torch.Tensor) -> dict[str, float]:
    """How local the codes are: distinct codes for all-white cells, and on average per distinct cell content."""
    from dimoo_npu.tokens.image_tokenizer import ImageTokenizer

    cell, tokenizer = code_cell_size(model), ImageTokenizer(model)
    codes = torch.cat([tokenizer.encode(to_unit(batch)).flatten() for batch in images.split(32)])
    groups = cell_groups(images, cell).flatten()
    per_group = [codes[groups == g].unique().numel() for g in groups.unique().tolist()]
    white_cells = (images == 255).all(dim=1).unfold(1, cell, cell).unfold(2, cell, cell).flatten(3).all(dim=3).flatten()
    return {
        "white_cell_codes": int(codes[white_cells].unique().numel()),
        "codes_per_cell_content": float(np.mean(per_group)),
    }


def code_cell_size(model) -> int:
    """Pixels per code side: the encoder halves the resolution once per level but the last."""
    return 2 ** (len(model.config.block_out_channels) - 1)


def random_cell_shifts(count: int, rows: int, cols: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """``count`` random non-zero (down, right) shifts in whole code cells."""
    flat = 1 + torch.randint(rows * cols - 1, (count,), generator=generator)
    return [(int(f) // cols, int(f) % cols) for f in flat]


def rolled(grids: torch.Tensor, shifts: list[tuple[int, int]], unit: int) -> torch.Tensor:
    """Each (..., H, W) grid rolled with wrap-around by its shift times ``unit`` (pixels per cell, or 1)."""
    return torch.stack(
        [torch.roll(g, (dy * unit, dx * unit), dims=(-2, -1)) for g, (dy, dx) in zip(grids, shifts, strict=True)]
    )


def cell_groups(images: torch.Tensor, cell: int) -> torch.Tensor:
    """(B, h, w) an id per code cell; cells with identical pixels share it (ids 0..distinct-1)."""
    b, _, height, width = images.shape
    patches = images.unfold(2, cell, cell).unfold(3, cell, cell)  # (B, C, h, w, cell, cell)
    flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * cell * cell)
    return torch.unique(flat, dim=0, return_inverse=True)[1].reshape(b, height // cell, width // cell)


def _lr_at(step: int, cfg: VQTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def content_codes(images: torch.Tensor, cell: int, codebook_size: int) -> torch.Tensor:
    """(N, h, w) the code of every cell of the training images: one code per distinct cell content."""
    codes = cell_groups(images, cell)
    distinct = int(codes.max()) + 1
    if distinct > codebook_size:
        raise ValueError(
            f"the training images have {distinct} distinct {cell} x {cell} cells but the codebook has "
            f"{codebook_size} codes: raise num_vq_embeddings to at least {distinct}"
        )
    return codes


def train_step_loss(model, pixels: torch.Tensor, codes: torch.Tensor, classify_weight: float) -> tuple:
    """(loss, reconstruction MSE) of one batch whose every cell's code is given by ``codes`` (B, h, w)."""
    latents = model.encode(pixels).latents  # (B, C, h, w)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    codebook = model.quantize.embedding.weight  # fixed: far-apart random codes the encoder aims at
    target = codebook[codes.flatten()]
    commit = F.mse_loss(flat, target)
    classify = F.cross_entropy(-(torch.cdist(flat, codebook) ** 2), codes.flatten())
    quantised = target.reshape(*codes.shape, -1).permute(0, 3, 1, 2)
    decoded = model.decoder(model.post_quant_conv(quantised))  # what VQModel.decode does after its quantiser
    recon = F.mse_loss(decoded, pixels)
    return recon + commit + classify_weight * classify, recon


def train_vq(cfg: VQTrainConfig, images: torch.Tensor | None = None, progress: bool = True):
    """Train from scratch, deterministically for a given ``cfg.seed``; returns (model, list of losses)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    if images is None:
        images = world_images(cfg.train_images, cfg.seed, "train", cfg.two_object_share)
    model = build_vq_model(cfg)
    with torch.no_grad():  # unit-variance codes sit ~sqrt(2 * latent_channels) apart: easy to tell apart
        model.quantize.embedding.weight.normal_(generator=generator)
    model.quantize.embedding.weight.requires_grad_(False)
    cell = code_cell_size(model)
    codes = content_codes(images, cell, cfg.num_vq_embeddings)
    logger.info("%d distinct cells in %d training images: one code each", int(codes.max()) + 1, len(images))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    losses = []
    model.train()
    bar = tqdm(range(cfg.steps), desc="vq", disable=not progress)
    for step in bar:
        picked = torch.randint(len(images), ((cfg.batch_size + 1) // 2,), generator=generator)
        shifts = random_cell_shifts(len(picked), *codes.shape[1:], generator)
        batch = torch.cat([images[picked], rolled(images[picked], shifts, cell)])[: cfg.batch_size]
        batch_codes = torch.cat([codes[picked], rolled(codes[picked], shifts, 1)])[: cfg.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss, recon = train_step_loss(model, to_unit(batch), batch_codes, cfg.classify_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", psnr=f"{-10 * math.log10(max(recon.item(), 1e-10)):.1f}")
    model.eval()
    return model, losses


def save_vq(model, folder: str | Path) -> Path:
    """``save_pretrained`` (safetensors) into a temporary folder, then swap it into place."""
    return replace_directory(folder, lambda staging: model.save_pretrained(staging, safe_serialization=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the VQModel into (replaced atomically)")
    parser.add_argument("--steps", type=int, default=VQTrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=VQTrainConfig.batch_size)
    parser.add_argument("--seed", type=int, default=VQTrainConfig.seed)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = VQTrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    logger.info("training VQ: %s", asdict(cfg))
    model, losses = train_vq(cfg)
    psnr = reconstruction_psnr(model, heldout_images())
    logger.info("final loss %.5f; held-out reconstruction PSNR %.2f dB", losses[-1], psnr)
    save_vq(model, args.out)
    logger.info("saved to %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
