"""8B dress rehearsal on CPU: an 8B-shaped checkpoint in the public layout, loaded and run as a user would.

Writes a checkpoint shaped like Lumina-DiMOO (LLaDA-8B: d_model 4096, 32 layers, 32 heads, MLP 12288, vocabulary
134548, untied head, rope_theta 500000; bf16 safetensors in ~5 GB shards with an index; the public-layout test
tokenizer and the tiny fixture's VQ-VAE), then, each step in a fresh process so its peak RSS is its own:

1. ``load``: `load_model` of every weight in bf16: wall time and peak RSS growth against the weights' bytes;
2. ``forward``: `load_model(max_layers=N)` (only the embedding, N blocks, final norm and head are read) and one
   forward of a 1024x1024 text-to-image input (4182 tokens) to the image-code logits,
   in fp32 by default (``--dtype``): on a CPU without AVX512-BF16/AMX, bf16 matmuls run several times slower;
3. ``check``: ``dimoo check --layers N --backends cpu-ref,cpu`` on that checkpoint (short seeded input);
4. with ``--quantize w8a16`` / ``w8a8`` (repeatable): ``load-w8a16`` / ``load-w8a8``, step 1 quantizing while it
   loads (`load_model(quantize=...)`, embedding and head kept in bf16): the goal is a peak RSS of at most 9.5 GB.
5. with ``--understand``: ``understand``, the public understanding settings (issue 25): 18 text ids around a
   1024x1024 image (64 x 64 random codes: 4,180 prompt tokens), then a 1024-token answer in 4 blocks of 256 over 128
   steps, greedy, no CFG (`DEFAULTS["understand"]`), on `load_model(max_layers=N)` made ready as `dimoo understand`
   makes it (fused projections). Through the step `sample_text` runs (`_TextRun.step`, block 0) it times an exact
   step, a dual cache-storing step (a block's first) and dual cached steps (the block against the kept K/V, the
   head on the still-masked positions) at the block's middle steps (15-17: head widths 136, 128, 120; the median is
   the mean width of a block's 31 cached steps). Forward hooks on the blocks split each step into per-layer seconds
   and the rest (embedding, final norm, head, sampling); ``projected_seconds`` = the checkpoint's layers x per-layer
   + rest, and the whole answer exact/dual = 128 x exact / (4 x store + 124 x cached). Medians of
   `UNDERSTAND_REPEATS` runs per kind. Not in the default run: at 8B with 2 layers on 2 CPU cores it adds about
   25-30 minutes (six full forwards over 5,206 positions). The small shape runs it on a 256x256 image and a
   64-token answer (`UNDERSTAND_SETTINGS`), to stay quick in the test.
   On a checkpoint kept with --keep, ``--step understand FOLDER N float32`` reruns this step alone (one JSON line).

The shard files are evicted from the page cache (posix_fadvise) before each load, so reads come from disk.
Weights are random: each chunk is a rotated, sign-scrambled slice of one pool of small random bf16 values, so
writing costs little more than the disk. Prints one JSON object of figures; deletes the checkpoint unless --keep.

    python scripts/rehearse_8b.py [--out DIR] [--layers 2] [--keep] [--shape 8b|small] [--quantize w8a8 ...]
                                  [--understand]

``--shape small`` runs the same steps on a tiny shape with the real vocabulary (tests/unit/test_rehearsal.py).
Out of the default test suite: the 8B run writes 16 GB and needs ~18 GB of free memory for step 1.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
VOCAB = 134548
SHAPES = {
    "8b": {"d_model": 4096, "n_layers": 32, "n_heads": 32, "mlp_hidden_size": 12288, "shard_bytes": 5_000_000_000},
    "small": {"d_model": 64, "n_layers": 2, "n_heads": 4, "mlp_hidden_size": 128, "shard_bytes": 8_000_000},
}
CHUNK = 16 << 20  # elements written per chunk
WIDTH, HEIGHT = 1024, 1024
PROMPT_TOKENS = 18  # text ids behind issue 12's figures: 18 + 64 rows x 65 + 4 = 4182 (1024x1024), 4678 (1536x768)
UNDERSTAND_REPEATS = 3  # timed runs of each step kind of the ``understand`` step (the median is reported)
# The ``understand`` step's settings by shape: the public ones (`DEFAULTS["understand"]`) on the 8B shape, few
# positions on the small one (its real-vocabulary head over a block costs seconds per step).
UNDERSTAND_SETTINGS = {
    "8b": {"image_side": 1024, "gen_length": 1024, "block_length": 256, "steps": 128},
    "small": {"image_side": 256, "gen_length": 64, "block_length": 16, "steps": 32},
}

logger = logging.getLogger("rehearse_8b")


def public_config(shape: str) -> dict:
    """The fixture's public-layout config.json with the sizes of ``shape`` (LLaDA-8B's for "8b")."""
    config = json.loads((FIXTURES / "tiny-dimoo" / "checkpoint" / "config.json").read_text())
    sizes = {k: v for k, v in SHAPES[shape].items() if k != "shard_bytes"}
    config.update(sizes, n_kv_heads=sizes["n_heads"], embedding_size=VOCAB, vocab_size=VOCAB)
    config.update(rope_theta=500000.0, max_sequence_length=4096, weight_tying=False, torch_dtype="bfloat16")
    return config


def weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every weight's name and shape in module order (embedding, blocks, final norm, head), as shards hold them."""
    from dimoo_npu.model import DiMOOModel
    from dimoo_npu.modeling.config import DiMOOConfig

    with torch.device("meta"):
        model = DiMOOModel(DiMOOConfig.from_dict(config))
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


