"""Understanding with K/V caches: seconds per answer of `sample_text` exact vs ``kv_cache="prefix"`` vs ``"dual"``.

A question of ~40 text tokens around a 512-pixel image (32 x 32 = 1,024 codes), then a 256-token answer in blocks
of 64 over 64 steps, greedy, batch 1: the prompt is ~80% of the sequence, as in the public understanding setting.
Every run times the three modes back to back, so each ratio comes from one run (the machine's load moves all three
alike); the table gives the median over the runs and the spread (min-max). Token agreement is with exact's answer.
A random model's confidence never reaches a useful threshold, so ``--threshold`` adds a row that shows its cost,
not its gain (measure that on the bundled model: ``dimoo eval shapes --task qa,caption --fast``).

Model: random weights, the real vocabulary (134548), d_model 512 x 8 layers by default, fp32, fused projections.

    nice python benchmarks/bench_understand.py --threads 1            # CPU: about 8 minutes with 3 runs
    python benchmarks/bench_understand.py --device cuda --d-model 2048 --layers 16 --heads 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from functools import partial

import torch
from bench_sampling import add_model_arguments, build_model, timed

from dimoo_npu.adapters import resolve_device
from dimoo_npu.sampling import sample_text
from dimoo_npu.tokens.sequences import understanding

write = sys.stdout.write


def question_and_image(tokens, question_len: int, side: int, gen_length: int, device) -> torch.Tensor:
    """Random question tokens with a random side x side image before the last one, then BOA + MASKs + EOA."""
    gen = torch.Generator().manual_seed(1)
    question = torch.randint(0, 120000, (question_len,), generator=gen)
    codes = torch.randint(0, tokens["codebook_size"], (side, side), generator=gen)
    ids, _ = understanding(question, codes, gen_length, tokens)
    return ids.to(device)


def answer(model, prompt: torch.Tensor, args, kv_cache: str, threshold: float | None) -> torch.Tensor:
    return sample_text(
        model,
        prompt[None],
        gen_length=args.gen_length,
        block_length=args.block_length,
        steps=args.steps,
        kv_cache=kv_cache,
        parallel_threshold=threshold,
    )[0, -args.gen_length - 1 : -1]


def modes(args) -> list[tuple[str, str, float | None]]:
    rows = [("exact", "none", None), ("prefix", "prefix", None), ("dual", "dual", None)]
    if args.threshold:
        rows.append((f"dual, threshold {args.threshold}", "dual", args.threshold))
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, layers=8)
    parser.add_argument("--question-len", type=int, default=40)
    parser.add_argument("--image-side", type=int, default=32, help="image codes per side (32: a 512-pixel image)")
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.0, help="also time dual with this threshold (0: no)")
    parser.add_argument("--runs", type=int, default=3, help="runs of the three modes (median, min-max)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backend, device = resolve_device(args.device)
    model = build_model(args, device)
    prompt = question_and_image(
        model.config.special_tokens, args.question_len, args.image_side, args.gen_length, device
    )
    write(
        f"device {device}, {torch.get_num_threads()} threads, {args.dtype}; model d_model {args.d_model}, "
        f"{args.layers} layers, {args.heads} heads, vocab {model.config.embedding_size}; sequence {prompt.numel()} "
        f"tokens, answer {args.gen_length} in blocks of {args.block_length}, {args.steps} steps, greedy; "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    seconds: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    agreement: dict[str, float] = {}
    with torch.inference_mode():
        for _ in range(args.runs):
            exact_s = None
            for label, kv_cache, threshold in modes(args):
                took, tokens = timed(backend, partial(answer, model, prompt, args, kv_cache, threshold), 1)
                if exact_s is None:
                    exact_s, exact_tokens = took, tokens
                seconds.setdefault(label, []).append(took)
                ratios.setdefault(label, []).append(exact_s / took)
                agreement[label] = (tokens == exact_tokens).float().mean().item()
    write(
        f"\n| mode | seconds, median of {args.runs} (min-max) | vs exact, median (min-max) | tokens = exact |\n"
        "|---|---|---|---|\n"
    )
    for label, times in seconds.items():
        spread = f"{min(times):.2f}-{max(times):.2f}"
        ratio = ratios[label]
        write(
            f"| {label} | {statistics.median(times):.2f} ({spread}) | {statistics.median(ratio):.2f}x "
            f"({min(ratio):.2f}-{max(ratio):.2f}) | {agreement[label]:.1%} |\n"
        )
    write(f"\nload average at the end {os.getloadavg()[0]:.1f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
