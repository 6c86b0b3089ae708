"""ONNX export of the DiMOO transformer and of the VQ decoder (torch.onnx dynamo exporter, onnxscript).

The transformer graph is ``(input_ids (B, L) int64, attention_mask (B, L) int64 1=real) -> logits
(B, L, V)``, plus the output of every block (``block.<i>``, (B, L, d)) when exported with layer
outputs, so `dimoo check` can find the first layer where onnxruntime and torch part. Batch and length
are dynamic. It is traced with the reference ops (plain tensor ops, fp32 softmax/norm/rotary), which
is also what Ascend's ATC converts (see docs/ascend_atc.md). The VQ decoder graph is ``codes (B, h, w)
int64 -> image (B, 3, H, W)`` in [0, 1], with dynamic batch, h and w.
Files are written to a temporary name and renamed, and never replace an existing file unless asked.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from dimoo_npu.files.atomic import fsync
from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.block_outputs import LOGITS, block_name, capture_blocks
from dimoo_npu.ops import resolve_ops
from dimoo_npu.utils.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18  # >= 17 for LayerNorm-era ops; CANN 7.0 ATC documents opsets 9-18
INPUT_NAMES = ("input_ids", "attention_mask")
VQ_INPUT, VQ_OUTPUT = "codes", "image"
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf files stop at 2 GiB: larger weights go to <file>.data
META_PREFIX = "dimoo."
# logger -> level while exporting (the registration logger warns that torchvision ops are skipped)
_CHATTY_LOGGERS = {
    "onnx_ir": logging.WARNING,
    "onnxscript": logging.WARNING,
    "torch.onnx._internal.exporter._registration": logging.ERROR,
}


class TransformerForExport(nn.Module):
    """``(input_ids, attention_mask) -> logits[, block.0, ..., block.n-1]`` around a `DiMOOModel`."""

    def __init__(self, model: DiMOOModel, layer_outputs: bool):
        super().__init__()
        self.model = model
        self.layer_outputs = layer_outputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with capture_blocks(self.model) as blocks:
            logits = self.model(input_ids, attention_mask)
        if not self.layer_outputs:
            return (logits,)
        return (logits, *(blocks[block_name(i)] for i in range(len(blocks))))


class VQDecoderForExport(nn.Module):
    """``codes (B, h, w) -> image (B, 3, H, W)`` in [0, 1], as the aMUSEd pipeline decodes (codebook lookup)."""

    def __init__(self, vqvae: nn.Module):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        batch, height, width = codes.shape
        channels = self.vqvae.config.vq_embed_dim
        decoded = self.vqvae.decode(
            codes.reshape(-1), force_not_quantize=True, shape=(batch, height, width, channels)
        ).sample  # (B, 3, H, W)
        return decoded.clamp(0, 1)


def example_transformer_inputs(config, batch: int = 2, length: int = 16, seed: int = 0):
    """Token ids below the vocabulary and a mask whose last row is right-padded (the mask must matter)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.embedding_size, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.int64)
    attention_mask[-1, length - max(1, length // 4) :] = 0
    return input_ids, attention_mask


def export_transformer(
    model: DiMOOModel,
    path: str | os.PathLike,
    *,
    layer_outputs: bool = True,
    vocab_range: tuple[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
) -> Path:
    """Export ``model`` (on CPU) with dynamic batch and length; returns the written .onnx path."""
    path = _check_destination(path, overwrite)
    if next(model.parameters()).device.type != "cpu":
        raise InputError("ONNX export traces the model on CPU: load it with device='cpu'")
    config = model.config
    _check_vocab_range(vocab_range, config.embedding_size)
    wrapper = TransformerForExport(model, layer_outputs).eval()
    outputs = [LOGITS] + ([block_name(i) for i in range(config.n_layers)] if layer_outputs else [])
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim("length", min=2, max=model.max_length)
    dims = {name: {0: batch, 1: length} for name in INPUT_NAMES}
    with _traceable(model, vocab_range):
        program = _export(wrapper, example_transformer_inputs(config), INPUT_NAMES, outputs, dims, opset)
    lo, hi = vocab_range or (0, config.embedding_size)
    program.model.metadata_props.update(
        {
            f"{META_PREFIX}{key}": str(value)
            for key, value in {
                "kind": "transformer",
                "d_model": config.d_model,
                "n_layers": config.n_layers,
                "n_heads": config.n_heads,
                "embedding_size": config.embedding_size,
                "vocab_range": f"{lo},{hi}",
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            }.items()
        }
    )
    return _save(program, path, _parameter_bytes(model))


@contextmanager
def _traceable(model: DiMOOModel, vocab_range: tuple[int, int] | None) -> Iterator[None]:
    """Reference ops (plain tensor ops) and, for a vocab range, only those head rows; restored afterwards.

    Slicing the head here rather than in the graph keeps the other rows out of the file (an 8B head is
    4096 x 134548: the image codes are 6% of it).
    """
    head, previous_ops = model.transformer.ff_out, model.ops
    full_weight = head.weight
    model.use_ops(resolve_ops("cpu", "reference"))
    if vocab_range is not None:
        head.weight = nn.Parameter(full_weight[vocab_range[0] : vocab_range[1]].clone(), requires_grad=False)
    try:
        yield
    finally:
        head.weight = full_weight
        model.use_ops(previous_ops)


def export_vq_decoder(
    vqvae: nn.Module, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, overwrite: bool = False
) -> Path:
    """Export the VQ decoder (codebook lookup + decoder) with dynamic batch, height and width."""
    path = _check_destination(path, overwrite)
    wrapper = VQDecoderForExport(vqvae).eval()
    codes = torch.randint(0, vqvae.config.num_vq_embeddings, (1, 4, 6), generator=torch.Generator().manual_seed(0))
    dims = {
        VQ_INPUT: {
            0: torch.export.Dim("batch", min=1),
            1: torch.export.Dim("h", min=2),
            2: torch.export.Dim("w", min=2),
        }
    }
    program = _export(wrapper, (codes,), (VQ_INPUT,), [VQ_OUTPUT], dims, opset)
    program.model.metadata_props.update(
        {f"{META_PREFIX}kind": "vq_decoder", f"{META_PREFIX}codebook_size": str(vqvae.config.num_vq_embeddings)}
    )
    return _save(program, path, _parameter_bytes(vqvae))


def _export(module: nn.Module, args: tuple, inputs, outputs, dims: dict, opset: int):
    if opset < 17:
        raise InputError(f"opset {opset} is too old: the exporter needs opset 17 or newer")
    logger.info("exporting %s to ONNX (opset %d); this takes a while", type(module).__name__, opset)
    with torch.no_grad(), _quiet_exporter():
        return torch.onnx.export(
            module,
            args,
            None,
            dynamo=True,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_shapes=dims,
            opset_version=opset,
            verbose=False,
        )


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's per-pass INFO logs and known-harmless warnings out of the command's output."""
    levels = {name: logging.getLogger(name).level for name in _CHATTY_LOGGERS}
    try:
        for name, level in _CHATTY_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used", category=UserWarning)
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _save(program, path: Path, weight_bytes: int) -> Path:
    """Save into a temporary folder beside ``path``, then move the .onnx (and its .data) into place, flushed to disk
    as `dimoo_npu.files.atomic` does (the graph names its .data file, so the file cannot be written under a temp
    name)."""
    external = weight_bytes > EXTERNAL_DATA_BYTES
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        program.save(staging / path.name, external_data=external)  # .data is named after the .onnx: no temp name
        for produced in sorted(staging.iterdir(), key=lambda p: p.suffix == ".onnx"):  # .onnx last
            fsync(produced)
            os.replace(produced, path.parent / produced.name)
        fsync(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s%s", path, " (+ external weights)" if external else "")
    return path


def _check_destination(path: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(path)
    if path.suffix != ".onnx":
        raise InputError(f"output {path} must end in .onnx")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it or choose another --output")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _check_vocab_range(vocab_range: tuple[int, int] | None, vocab: int) -> None:
    if vocab_range is not None and not 0 <= vocab_range[0] < vocab_range[1] <= vocab:
        raise InputError(f"vocab range {vocab_range} must satisfy 0 <= lo < hi <= {vocab} (the vocabulary size)")


def _parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