@functools.cache
def _pool() -> np.ndarray:
    """CHUNK random bf16 bit patterns with |x| in [2^-7, 2^-5) (mean |x| ~ 0.018, like LLaDA's init std 0.02)."""
    return np.random.default_rng(0).integers(0, 1 << 16, CHUNK, dtype=np.uint16) & 0x80FF | 0x3C00


def _write_tensor(handle, name: str, numel: int, rng: np.random.Generator) -> None:
    if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
        ones = np.full(min(numel, CHUNK), 0x3F80, dtype=np.uint16)  # bf16 1.0
        for first in range(0, numel, CHUNK):
            handle.write(ones[: min(CHUNK, numel - first)].tobytes())
        return
    for first in range(0, numel, CHUNK):
        count = min(CHUNK, numel - first)
        offset, key = int(rng.integers(CHUNK)), np.uint16(rng.integers(1 << 16) & 0x807F)
        chunk = np.roll(_pool(), offset)[:count] ^ key  # sign and mantissa scrambled: still in [2^-7, 2^-5)
        handle.write(chunk.tobytes())


def _write_shard(path: Path, tensors: dict[str, tuple[int, ...]], seed: int) -> None:
    header, start = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors.items():
        nbytes = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [start, start + nbytes]}
        start += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for name, shape in tensors.items():
            _write_tensor(handle, name, int(np.prod(shape)), rng)


