"""VQ case of the fixtures: encode, masked encode (inpaint / outpaint boxes) and decode, exactly."""

from __future__ import annotations

import pytest
import torch

from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.numerics.tolerances import tolerance
from dimoo_npu.tokens import sequences
from dimoo_npu.tokens.image_prep import box_cell_mask, grid_size, load_image
from dimoo_npu.tokens.image_tokenizer import ImageTokenizer


@pytest.fixture(scope="module")
def vq(checkpoint_dir):
    return ImageTokenizer.from_pretrained(checkpoint_dir)


@pytest.fixture(scope="module")
def tokens(checkpoint_dir):
    return DiMOOConfig.from_json(checkpoint_dir).special_tokens


@pytest.fixture(scope="module")
def source(fixture_dir, cases):
    return load_image(fixture_dir / cases["cases"]["vq"]["image"])


@pytest.fixture(scope="module")
def codes(vq, source):
    return vq.encode_image(source)


def test_encode_tokens(codes, golden, tokens):
    assert torch.equal(sequences.image_block(codes, tokens), golden["vq.encode_tokens"][0])


@pytest.mark.parametrize(
    ("name", "box", "outside"),
    [("inpaint_tokens", (0.5, 0.5), False), ("outpaint_tokens", (1.0, 0.4), True)],
)
def test_masked_encode(name, box, outside, codes, source, golden, tokens):
    cell_mask = box_cell_mask(source.height, source.width, grid_size(source), *box, outside=outside)
    rows = sequences.image_rows(sequences.paint_cells(codes, cell_mask, tokens), tokens)
    assert torch.equal(rows, golden[f"vq.{name}"][0])


def test_decode(codes, vq, golden):
    """Within one level of 255: the decoder's fp32 sums round to uint8 differently with the thread count."""
    decoded, expected = vq.decode(codes[None])[0].int(), golden["vq.decoded_rgb"].int()
    assert decoded.shape == expected.shape
    assert int((decoded - expected).abs().max()) <= tolerance("pixels", torch.float32).atol
