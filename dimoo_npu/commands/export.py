"""``dimoo export-onnx``: the transformer and the VQ decoder as ONNX (dynamic shapes), checked in onnxruntime.

Writes ``<output>/transformer.onnx`` and ``<output>/vq_decoder.onnx``; see docs/ascend_atc.md for
turning them into Ascend offline models with ``atc``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dimoo_npu.commands import emit

PARTS = ("transformer", "vq-decoder")
EXPORT_DTYPES = (
    "float32",
    "float16",
)  # onnxruntime's CPU kernels cannot run a bfloat16 graph, so it could not be checked


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json, safetensors, vqvae/)")
    parser.add_argument("--output", required=True, help="folder for transformer.onnx and vq_decoder.onnx")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"what to export (default: {','.join(PARTS)})")
    parser.add_argument("--dtype", default="float32", choices=EXPORT_DTYPES, help="weights dtype (default float32)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 17 or newer (default 18)")
    parser.add_argument(
        "--vocab-range", help="only these head rows: 'image' (the VQ codes) or 'lo,hi'; default: the full vocabulary"
    )
    parser.add_argument(
        "--no-layer-outputs", action="store_true", help="logits only (default adds block.<i> outputs for dimoo check)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing .onnx files")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime vs torch check")


def run(args: argparse.Namespace) -> int:
    from dimoo_npu.utils.errors import InputError

    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise InputError(f"--parts {args.parts!r}: choose from {', '.join(PARTS)}")
    output = Path(args.output)
    ok = True
    if "transformer" in parts:
        ok &= _export_transformer(args, output / "transformer.onnx")
    if "vq-decoder" in parts:
        ok &= _export_vq_decoder(args, output / "vq_decoder.onnx")
    return 0 if ok else 1


def _export_transformer(args: argparse.Namespace, path: Path) -> bool:
    import dimoo_npu
    from dimoo_npu.export.onnx import example_transformer_inputs, export_transformer
    from dimoo_npu.numerics.check import DTYPES
    from dimoo_npu.numerics.onnx_check import verify_transformer
    from dimoo_npu.quantization import refuse_quantized

    model = dimoo_npu.load_model(args.checkpoint, device="cpu", dtype=DTYPES[args.dtype])
    refuse_quantized(model.config, args.checkpoint, "export-onnx (no int8 graph yet)")
    vocab_range = _vocab_range(args.vocab_range, model.config)
    export_transformer(
        model,
        path,
        layer_outputs=not args.no_layer_outputs,
        vocab_range=vocab_range,
        opset=args.opset,
        overwrite=args.overwrite,
    )
    emit(f"wrote {path}\n  ops: {_op_types(path)}")
    if args.no_verify:
        return True
    inputs = example_transformer_inputs(model.config, batch=3, length=11, seed=1)  # not the traced shape
    return _report(verify_transformer(model, path, *inputs), "batch 3, length 11")


def _export_vq_decoder(args: argparse.Namespace, path: Path) -> bool:
    import torch

    from dimoo_npu.export.onnx import export_vq_decoder
    from dimoo_npu.files.hub_cache import resolve_checkpoint
    from dimoo_npu.numerics.onnx_check import verify_vq_decoder
    from dimoo_npu.tokens.image_tokenizer import VQ_SUBFOLDER, load_vq_model

    vqvae = load_vq_model(resolve_checkpoint(args.checkpoint) / VQ_SUBFOLDER)
    export_vq_decoder(vqvae, path, opset=args.opset, overwrite=args.overwrite)
    emit(f"wrote {path}\n  ops: {_op_types(path)}")
    if args.no_verify:
        return True
    codes = torch.randint(0, vqvae.config.num_vq_embeddings, (2, 3, 5), generator=torch.Generator().manual_seed(1))
    return _report([verify_vq_decoder(vqvae, path, codes)], "batch 2, 3x5 codes")


def _report(diffs: list, shape: str) -> bool:
    worst = max(diffs, key=lambda diff: diff.max_abs)
    failed = [diff.layer for diff in diffs if not diff.passed]
    verdict = f"FAIL at {', '.join(failed)}" if failed else "ok"
    emit(f"  onnxruntime vs torch on {shape}: max abs {worst.max_abs:.3e} ({worst.layer}): {verdict}")
    return not failed


def _vocab_range(spec: str | None, config) -> tuple[int, int] | None:
    from dimoo_npu.utils.errors import InputError

    if not spec:
        return None
    if spec == "image":
        start = config.special_tokens["image_offset"]
        return start, start + config.special_tokens["codebook_size"]
    try:
        lo, hi = (int(v) for v in spec.split(","))
    except ValueError:
        raise InputError(f"--vocab-range {spec!r} is not 'image' or 'lo,hi'") from None
    return lo, hi


def _op_types(path: Path) -> str:
    import collections

    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    counts = collections.Counter(node.op_type for node in nodes)
    return ", ".join(f"{op} x{count}" for op, count in sorted(counts.items()))