def write_checkpoint(folder: Path, shape: str) -> dict:
    """The checkpoint in the public layout; returns its figures (bytes, shards, seconds)."""
    from dimoo_npu.checkpoint import INDEX_NAME
    from dimoo_npu.files.atomic import write_atomically, write_text_atomically

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    config = public_config(shape)
    shapes = weight_shapes(config)
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, dims in shapes.items():
        nbytes = int(np.prod(dims)) * 2
        if shards[-1] and size + nbytes > SHAPES[shape]["shard_bytes"]:
            shards.append({})
            size = 0
        shards[-1][name] = dims
        size += nbytes
    weight_map = {}
    for i, tensors in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_atomically(folder / name, lambda tmp, tensors=tensors, i=i: _write_shard(tmp, tensors, i))
        weight_map.update(dict.fromkeys(tensors, name))
    total = sum(int(np.prod(dims)) * 2 for dims in shapes.values())
    write_text_atomically(
        folder / INDEX_NAME, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    write_text_atomically(folder / "config.json", json.dumps(config, indent=2))
    shutil.copy(FIXTURES / "tiny-dimoo" / "checkpoint" / "generation_config.json", folder)
    shutil.copytree(FIXTURES / "tiny-dimoo" / "checkpoint" / "vqvae", folder / "vqvae")
    tokenizer = FIXTURES / "public-tokenizer"
    for path in tokenizer.glob("*.json") if tokenizer.is_dir() else ():
        shutil.copy(path, folder)
    params = sum(int(np.prod(dims)) for dims in shapes.values())
    return {
        "parameters": params,
        "weights_bytes": total,
        "shards": len(shards),
        "tokenizer": tokenizer.is_dir(),
        "write_seconds": round(time.perf_counter() - started, 1),
    }


# ---- steps, each run in a child process (`--step NAME FOLDER LAYERS`) ----


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _evict(folder: Path) -> None:
    """Drop the shards from the page cache so the load reads the disk (only these files; no root needed)."""
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _start_measuring() -> int:
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    return before


def step_load(folder: Path, layers: int, dtype: str, quantize: str | None = None) -> dict:
    from dimoo_npu.checkpoint import load_model
    from dimoo_npu.quantization import weight_bytes

    _evict(folder)
    before = _start_measuring()
    started = time.perf_counter()
    model = load_model(folder, dtype=torch.bfloat16, quantize=quantize)
    seconds = time.perf_counter() - started
    weights = weight_bytes(model)  # int8 weights and their scales are buffers, not parameters
    growth = (_status_kib("VmHWM") - before) * 1024
    return {
        **({"quantize": quantize} if quantize else {}),
        "seconds": round(seconds, 1),
        "weights_bytes": weights,
        "read_gb_per_s": round(weights / seconds / 1e9, 3),
        "peak_rss_growth_bytes": growth,
        "peak_rss_growth_over_weights": round(growth / weights, 3),
    }


def t2i_input(config) -> tuple[torch.Tensor, int]:
    """The 1024x1024 text-to-image input (every image cell MASK, rows with end-of-line) and its first cell's index.

    The text part is ``PROMPT_TOKENS`` random text ids, so the input has the 4182 tokens of the public default
    size whatever tokenizer the checkpoint has (the test tokenizer encodes the template into more tokens).
    """
    from dimoo_npu.tokens import sequences
    from dimoo_npu.tokens.image_prep import PIXELS_PER_CELL

    tokens = config.special_tokens
    prompt = torch.randint(0, tokens["eos"], (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0))
    grid = (HEIGHT // PIXELS_PER_CELL, WIDTH // PIXELS_PER_CELL)
    request = sequences.generation_prompt(prompt, None, sequences.masked_cells(grid, tokens), tokens)
    return request.prompt, request.code_start


def step_forward(folder: Path, layers: int, dtype: str) -> dict:
    from dimoo_npu.checkpoint import load_model

    _evict(folder)
    before = _start_measuring()
    started = time.perf_counter()
    model = load_model(folder, dtype=getattr(torch, dtype), max_layers=layers)
    load_seconds = time.perf_counter() - started
    config = model.config
    ids, code_start = t2i_input(config)
    rows, cols = HEIGHT // 16, WIDTH // 16
    cells = code_start + torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)  # skip end-of-line ids
    offset = config.special_tokens["image_offset"]
    vocab = (offset, offset + config.special_tokens["codebook_size"])
    started = time.perf_counter()
    with torch.no_grad():
        logits = model(ids[None], logits_for=cells.reshape(1, -1), vocab_range=vocab)
    seconds = time.perf_counter() - started
    return {
        "layers": layers,
        "dtype": dtype,
        "load_seconds": round(load_seconds, 1),
        "weights_read_bytes": sum(p.numel() * 2 for p in model.parameters()),  # bf16 bytes on disk
        "tokens": len(ids),
        "logits_shape": list(logits.shape),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "forward_seconds": round(seconds, 1),
        "peak_rss_growth_bytes": (_status_kib("VmHWM") - before) * 1024,
    }


def step_check(folder: Path, layers: int, dtype: str) -> dict:
    from dimoo_npu.cli import main

    out = folder / "check.json"
    argv = ["check", "--checkpoint", str(folder), "--layers", str(layers), "--backends", "cpu-ref,cpu"]
    before = _start_measuring()
    started = time.perf_counter()
    code = main([*argv, "--length", "64", "--json", str(out)])
    seconds = time.perf_counter() - started
    report = json.loads(out.read_text()) if out.is_file() else {}
    layers_report = report.get("backends", {}).get("cpu", {}).get("layers", [])
    return {
        "command": "dimoo " + " ".join(argv) + " --length 64",
        "exit_code": code,
        "passed": report.get("passed"),
        "max_abs_by_layer": {row["layer"]: row["max_abs"] for row in layers_report},
        "seconds": round(seconds, 1),
        "peak_rss_growth_bytes": (_status_kib("VmHWM") - before) * 1024,
    }


def understanding_input(config, side: int, gen_length: int) -> torch.Tensor:
    """The understanding input: ``PROMPT_TOKENS`` random text ids around a side x side image of random codes (the
    image before the last text id), then BOA + ``gen_length`` MASK + EOA."""
    from dimoo_npu.tokens import sequences
    from dimoo_npu.tokens.image_prep import PIXELS_PER_CELL

    tokens = config.special_tokens
    generator = torch.Generator().manual_seed(0)
    question = torch.randint(0, tokens["eos"], (PROMPT_TOKENS,), generator=generator)
    grid = (side // PIXELS_PER_CELL, side // PIXELS_PER_CELL)
    codes = torch.randint(0, tokens["codebook_size"], grid, generator=generator)
    return sequences.understanding(question, codes, gen_length, tokens)[0]


class _BlockClock:
    """Seconds of each block's forward (pre- and post-forward hooks; CPU ops run synchronously)."""

    def __init__(self, model) -> None:
        self.seconds: list[float] = []
        for block in model.transformer.blocks.values():
            block.register_forward_pre_hook(self._start)
            block.register_forward_hook(self._stop)

    def _start(self, module, args) -> None:
        self._started = time.perf_counter()

    def _stop(self, module, args, output) -> None:
        self.seconds.append(time.perf_counter() - self._started)

    def measure(self, step, *args) -> tuple[float, list[float]]:
        """``step(*args)``'s seconds and its blocks' seconds."""
        self.seconds = []
        started = time.perf_counter()
        step(*args)
        seconds = time.perf_counter() - started
        blocks, self.seconds = self.seconds, []
        return seconds, blocks


def _block_run(model, ids: torch.Tensor, kv_cache: str, settings: dict):
    """A `sample_text` run's state, laid out as `text_task` lays it out, and block 0's step arguments: positions
    (1, K), then per step its reveal counts (1,), kind and head width."""
    from dimoo_npu.sampling.text import _TextRun, text_task

    task = text_task(model, ids[None], kv_cache=kv_cache, **settings)
    run = _TextRun(
        model, task.x, task.real, settings["cfg_scale"], settings["temperature"], task.generators, task.prompt, kv_cache
    )
    return run, task.answer[:, : settings["block_length"]], task.counts[0], task.widths[0], task.kinds


def _step_figures(timings: list[tuple[float, list[float]]], layers: int, full_layers: int) -> dict:
    """Median seconds of one step kind, split into per-layer seconds and the rest, projected to ``full_layers``."""
    per_layer = statistics.median(sum(blocks) / layers for _, blocks in timings)
    rest = statistics.median(total - sum(blocks) for total, blocks in timings)
    return {
        "seconds": [round(total, 3) for total, _ in timings],
        "block_seconds": [[round(b, 3) for b in blocks] for _, blocks in timings],
        "median_seconds": round(statistics.median(total for total, _ in timings), 3),
        "per_layer_seconds": round(per_layer, 4),
        "rest_seconds": round(rest, 4),
        "projected_seconds": round(full_layers * per_layer + rest, 3),
    }


def answer_ratio(exact: float, store: float, cached: float, blocks: int, per_block: int) -> float:
    """Whole-answer seconds exact / dual: every step exact, against one storing step and the rest cached per block."""
    return blocks * per_block * exact / (blocks * store + blocks * (per_block - 1) * cached)


def step_understand(folder: Path, layers: int, dtype: str, shape: str = "8b") -> dict:
    from dimoo_npu.checkpoint import load_model
    from dimoo_npu.sampling.graph import prepare_for_sampling
    from dimoo_npu.sampling.record import sampling_context
    from dimoo_npu.settings.generation_settings import DEFAULTS

    public = DEFAULTS["understand"]
    settings = {"temperature": public["temperature"], "cfg_scale": public["cfg_scale"], **UNDERSTAND_SETTINGS[shape]}
    side = settings.pop("image_side")
    blocks = settings["gen_length"] // settings["block_length"]
    per_block = settings["steps"] // blocks
    middle = range(
        per_block // 2 - UNDERSTAND_REPEATS // 2, per_block // 2 - UNDERSTAND_REPEATS // 2 + UNDERSTAND_REPEATS
    )
    full_layers = json.loads((folder / "config.json").read_text())["n_layers"]
    _evict(folder)
    before = _start_measuring()
    started = time.perf_counter()
    model = prepare_for_sampling(load_model(folder, dtype=getattr(torch, dtype), max_layers=layers), compile=False)
    load_seconds = time.perf_counter() - started
    ids = understanding_input(model.config, side, settings["gen_length"])
    clock = _BlockClock(model)
    timings: dict[str, list] = {"exact": [], "store": [], "cached": []}
    with sampling_context(False):
        for mode, kind in (("none", "exact"), ("dual", "store")):  # a block's first step, from the same tokens
            run, positions, counts, widths, kinds = _block_run(model, ids, mode, settings)
            start = run.x.clone()
            for _ in range(UNDERSTAND_REPEATS):
                run.x.copy_(start)
                timings[kind].append(clock.measure(run.step, positions, counts[:, 0], kinds[0], widths[0]))
        # the dual run's steps 1 .. middle - 1 as one cached step (as many tokens revealed), then the middle steps
        run.step(positions, counts[:, 1 : middle[0]].sum(1), kinds[1], widths[1])
        for step in middle:
            timings["cached"].append(clock.measure(run.step, positions, counts[:, step], kinds[step], widths[step]))
    figures = {kind: _step_figures(times, layers, full_layers) for kind, times in timings.items()}
    figures["cached"]["steps"] = list(middle)
    figures["cached"]["head_widths"] = [widths[step] for step in middle]
    return {
        "layers": layers,
        "projected_layers": full_layers,
        "dtype": dtype,
        "image_side": side,
        "settings": settings,
        "tokens": ids.numel(),
        "prompt_tokens": ids.numel() - settings["gen_length"] - 2,
        "load_seconds": round(load_seconds, 1),
        **figures,
        "exact_over_dual_measured": round(
            answer_ratio(*(figures[k]["median_seconds"] for k in timings), blocks, per_block), 3
        ),
        "exact_over_dual_projected": round(
            answer_ratio(*(figures[k]["projected_seconds"] for k in timings), blocks, per_block), 3
        ),
        "peak_rss_growth_bytes": (_status_kib("VmHWM") - before) * 1024,
    }


STEPS = {"load": step_load, "forward": step_forward, "check": step_check, "understand": step_understand}
STEPS["understand-small"] = functools.partial(step_understand, shape="small")
STEPS.update({f"load-{scheme}": functools.partial(step_load, quantize=scheme) for scheme in ("w8a16", "w8a8")})


def run_step(name: str, folder: Path, layers: int, dtype: str, fresh_process: bool = True) -> dict:
    """One step in a fresh Python process (its peak RSS is then its own); its figures back."""
    if not fresh_process:
        return STEPS[name](folder, layers, dtype)
    command = [sys.executable, __file__, "--step", name, str(folder), str(layers), dtype]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def rehearse(
    out: Path | None,
    shape: str,
    layers: int,
    keep: bool,
    dtype: str = "float32",
    fresh_processes: bool = True,
    quantize: tuple[str, ...] = (),
    understand: bool = False,
) -> dict:
    """Every step on a fresh checkpoint under ``out``; the figures as one dict.

    ``fresh_processes=False`` runs the steps in this process (the test's shortcut: peak RSS is then shared).
    """
    parent = out or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    config = public_config(shape)
    if not 1 <= layers <= config["n_layers"]:
        raise SystemExit(f"--layers {layers} must be between 1 and {config['n_layers']}")
    disk = sum(int(np.prod(dims)) * 2 for dims in weight_shapes(config).values())
    if shutil.disk_usage(parent).free < disk * 1.05:
        raise SystemExit(
            f"{parent} has {shutil.disk_usage(parent).free / 1e9:.1f} GB free; the checkpoint needs "
            f"{disk / 1e9:.1f} GB: pass --out on a larger disk"
        )
    folder = Path(tempfile.mkdtemp(prefix=f"dimoo-rehearsal-{shape}-", dir=parent))
    try:
        figures = {"shape": shape, "checkpoint": str(folder), **write_checkpoint(folder, shape)}
        needed = figures["weights_bytes"] * 1.1 + (1 << 30)
        if _mem_available() < needed:
            figures["load"] = {
                "skipped": f"needs ~{needed / 1e9:.1f} GB free, {_mem_available() / 1e9:.1f} GB available"
            }
        else:
            figures["load"] = run_step("load", folder, layers, dtype, fresh_processes)
        figures["forward"] = run_step("forward", folder, layers, dtype, fresh_processes)
        figures["check"] = run_step("check", folder, layers, dtype, fresh_processes)
        for scheme in quantize:
            figures[f"load-{scheme}"] = run_step(f"load-{scheme}", folder, layers, dtype, fresh_processes)
        if understand:
            name = "understand" if shape == "8b" else f"understand-{shape}"
            figures["understand"] = run_step(name, folder, layers, dtype, fresh_processes)
        return figures
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="parent folder of the checkpoint (default: the system temp folder)")
    parser.add_argument("--layers", type=int, default=2, help="blocks for the forward and the check (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (default: delete it at the end)")
    parser.add_argument("--shape", choices=SHAPES, default="8b", help="8b (default) or small (the test's)")
    parser.add_argument("--dtype", default="float32", help="dtype of the forward step (default float32)")
    parser.add_argument(
        "--quantize", action="append", default=[], choices=("w8a16", "w8a8"), help="also load quantizing (repeatable)"
    )
    parser.add_argument(
        "--understand", action="store_true", help="also time understanding steps exact vs dual (8B: ~25-30 min)"
    )
    parser.add_argument("--step", nargs=4, metavar=("NAME", "FOLDER", "LAYERS", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.step:
        name, folder, layers, dtype = args.step
        sys.stdout.write(json.dumps(STEPS[name](Path(folder), int(layers), dtype)) + "\n")
        return 0
    figures = rehearse(
        args.out,
        args.shape,
        args.layers,
        args.keep,
        args.dtype,
        quantize=tuple(args.quantize),
        understand=args.understand,
    )
    sys.stdout.write(json.dumps(figures, indent=2) + "\n")
    return 0 if all("error" not in figures[step] for step in STEPS if step in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
