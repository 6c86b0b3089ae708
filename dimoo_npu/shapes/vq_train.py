"""Train the small image tokenizer of the embedded model: a diffusers ``VQModel`` on shapes-world images.

aMUSEd layout (5 levels = 16x downsampling, so 8 x 8 codes for 128 x 128) with small channels and
a small codebook, so the weights stay well under a few MB. Pixels are in [0, 1] as DiMOO's VQ expects.
Unused codes are restarted from encoder outputs, since a small world would otherwise leave most of
the codebook dead. Run: ``python -m dimoo_npu.shapes.vq_train --out DIR``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

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
    steps: int = 1500
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 50
    train_images: int = 1200
    two_object_share: float = 0.4
    restart_every: int = 50  # steps between dead-code restarts (0 = never)
    restart_until: float = 0.8  # stop restarting after this fraction of the steps
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


def world_images(count: int, seed: int, split: str, two_object_share: float) -> torch.Tensor:
    """(N, 3, 128, 128) uint8: every single object of ``split`` once, then random scenes up to ``count``."""
    scenes = [world.Scene((obj,)) for obj in world.split_objects(split)]
    scenes += list(world.sample_scenes(seed, max(count - len(scenes), 0), split, two_object_share))
    arrays = np.stack([world.render_array(scene) for scene in scenes[:count]])  # (N, H, W, 3)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


def heldout_images(seed: int = 1234) -> torch.Tensor:
    """Held-out single objects plus two-object scenes from a seed no training run uses."""
    return world_images(len(world.split_objects("heldout")) + 48, seed, "heldout", 1.0)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


@torch.no_grad()
def reconstruction_psnr(model, images: torch.Tensor, batch_size: int = 32) -> float:
    """Mean PSNR (dB) of uint8 (N, 3, H, W) images against their round trip through code indices."""
    from dimoo_npu.image_tokenizer import ImageTokenizer

    tokenizer = ImageTokenizer(model)  # the encode/decode path DiMOO uses (eval mode, no grad)
    values = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        recon = tokenizer.decode(tokenizer.encode(to_unit(batch))).permute(0, 3, 1, 2)  # (B, 3, H, W)
        mse = ((recon.float() - batch.float()) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-3)
        values.extend((10 * torch.log10(255.0**2 / mse)).tolist())
    return float(np.mean(values))


@torch.no_grad()
def restart_dead_codes(model, pixels: torch.Tensor, generator: torch.Generator) -> int:
    """Move codes no latent of ``pixels`` uses onto randomly chosen encoder outputs; returns how many."""
    latents = model.encode(pixels).latents  # (B, C, h, w)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (B*h*w, C)
    codebook = model.quantize.embedding.weight
    used = torch.cdist(flat, codebook).argmin(dim=1).unique()
    dead = torch.ones(len(codebook), dtype=torch.bool)
    dead[used] = False
    count = int(dead.sum())
    if count:
        picks = torch.randint(len(flat), (count,), generator=generator)
        codebook[dead] = flat[picks] + 1e-3 * torch.randn(count, flat.shape[1], generator=generator)
    return count


def _lr_at(step: int, cfg: VQTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vq(cfg: VQTrainConfig, images: torch.Tensor | None = None, progress: bool = True):
    """Train from scratch, deterministically for a given ``cfg.seed``; returns (model, list of losses)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    if images is None:
        images = world_images(cfg.train_images, cfg.seed, "train", cfg.two_object_share)
    model = build_vq_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    losses = []
    bar = tqdm(range(cfg.steps), desc="vq", disable=not progress)
    for step in bar:
        pixels = to_unit(images[torch.randint(len(images), (cfg.batch_size,), generator=generator)])
        model.train()
        if cfg.restart_every and step % cfg.restart_every == 0 and step < cfg.restart_until * cfg.steps:
            restarted = restart_dead_codes(model, pixels, generator)
            logger.debug("step %d: restarted %d dead codes", step, restarted)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        out = model(pixels)
        recon = torch.nn.functional.mse_loss(out.sample, pixels)
        loss = recon + out.commit_loss.mean()
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
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    model.save_pretrained(staging, safe_serialization=True)
    if folder.exists():
        retired = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(folder, retired)
        os.replace(staging, folder)
        shutil.rmtree(retired)
    else:
        os.replace(staging, folder)
    return folder


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
