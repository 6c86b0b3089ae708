"""Text-to-image sampling with CFG: images/s of `sample_image` against a naive baseline measured in the same run.

The naive baseline has the public reference code's structure: one prompt at a time, separate cond and uncond
forwards, full-vocabulary logits sliced afterwards. Ours runs every prompt and branch in one padded forward and
asks the head only for the image-code logits it needs. Both are greedy here, so their outputs must be identical
(checked). A second table times the ML-Cache on a larger image (default 32 x 32 = 1024 tokens, 64 steps).
Ours runs on the model as the sampling commands prepare it (`prepare_for_sampling`: fused projections). With
``--compile``, both tables add graph mode (torch.compile, fullgraph, static shapes; inductor on CPU/CUDA): one
untimed warm-up run per configuration compiles the graphs, and its seconds are reported as the compile time.

Model: random weights, the real vocabulary (134548) and a small body (sizes are options), fp32 by default.

    python benchmarks/bench_sampling.py --threads 1          # CPU: about 4 minutes; one thread is steadier on a
                                                             # shared machine (two stall behind other jobs)
    python benchmarks/bench_sampling.py --device cuda --d-model 2048 --layers 16 --heads 16 --grid 32 \
        --cache-batches 1 4
    python benchmarks/bench_sampling.py --threads 1 --layers 8 --tables cache --cache-timesteps 20 \
        --cache-temperature 0 --repeats 3 [--compile]   # the ML-Cache ratio on the d512 x 8 model
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial

import torch

from dimoo_npu.adapters import resolve_device
from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.ops import resolve_ops
from dimoo_npu.sampling import cosine_keep_masked, sample_image
from dimoo_npu.sampling.graph import prepare_for_sampling

VOCAB = 134548
write = sys.stdout.write


def add_model_arguments(parser: argparse.ArgumentParser, layers: int) -> None:
    """The flags `build_model` reads: device, dtype and the random model's sizes."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--mlp", type=int, default=0, help="MLP width (default 8/3 d_model)")


def build_model(args, device: torch.device, compile: bool = False) -> DiMOOModel:
    config = DiMOOConfig(
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        mlp_hidden_size=args.mlp or 8 * args.d_model // 3,
        embedding_size=VOCAB,
        max_sequence_length=8192,
    )
    torch.manual_seed(0)
    model = DiMOOModel(config, ops=resolve_ops(device.type))
    return prepare_for_sampling(model.to(device=device, dtype=getattr(torch, args.dtype)).eval(), compile=compile)


def t2i_prompts(tokens, batch: int, grid: int, prompt_len: int, device) -> tuple[list, list]:
    """Prompts of mixed lengths (prompt_len - 3*i text tokens) and uncond prefixes of mixed lengths."""
    gen = torch.Generator().manual_seed(1)
    rows = torch.full((grid, grid + 1), tokens["mask"])
    rows[:, -1] = tokens["newline"]
    image = [tokens["boa"], tokens["boi"], *rows.reshape(-1).tolist(), tokens["eoi"], tokens["eoa"]]
    prompts, uncond = [], []
    for i in range(batch):
        text = torch.randint(0, 120000, (prompt_len - 3 * i,), generator=gen).tolist()
        prompts.append(torch.tensor(text + image, device=device))
        uncond.append(torch.randint(0, 120000, (10 + i,), generator=gen).to(device))
    return prompts, uncond


def naive_sample(model, prompt: torch.Tensor, uncond: torch.Tensor, timesteps: int, cfg_scale: float) -> torch.Tensor:
    """One prompt, the public code's structure: cond and uncond forwards, full-vocabulary logits, greedy."""
    tokens = model.config.special_tokens
    mask, lo = tokens["mask"], tokens["image_offset"]
    hi = lo + tokens["codebook_size"]
    x = prompt[None].clone()
    code_start = int((x[0] == tokens["boi"]).nonzero()[0, 0]) + 1
    vq_mask = x == mask
    keep = cosine_keep_masked(int(vq_mask.sum()), timesteps)
    for step in range(timesteps):
        if not vq_mask.any():
            break
        u = torch.cat([uncond[None], x[:, code_start - 2 :]], dim=1)
        u_mask = torch.cat(
            [torch.zeros(1, uncond.numel(), dtype=torch.bool, device=x.device), vq_mask[:, code_start - 2 :]], 1
        )
        cond_logits = model(x)[..., lo:hi][vq_mask]  # (M, C) from (1, L, V)
        uncond_logits = model(u)[..., lo:hi][u_mask]
        logits = (1 + cfg_scale) * cond_logits - cfg_scale * uncond_logits
        sampled = logits.argmax(-1)
        conf = torch.softmax(logits, -1).gather(-1, sampled[:, None])[:, 0]
        index = vq_mask[0].nonzero()[:, 0]
        x[0, index] = sampled + lo
        score = torch.log(conf.clamp_min(1e-20))
        cutoff = score.sort().values[min(keep[step], index.numel() - 1)]
        x[0, index[score < cutoff]] = mask
        vq_mask = x == mask
    cells = x[0, code_start:-2]
    return cells[cells != tokens["newline"]]


def timed(backend, fn, repeats: int):
    """(median seconds, last result) over repeats, synchronising the device around each run."""
    times, result = [], None
    for _ in range(repeats):
        backend.synchronize()
        start = time.perf_counter()
        result = fn()
        backend.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def naive_batch(model, prompts, uncond, timesteps: int, cfg_scale: float) -> torch.Tensor:
    return torch.stack([naive_sample(model, p, u, timesteps, cfg_scale) for p, u in zip(prompts, uncond, strict=True)])


