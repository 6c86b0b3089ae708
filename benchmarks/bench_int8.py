"""Int8 against fp32 on CPU: text-to-image with CFG on one random model, quantized in memory, in one run.

Model: random weights, the real vocabulary (134548), d512 x 8 blocks by default, fp32; the int8 variants are the
same weights quantized by `dimoo_npu.quantization.quantize_model` (every block matmul; embedding and head kept),
prepared as the sampling commands prepare a model (fused projections). Greedy, so the fp32 and int8 image
tokens can be compared: the table gives the share that agree. Seconds: median of ``--repeats`` runs (min-max),
after one untimed warm-up run per variant. The CPU's capability (torch.backends.cpu.get_cpu_capability(): AVX2,
AVX512, AVX512_VNNI...) and the thread count are printed with the figures: torch._int_mm gains most with VNNI.

    OMP_NUM_THREADS=1 nice python benchmarks/bench_int8.py --threads 1     # about 2 minutes on one AVX2 core
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from functools import partial

import torch
from bench_sampling import VOCAB, ours, t2i_prompts

from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.ops import resolve_ops
from dimoo_npu.quantization import QuantizationSpec, quantize_model, weight_bytes
from dimoo_npu.sampling.graph import prepare_for_sampling

write = sys.stdout.write


def models(args) -> dict[str, DiMOOModel]:
    config = DiMOOConfig(
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        mlp_hidden_size=8 * args.d_model // 3,
        embedding_size=VOCAB,
        max_sequence_length=8192,
    )
    torch.manual_seed(0)
    base = DiMOOModel(config, ops=resolve_ops("cpu")).eval().requires_grad_(False)
    variants = {"fp32": base}
    for scheme in args.schemes:
        variants[scheme] = quantize_model(copy.deepcopy(base), QuantizationSpec(scheme))
    return {name: prepare_for_sampling(model) for name, model in variants.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--grid", type=int, default=16, help="image grid side in codes (16: 256 px)")
    parser.add_argument("--timesteps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--schemes", nargs="+", default=["w8a8", "w8a16"], choices=["w8a8", "w8a16"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = models(args)
    fp32 = variants["fp32"]
    prompts, uncond = t2i_prompts(fp32.config.special_tokens, args.batch, args.grid, args.prompt_len, "cpu")
    write(
        f"# int8 vs fp32, CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} "
        f"thread(s), torch {torch.__version__}\n"
        f"d{args.d_model} x {args.layers} blocks, vocabulary {VOCAB}, batch {args.batch}, {args.grid}x{args.grid} "
        f"grid, {args.timesteps} steps, cfg {args.cfg}, greedy; seconds: median of {args.repeats} (min-max)\n\n"
        "| model | weights MB | seconds | images/s | vs fp32 | image tokens equal to fp32 |\n"
        "|---|---|---|---|---|---|\n"
    )
    baseline, reference = None, None
    for name, model in variants.items():
        run = partial(ours, model, prompts, uncond, args.timesteps, args.cfg, 0.0, False)
        with torch.no_grad():
            run()  # warm-up
            times, out = [], None
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = run()
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        baseline, reference = (seconds, out) if baseline is None else (baseline, reference)
        agree = f"{(out == reference).float().mean().item():.1%}"
        write(
            f"| {name} | {weight_bytes(model) / 1e6:.0f} | {seconds:.2f} ({min(times):.2f}-{max(times):.2f}) | "
            f"{args.batch / seconds:.3f} | {baseline / seconds:.2f}x | {agree} |\n"
        )


if __name__ == "__main__":
    main()
