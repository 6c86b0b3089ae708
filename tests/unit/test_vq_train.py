"""Training the shapes-world VQ: one code per distinct cell, tiny steps lower the loss deterministically; save/load."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dimoo_npu.shapes import vq_train

TINY = vq_train.VQTrainConfig(
    block_out_channels=(8, 8, 8, 8, 8),
    latent_channels=4,
    num_vq_embeddings=64,
    norm_num_groups=4,
    steps=8,
    batch_size=4,
    lr=3e-3,
    warmup_steps=1,
)


def _images(size: int = 64) -> torch.Tensor:
    """World images, area-downsampled (the VQ is convolutional; 64 px keeps the test fast)."""
    images = vq_train.world_images(8, seed=0, split="train", two_object_share=0.5)
    return torch.nn.functional.interpolate(images.float(), size=size, mode="area").round().to(torch.uint8)


def test_a_few_tiny_steps_reduce_the_loss_and_are_deterministic():
    torch.set_num_threads(1)
    images = _images()
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.uint8
    model, losses = vq_train.train_vq(TINY, images, progress=False)
    assert len(losses) == TINY.steps
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    _, again = vq_train.train_vq(TINY, images, progress=False)
    assert again == losses


def test_every_distinct_cell_gets_its_own_code_and_too_small_a_codebook_is_refused():
    images = _images()
    codes = vq_train.content_codes(images, 16, 64)
    assert codes.shape == (8, 4, 4)
    assert torch.equal(codes, vq_train.cell_groups(images, 16))
    distinct = int(codes.max()) + 1
    with pytest.raises(ValueError, match=f"raise num_vq_embeddings to at least {distinct}"):
        vq_train.content_codes(images, 16, distinct - 1)


def test_training_moves_each_cell_onto_its_content_code_wherever_it_is():
    from dimoo_npu.tokens.image_tokenizer import ImageTokenizer

    torch.set_num_threads(1)
    images = _images()
    wanted = vq_train.content_codes(images, 16, TINY.num_vq_embeddings)

    def agreement(model) -> float:
        return float((ImageTokenizer(model).encode(vq_train.to_unit(images)) == wanted).float().mean())

    torch.manual_seed(0)
    assert agreement(vq_train.build_vq_model(TINY)) < 0.5
    model, _ = vq_train.train_vq(dataclasses.replace(TINY, steps=100, lr=1e-2), images, progress=False)
    assert agreement(model) >= 0.8  # 100 tiny steps; the shipped tokenizer reaches one code per content
    moved = vq_train.rolled(images, [(1, 2)] * len(images), 16)  # the same cells elsewhere keep their codes
    codes, moved_codes = (ImageTokenizer(model).encode(vq_train.to_unit(x)) for x in (images, moved))
    assert float((moved_codes == vq_train.rolled(codes, [(1, 2)] * len(images), 1)).float().mean()) >= 0.8


def test_save_and_load_round_trip_keeps_codes_and_pictures(tmp_path):
    from dimoo_npu.tokens.image_tokenizer import ImageTokenizer

    torch.manual_seed(0)
    model = vq_train.build_vq_model(TINY)
    (tmp_path / "ckpt").mkdir()
    vq_train.save_vq(model, tmp_path / "ckpt" / "vqvae")
    vq_train.save_vq(model, tmp_path / "ckpt" / "vqvae")  # replacing an existing folder works too
    assert (tmp_path / "ckpt" / "vqvae" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["vqvae"]
    loaded = ImageTokenizer.from_pretrained(tmp_path / "ckpt")
    original = ImageTokenizer(model)
    pixels = vq_train.to_unit(_images()[:2])
    codes = original.encode(pixels)
    assert codes.shape == (2, 4, 4)
    assert torch.equal(loaded.encode(pixels), codes)
    assert torch.equal(loaded.decode(codes), original.decode(codes))
    psnr = vq_train.reconstruction_psnr(model, _images()[:2])
    assert 0.0 < psnr < 60.0


def test_rolling_by_whole_cells_moves_cells_and_their_codes_together():
    images = vq_train.world_images(4, seed=0, split="train", two_object_share=0.5)
    shifts = vq_train.random_cell_shifts(4, 8, 8, torch.Generator().manual_seed(0))
    assert all(shift != (0, 0) for shift in shifts)
    moved = vq_train.rolled(images, shifts, 16)
    assert moved.shape == images.shape and not torch.equal(moved, images)
    groups = vq_train.cell_groups(torch.cat([images, moved]), 16)
    assert torch.equal(groups[4:], vq_train.rolled(groups[:4], shifts, 1))  # same cells, codes moved with them


def test_cells_with_identical_pixels_share_a_group_and_others_do_not():
    images = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    images[0, 0, :16, :16] = 0  # image 0, cell (0, 0): red channel off
    images[1, :, 16:, 16:] = 0  # image 1, cell (1, 1): black
    groups = vq_train.cell_groups(images, 16)
    white = int(groups[0, 0, 1])
    assert groups.shape == (2, 2, 2)
    assert (groups == white).sum() == 6 and len({int(groups[0, 0, 0]), white, int(groups[1, 1, 1])}) == 3


def test_codes_per_cell_content_counts_distinct_codes():
    torch.manual_seed(0)
    model = vq_train.build_vq_model(TINY)
    images = _images()[:4]
    counts = vq_train.codes_per_cell_content(model, images)
    assert counts["white_cell_codes"] >= 1 and counts["codes_per_cell_content"] >= 1.0
