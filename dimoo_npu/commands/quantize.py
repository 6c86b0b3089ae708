"""``dimoo quantize``: a float checkpoint folder -> an int8 one (W8A8 or W8A16) that every command loads."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from dimoo_npu.commands import emit
from dimoo_npu.utils.errors import InputError

logger = logging.getLogger("dimoo")

SCHEMES = ("w8a8", "w8a16")  # = dimoo_npu.quantization.SCHEMES, repeated so --help imports no torch


def add_quantize_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--quantize`` for the commands that load a model: quantize a float checkpoint while it loads."""
    parser.add_argument(
        "--quantize",
        choices=SCHEMES,
        help="int8 weights (w8a16), and int8 activations too (w8a8), quantized while a float checkpoint loads; "
        "on cpu, npu and cuda (an int8 folder from `dimoo quantize` needs no flag)",
    )


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--checkpoint", required=True, help="float checkpoint folder (or cached Hugging Face id)")
    parser.add_argument("--scheme", required=True, help="w8a8 (int8 weights and activations) or w8a16 (int8 weights)")
    parser.add_argument("--output", required=True, help="new folder for the int8 checkpoint (must not hold files)")
    parser.add_argument(
        "--format",
        choices=("dimoo", "msmodelslim"),
        default="dimoo",
        help="dimoo: this package's int8 folder; msmodelslim: msModelSlim's W8A8-dynamic export layout (w8a8 only), "
        "which Ascend serving stacks and this package both load",
    )
    parser.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also keep these block linears in the original dtype (fnmatch on module names, e.g. '*.attn_out'; "
        "repeatable); the embedding, norms and head are always kept",
    )


def run(args: argparse.Namespace) -> int:
    from dimoo_npu.checkpoint import find_shards, load_model, save_pretrained
    from dimoo_npu.files.atomic import replace_directory
    from dimoo_npu.files.hub_cache import resolve_checkpoint
    from dimoo_npu.files.msmodelslim import write_export
    from dimoo_npu.files.safetensors_io import read_header
    from dimoo_npu.quantization import DEFAULT_KEEP, QuantizationSpec, weight_bytes
    from dimoo_npu.train.checkpoint import copy_assets

    spec = QuantizationSpec(args.scheme, (*DEFAULT_KEEP, *args.keep))  # refuses an unknown scheme first
    if args.format == "msmodelslim" and args.scheme != "w8a8":
        raise InputError(
            f"--format msmodelslim writes W8A8_DYNAMIC only (msModelSlim's {args.scheme.upper()} has weight "
            "offsets): use --scheme w8a8, or --format dimoo"
        )
    source, output = resolve_checkpoint(args.checkpoint), Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise InputError(f"--output {output} already exists and is not an empty folder: name a new folder")
    shards = find_shards(source)
    stored = next((e.dtype for e in read_header(shards[0]) if e.dtype.is_floating_point), None)
    spec = dataclasses.replace(spec, source=str(source.resolve()))
    model = load_model(source, device="cpu", dtype=stored, quantize=spec)  # refuses an int8 folder

    def fill(staging: Path) -> None:
        if args.format == "msmodelslim":
            write_export(model.state_dict(), model.config, staging)
        else:
            save_pretrained(model.state_dict(), model.config, staging)
        copy_assets(source, staging)

    replace_directory(output, fill)
    size = sum(path.stat().st_size for path in find_shards(output))
    loaded = weight_bytes(model)
    layout = f"{args.scheme} checkpoint ({args.format} layout)"
    emit(f"{output}: {layout}, {size / 1e9:.3f} GB of weights ({loaded / 1e9:.3f} GB loaded)")
    return 0
