"""Training the shapes-world VQ: a few tiny steps lower the loss, deterministically; save/load round trip."""

from __future__ import annotations

import torch

from dimoo_npu.shapes import vq_train

TINY = vq_train.VQTrainConfig(
    block_out_channels=(8, 8, 8, 8, 8),
    latent_channels=4,
    num_vq_embeddings=16,
    norm_num_groups=4,
    steps=8,
    batch_size=4,
    lr=3e-3,
    warmup_steps=1,
    restart_every=4,
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


def test_dead_codes_are_restarted_onto_encoder_outputs():
    torch.manual_seed(0)
    model = vq_train.build_vq_model(TINY)
    with torch.no_grad():
        model.quantize.embedding.weight.fill_(100.0)  # far from every latent: all but one code unused
    pixels = vq_train.to_unit(_images()[:2])
    restarted = vq_train.restart_dead_codes(model, pixels, torch.Generator().manual_seed(0))
    assert restarted == TINY.num_vq_embeddings - 1
    still_far = (model.quantize.embedding.weight == 100.0).all(dim=1)
    assert int(still_far.sum()) == 1  # only the code every latent was assigned to stays put


def test_save_and_load_round_trip_keeps_codes_and_pictures(tmp_path):
    from dimoo_npu.image_tokenizer import ImageTokenizer

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
