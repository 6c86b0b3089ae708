"""One section of the prepared GPU run (benchmarks/gpu_run.sh); each writes its own JSON, the driver merges them.

    python benchmarks/gpu_bench.py goldens --device cuda --out goldens.json
    python benchmarks/gpu_bench.py sampling --device cuda --out sampling.json [--tiny] [--steps 8]
    python benchmarks/gpu_bench.py naive --device cuda --out naive.json [--tiny]
    python benchmarks/gpu_bench.py int8 --device cuda --out int8.json [--tiny] [--steps 4]

goldens: every sampling golden of tests/fixtures/tiny-dimoo on the device, fp32 greedy tokens exact and bf16 tokens
compared (agreement reported), each sampler step run under ``torch.cuda.set_sync_debug_mode("error")`` (a step that
reads the device back fails the case; a call's setup may read, its steps may not).
sampling: an 8B-shaped model (d4096, 32 layers, 32 heads, MLP 12288, the real vocabulary 134548) with random bf16
weights made on the device; text-to-image 1024x1024 (a 64x64 code grid), CFG 4, batch 1 and 4, ML-Cache off and
on, eager and one compiled configuration. Each configuration times its steps after a warm-up step (full and cached
steps apart) and extrapolates to the 64-step default schedule (warmup 0.3, refresh 5). Achieved TFLOP/s counts the
matmuls of the forward (projections, attention, the head's rows); MFU is against a bf16 matmul timed in the same run.
naive: the public code's structure (one prompt, cond and uncond forwards, full-vocabulary logits) for a few steps.
int8: the cuda int8 kernel (torch._int_mm) against the reference op, and the 8B-shaped step in bf16, w8a8, w8a16.
``--tiny``: a d64 x 2 model and a 8x8 grid, to dry-run the whole script on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dimoo_npu.model import DiMOOModel  # noqa: E402
from dimoo_npu.modeling.config import DiMOOConfig  # noqa: E402
from dimoo_npu.numerics.golden import greedy_sampling_case  # noqa: E402
from dimoo_npu.ops import resolve_ops  # noqa: E402
from dimoo_npu.sampling import image as image_sampling  # noqa: E402
from dimoo_npu.sampling import refresh_steps, sample_image  # noqa: E402
from dimoo_npu.sampling import text as text_sampling  # noqa: E402
from dimoo_npu.sampling.graph import prepare_for_sampling  # noqa: E402

VOCAB = 134548
FULL_SCHEDULE = 64


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def steps_without_syncs(device: torch.device):
    """Every sampler step (image and text) under set_sync_debug_mode("error") on CUDA; nothing elsewhere."""
    if device.type != "cuda":
        yield False
        return
    originals = (image_sampling._Run.step, text_sampling._TextRun.step)

    def strict(step):
        def run(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return step(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        return run

    image_sampling._Run.step, text_sampling._TextRun.step = (strict(fn) for fn in originals)
    try:
        yield True
    finally:
        image_sampling._Run.step, text_sampling._TextRun.step = originals


def save(args, device: torch.device, partial: dict) -> None:
    """Write what a section has so far: a section cut by its time guard still leaves its finished parts."""
    result = {"section": args.section, "device": str(device), "torch": torch.__version__, **partial}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    Path(args.out).write_text(json.dumps(result, indent=1))


def goldens(args, device: torch.device) -> dict:
    from safetensors.torch import load_file

    import dimoo_npu

    fixtures = ROOT / "tests" / "fixtures" / "tiny-dimoo"
    golden = load_file(str(fixtures / "golden.safetensors"))
    cases = json.loads((fixtures / "cases.json").read_text())["cases"]
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = prepare_for_sampling(dimoo_npu.load_model(fixtures / "checkpoint", device=device, dtype=dtype))
        with steps_without_syncs(device) as strict:
            for name, case in cases.items():
                if case.get("kind") not in ("t2i", "i2i", "mmu"):
                    continue
                try:
                    out, expected = greedy_sampling_case(model, golden, name, case)
                    agree = float((out.cpu() == expected).float().mean())
                    error = None
                except RuntimeError as err:  # a sync inside a step, under "error"
                    agree, error = 0.0, str(err).splitlines()[0]
                results[f"{name} {str(dtype).removeprefix('torch.')}"] = {
                    "tokens_equal": agree == 1.0,
                    "agreement": agree,
                    "steps_sync_free_checked": strict,
                    "error": error,
                }
                save(args, device, {"cases": results, "complete": False})
    fp32_exact = all(r["tokens_equal"] for k, r in results.items() if k.endswith("float32"))
    no_errors = not any(r["error"] for r in results.values())
    return {"cases": results, "fp32_exact": fp32_exact, "no_errors": no_errors, "complete": True}


def big_config(tiny: bool) -> DiMOOConfig:
    if tiny:
        return DiMOOConfig(
            d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=192, embedding_size=VOCAB, max_sequence_length=8192
        )
    return DiMOOConfig(
        d_model=4096, n_layers=32, n_heads=32, mlp_hidden_size=12288, embedding_size=VOCAB, max_sequence_length=8192
    )


def build_big(args, device: torch.device) -> DiMOOModel:
    """Random bf16 weights made directly on the device (no host copy of 16 GB)."""
    config = big_config(args.tiny)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        return DiMOOModel(config, ops=resolve_ops(device.type)).to(dtype).eval()  # nn defaults' random init


class StepTimer:
    """Times each sampler step by mode (synchronising around it) and stops the call after ``limit`` steps."""

    class Done(Exception):
        pass

    def __init__(self, device: torch.device, limit: int):
        self.device, self.limit, self.times = device, limit, []

    def __enter__(self):
        original = self.original = image_sampling._Run.step
        timer = self

        def step(run, bounds, keep, cache, mode, recompute):
            synchronize(timer.device)
            start = time.perf_counter()
            original(run, bounds, keep, cache, mode, recompute)
            synchronize(timer.device)
            timer.times.append((mode, time.perf_counter() - start))
            if len(timer.times) >= timer.limit:
                raise StepTimer.Done

        image_sampling._Run.step = step
        return self

    def __exit__(self, *exc):
        image_sampling._Run.step = self.original
        return exc[0] is StepTimer.Done


def prompts_for(model, batch: int, grid: int, device: torch.device):
    from bench_sampling import t2i_prompts

    return t2i_prompts(model.config.special_tokens, batch, grid, 64, device)


def time_steps(
    model, prompts, uncond, use_cache: bool, steps: int, temperature: float, device: torch.device
) -> dict[str, float]:
    """Median seconds of each kind of step ('full' and 'cached'), after one untimed warm-up step of each kind."""
    # warmup 0.05 and refresh 5 put cached steps early; a step's cost does not depend on where it falls
    kwargs = dict(uncond_ids=uncond, timesteps=FULL_SCHEDULE, temperature=temperature, cfg_scale=4.0)
    kwargs.update(use_cache=use_cache)
    kwargs.update(warmup_ratio=0.05, refresh_interval=5)
    generators = [torch.Generator(device).manual_seed(i) for i in range(len(prompts))]
    with torch.inference_mode(), StepTimer(device, steps + 3) as timer:
        sample_image(model, prompts, generator=generators, **kwargs)
    seen: dict[str, list[float]] = {}
    for mode, seconds in timer.times:
        seen.setdefault("cached" if mode == "cached" else "full", []).append(seconds)
    return {kind: sorted(times[1:] or times)[len(times[1:] or times) // 2] for kind, times in seen.items()}


def matmul_tflops(device: torch.device, tiny: bool) -> float:
    """bf16 (fp32 on CPU) matmul throughput measured here: the MFU denominator."""
    size = 1024 if tiny else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    repeats = 3 if tiny else 20
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def forward_flops(config: DiMOOConfig, rows: int, queries: int, keys: int, head_rows: int) -> float:
    """Matmul FLOPs of one forward: q/k/v/out and MLP projections, attention scores and values, the head's rows."""
    d, hidden, layers = config.d_model, config.mlp_hidden_size, config.n_layers
    projections = 2 * rows * queries * (4 * d * d + 3 * d * hidden)
    attention = 2 * 2 * rows * queries * keys * d
    head = 2 * head_rows * d * 8192
    return layers * (projections + attention) + head


