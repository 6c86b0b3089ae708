"""``dimoo check``: compare every layer of a checkpoint across backends; exit 1 beyond tolerance.

Example: ``dimoo check --checkpoint ckpt --backends cpu-ref,npu --dtype bfloat16 --json out.json --plot out.png``
``--layers N`` checks the first N blocks and the head only, reading only their weights (an 8B checkpoint on a
host or device that cannot hold all of it).
"""

from __future__ import annotations

import argparse

from dimoo_npu.commands import emit


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json + safetensors)")
    parser.add_argument(
        "--backends",
        default="cpu-ref,cpu",
        help="comma-separated, the first is the reference, e.g. cpu-ref,npu or cpu,onnxruntime (a name that is not "
        "known is refused with the list; `dimoo doctor` shows which work here) (default: cpu-ref,cpu)",
    )
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16 for every backend")
    parser.add_argument("--atol", help="absolute tolerance: a number, or per dtype 'float32=1e-4,bfloat16=1e-2'")
    parser.add_argument("--rtol", help="tolerance relative to the layer's max |ref|: a number, or per dtype")
    parser.add_argument("--min-cosine", type=float, help="smallest cosine similarity that passes")
    parser.add_argument("--batch", type=int, default=2, help="rows of the seeded test batch (default 2)")
    parser.add_argument("--length", type=int, default=64, help="tokens per row (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test inputs")
    parser.add_argument(
        "--layers",
        type=int,
        help="check only the first N blocks and the head, reading only their weights (a large checkpoint, part by "
        "part); default: every block",
    )
    parser.add_argument("--onnx", help="for the onnxruntime backend: an exported file to run instead of exporting one")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="check the forward as sampling runs it: fused layout under torch.compile (or DIMOO_COMPILE=1)",
    )
    parser.add_argument(
        "--quantize",
        choices=("w8a8", "w8a16"),
        help="int8 check: the first backend runs the float weights in fp32, the others quantized while they load, "
        "judged by the int8 tolerances (an int8 --checkpoint is checked against its source without this flag)",
    )
    parser.add_argument("--json", help="write the full report as JSON here")
    parser.add_argument("--plot", help="write a PNG of max abs error by layer per backend here (needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    from dimoo_npu.numerics.backends import parse_targets
    from dimoo_npu.numerics.check import dtype_name, int8_scheme_of, run_check
    from dimoo_npu.numerics.report import format_table, write_json, write_plot
    from dimoo_npu.numerics.tolerances import tolerance_for

    targets = parse_targets(args.backends)
    dtype = dtype_name(args.dtype)
    scheme = args.quantize or int8_scheme_of(args.checkpoint)
    tolerance = tolerance_for(dtype, args.atol, args.rtol, args.min_cosine, scheme)
    report = run_check(
        args.checkpoint,
        targets,
        dtype,
        tolerance,
        batch=args.batch,
        length=args.length,
        seed=args.seed,
        onnx_file=args.onnx,
        max_layers=args.layers,
        compile=args.compile or None,
        quantize=args.quantize,
    )
    emit(format_table(report))
    if args.json:
        emit(f"wrote {write_json(report, args.json)}")
    if args.plot:
        emit(f"wrote {write_plot(report, args.plot)}")
    return 0 if report.passed else 1