def ours(model, prompts, uncond, timesteps: int, cfg_scale: float, temperature: float, use_cache: bool):
    generators = [torch.Generator(prompts[0].device).manual_seed(i) for i in range(len(prompts))]
    return sample_image(
        model,
        prompts,
        uncond_ids=uncond,
        timesteps=timesteps,
        temperature=temperature,
        cfg_scale=cfg_scale,
        use_cache=use_cache,
        generator=generators,
    )


def variants(models: dict) -> list[tuple[str, DiMOOModel, bool]]:
    """(label, model, cache) of every configuration of ours: eager, then compiled when asked."""
    return [
        (f"ours, {kind}, cache {'on' if cache else 'off'}", model, cache)
        for kind, model in models.items()
        for cache in (False, True)
    ]


def timed_ours(backend, run, repeats: int, compiled: bool) -> tuple[float, torch.Tensor, float]:
    """(median seconds, output, warm-up seconds): a compiled configuration first runs once untimed to compile."""
    warmup = timed(backend, run, 1)[0] if compiled else 0.0
    seconds, out = timed(backend, run, repeats)
    return seconds, out, warmup


def batching_table(args, models, backend, device) -> bool:
    """Naive vs ours (cache off and on), greedy; returns whether ours without cache equals naive everywhere."""
    model = models["eager"]
    write(
        f"\n## naive vs batched: {args.grid}x{args.grid} grid, {args.timesteps} steps, cfg {args.cfg}, greedy\n"
        "| batch | sampler | seconds | images/s | vs naive | greedy output | compile s |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    identical = True
    for batch in args.batches:
        prompts, uncond = t2i_prompts(model.config.special_tokens, batch, args.grid, args.prompt_len, device)
        naive_s, naive_out = timed(backend, partial(naive_batch, model, prompts, uncond, args.timesteps, args.cfg), 1)
        write(
            f"| {batch} | naive (per prompt, cond+uncond, full vocab) | {naive_s:.2f} | {batch / naive_s:.3f} "
            "| 1.00x | reference | |\n"
        )
        for label, variant, cache in variants(models):
            run = partial(ours, variant, prompts, uncond, args.timesteps, args.cfg, 0.0, cache)
            seconds, out, warmup = timed_ours(backend, run, args.repeats, variant is not model)
            same = torch.equal(out, naive_out)
            identical &= same or cache
            check = "identical" if same else f"{(out == naive_out).float().mean().item():.1%} of tokens agree"
            compile_s = f"{warmup:.1f}" if warmup else ""
            write(
                f"| {batch} | {label} | {seconds:.2f} | {batch / seconds:.3f} | "
                f"{naive_s / seconds:.2f}x | {check} | {compile_s} |\n"
            )
    return identical


def cache_table(args, models, backend, device) -> None:
    grid, steps = args.cache_grid, args.cache_timesteps
    write(
        f"\n## ML-Cache: {grid}x{grid} grid ({grid * grid} image tokens), {steps} steps, cfg {args.cfg}, "
        f"temperature {args.cache_temperature}, cache_ratio 0.9 warmup 0.3 refresh 5; seconds: median of "
        f"{args.repeats} (min-max)\n"
        "| batch | forward | cache off s | cache on s | images/s off | images/s on | speedup |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    for batch in args.cache_batches:
        prompts, uncond = t2i_prompts(models["eager"].config.special_tokens, batch, grid, args.prompt_len, device)
        for kind, model in models.items():
            seconds, spread = {}, {}
            for cache in (False, True):
                run = partial(ours, model, prompts, uncond, steps, args.cfg, args.cache_temperature, cache)
                if kind != "eager":
                    timed(backend, run, 1)  # compile
                times = [timed(backend, run, 1)[0] for _ in range(args.repeats)]
                seconds[cache], spread[cache] = statistics.median(times), f"{min(times):.2f}-{max(times):.2f}"
            write(
                f"| {batch} | {kind} | {seconds[False]:.2f} ({spread[False]}) | {seconds[True]:.2f} ({spread[True]}) "
                f"| {batch / seconds[False]:.3f} | {batch / seconds[True]:.3f} "
                f"| {seconds[False] / seconds[True]:.2f}x |\n"
            )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, layers=6)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--grid", type=int, default=16, help="grid side of the naive-vs-batched table")
    parser.add_argument("--timesteps", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--cache-grid", type=int, default=32, help="grid side of the ML-Cache table (0: skip)")
    parser.add_argument("--cache-timesteps", type=int, default=64)
    parser.add_argument("--cache-batches", type=int, nargs="+", default=[1])
    parser.add_argument("--cache-temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=1, help="runs of our sampler per cell (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="also time graph mode (torch.compile)")
    parser.add_argument("--tables", default="batching,cache", help="which tables: batching, cache or both")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backend, device = resolve_device(args.device)
    models = {"eager": build_model(args, device)}
    if args.compile:
        models["compiled"] = build_model(args, device, compile=True)
    model = models["eager"]
    write(
        f"device {device}, {torch.get_num_threads()} threads, {args.dtype}; model d_model {args.d_model}, "
        f"{args.layers} layers, {args.heads} heads, mlp {model.config.mlp_hidden_size}, vocab {VOCAB}; "
        f"load average {os.getloadavg()[0]:.1f} (other jobs on this machine slow every figure alike)\n"
    )
    tables = args.tables.split(",")
    identical = True
    with torch.inference_mode():
        if "batching" in tables:
            identical = batching_table(args, models, backend, device)
        if args.cache_grid and "cache" in tables:
            cache_table(args, models, backend, device)
    write(
        f"\ngreedy output of ours (cache off) identical to naive: {identical}; "
        f"load average at the end {os.getloadavg()[0]:.1f}\n"
    )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