def sampling(args, device: torch.device) -> dict:
    model = prepare_for_sampling(build_big(args, device))
    config = model.config
    grid = 8 if args.tiny else 64
    peak = matmul_tflops(device, args.tiny)
    schedule = refresh_steps(FULL_SCHEDULE, True, 0.3, 5)
    full_steps, cached_steps = sum(schedule), FULL_SCHEDULE - sum(schedule)
    results = []
    summary = {
        "model": {"d_model": config.d_model, "layers": config.n_layers, "mlp": config.mlp_hidden_size, "vocab": VOCAB},
        "grid": grid,
        "temperature": args.temperature,
        "schedule": {"steps": FULL_SCHEDULE, "full": full_steps, "cached": cached_steps},
        "matmul_tflops": peak,
        "results": results,
    }
    configurations = [(b, cache, False) for b in (1, 4) for cache in (False, True)] + [(1, True, True)]
    for batch, use_cache, compiled in configurations:
        if compiled:
            from dimoo_npu.sampling.graph import compile_forward

            compile_forward(model)
        prompts, uncond = prompts_for(model, batch, grid, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        per_step = time_steps(model, prompts, uncond, use_cache, args.steps, args.temperature, device)
        wall = time.perf_counter() - start
        full = per_step["full"]
        cached = per_step.get("cached", full)
        total = full * (full_steps if use_cache else FULL_SCHEDULE) + (cached * cached_steps if use_cache else 0)
        rows, length = 2 * batch, prompts[0].numel() + uncond[0].numel()
        recompute = int(0.1 * (length - 1)) + 1
        flops = forward_flops(config, rows, length, length, rows * grid * grid)
        cached_flops = forward_flops(config, rows, recompute, length, rows * recompute)
        results.append(
            {
                "batch": batch,
                "ml_cache": use_cache,
                "forward": "compiled" if compiled else "eager",
                "full_step_s": full,
                "cached_step_s": per_step.get("cached"),
                "extrapolated_64_steps_s": total,
                "images_per_s": batch / total,
                "full_step_tflops": flops / full / 1e12,
                "full_step_mfu": flops / full / 1e12 / peak,
                "cached_step_tflops": cached_flops / cached / 1e12 if use_cache else None,
                "measured_wall_s": wall,
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            }
        )
        print(json.dumps(results[-1]), flush=True)
        save(args, device, {**summary, "complete": False})
    return {**summary, "complete": True}


def naive(args, device: torch.device) -> dict:
    from bench_sampling import naive_sample

    model = build_big(args, device)
    grid = 8 if args.tiny else 64
    prompts, uncond = prompts_for(model, 1, grid, device)
    with torch.inference_mode():
        naive_sample(model, prompts[0], uncond[0], 2, 4.0)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        naive_sample(model, prompts[0], uncond[0], args.naive_steps, 4.0)
        synchronize(device)
    per_step = (time.perf_counter() - start) / args.naive_steps
    return {"batch": 1, "step_s": per_step, "extrapolated_64_steps_s": per_step * FULL_SCHEDULE}


def int8(args, device: torch.device) -> dict:
    """The cuda int8 kernel (`dimoo_npu.ops.torch_impl.quantized_matmul`, torch._int_mm): op parity against the
    reference on the device, the integer product exact against the CPU's, then the 8B-shaped model's full step
    (batch 1, ML-Cache off) and weight memory in bf16, w8a8 and w8a16 (quantized on the device, in place)."""
    from dimoo_npu.numerics.op_parity import DTYPES, op_cases, parity_failure
    from dimoo_npu.ops import torch_impl
    from dimoo_npu.quantization import QuantizationSpec, quantize_model, weight_bytes

    kernel = resolve_ops(device.type).quantized_matmul
    cases = [case for case in op_cases() if case.op == "quantized_matmul"]
    failures = [f for case in cases for dtype in DTYPES if (f := parity_failure(kernel, case, dtype, device))]
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randint(-127, 128, (rows, 4096), generator=generator, dtype=torch.int8) for rows in (33, 96))
    on_device = torch_impl.int8_matmul(a.to(device), b.to(device)).cpu()
    summary = {
        "op_parity_failures": failures,
        "int8_product_exact": bool(torch.equal(on_device, torch_impl.int8_matmul(a, b, use_int_mm=False))),
        "results": [],
    }
    grid = 8 if args.tiny else 64
    for scheme in (None, "w8a8", "w8a16"):
        model = build_big(args, device)
        if scheme:
            quantize_model(model, QuantizationSpec(scheme))
        prepare_for_sampling(model)
        prompts, uncond = prompts_for(model, 1, grid, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        per_step = time_steps(model, prompts, uncond, False, args.steps, args.temperature, device)
        summary["results"].append(
            {
                "weights": scheme or ("bf16" if device.type == "cuda" else "fp32"),
                "full_step_s": per_step["full"],
                "weights_gib": weight_bytes(model) / 2**30,
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            }
        )
        print(json.dumps(summary["results"][-1]), flush=True)
        save(args, device, {**summary, "complete": False})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**summary, "complete": True}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=["goldens", "sampling", "naive", "int8"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="small model and grid: a dry run on a CPU")
    parser.add_argument("--steps", type=int, default=8, help="steps timed per configuration")
    parser.add_argument("--naive-steps", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0, help="of the timed sampling (0: greedy)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    section = {"goldens": goldens, "sampling": sampling, "naive": naive, "int8": int8}[args.section]
    save(args, device, section(args, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
