"""``dimoo bench geneval|dpg PROMPTS --output-dir D``: a benchmark's images in the layout its evaluator reads.

The prompts come from the user's copy of the benchmark (`dimoo_npu.batch.prompt_sets`; nothing is downloaded); the
sampling settings from a named preset (`dimoo_npu.settings.generation_settings.BENCH_PRESETS`), any flag overriding it.
Sample k of the whole run gets seed base + k, so the images do not depend on batching, ranks or resumes. Under
torchrun each rank takes whole prompts (prompt i on rank i mod WORLD_SIZE). ``D/.dimoo-bench.json`` records
what made the folder, so ``--resume`` refuses a folder of another benchmark, prompt file or checkpoint.
Torch-free until `run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from dimoo_npu.batch.batch_requests import Numbered
from dimoo_npu.batch.prompt_sets import DPG_SAMPLES, READERS, BenchPrompt, sample_outputs
from dimoo_npu.batch.resume import FIX, first_difference
from dimoo_npu.commands.generate import add_model_arguments, add_request_arguments, add_write_arguments
from dimoo_npu.settings.generation_settings import BENCH_PRESETS
from dimoo_npu.settings.requests import TextToImageRequest, check, from_mapping, generation_defaults, resolve
from dimoo_npu.utils import envs
from dimoo_npu.utils.errors import InputError
from dimoo_npu.utils.validate import check_seeds, resolved

MARKER = ".dimoo-bench.json"
GENEVAL_SAMPLES = 4  # GenEval's generation scripts' default images per prompt
NOT_FLAGS = ("seed", "prompt", "output")  # set per sample by the benchmark


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("benchmark", choices=sorted(READERS), help="geneval or dpg (DPG-Bench)")
    parser.add_argument(
        "prompts",
        help="your copy of the prompts: GenEval's prompts/evaluation_metadata.jsonl, DPG-Bench's dpg_bench/prompts "
        "folder (nothing is downloaded)",
    )
    parser.add_argument("--output-dir", required=True, help="the folder the benchmark's evaluator reads")
    parser.add_argument(
        "--samples", type=int, help=f"images per prompt (geneval; default {GENEVAL_SAMPLES}; dpg: its 2 x 2 grid)"
    )
    parser.add_argument(
        "--preset",
        default="lumina-dimoo",
        choices=sorted(BENCH_PRESETS),
        help="sampling settings: lumina-dimoo (the public scripts': 1024 x 1024, 64 steps, cfg 4.0, base seed "
        "65513) or checkpoint (its generation_defaults); flags below override it",
    )
    common = parser.add_argument_group("model and run")
    add_model_arguments(common)
    add_write_arguments(common, "bench")
    parser.set_defaults(seed=None)  # the preset's base seed unless given
    sampling = tuple(f.name for f in dataclasses.fields(TextToImageRequest) if f.name not in NOT_FLAGS)
    add_request_arguments(parser.add_argument_group("sampling (overrides the preset)"), "t2i", sampling)


def sample_requests(args: argparse.Namespace, prompts: list[BenchPrompt], samples: int) -> list[Numbered]:
    """Every sample of every prompt, resolved and checked (flags > preset > checkpoint > public defaults)."""
    preset = dict(BENCH_PRESETS[args.preset])
    base_seed = args.seed if args.seed is not None else preset.pop("seed", 0)
    preset.pop("seed", None)
    names = {f.name for f in dataclasses.fields(TextToImageRequest)} - set(NOT_FLAGS)
    given = {**preset, **{k: v for k, v in vars(args).items() if k in names and v is not None}}
    check_seeds(base_seed, len(prompts) * samples)
    defaults = generation_defaults(args.checkpoint)
    every = []
    for i, prompt in enumerate(prompts):
        for j, output in enumerate(sample_outputs(args.benchmark, prompt, samples)):
            index = i * samples + j
            where = f"prompt {prompt.name}"
            fields = {**given, "prompt": prompt.prompt, "output": output, "seed": base_seed + index}
            every.append(Numbered(index, check(resolve(from_mapping("t2i", fields, where), defaults), where)))
    return every


def claim_folder(folder: Path, record: dict[str, Any], resume: bool, overwrite: bool, rank: int) -> None:
    """Refuse a folder made by another bench run (on --resume: naming what differs); rank 0 records this one."""
    marker = folder / MARKER
    if marker.exists():
        if not (resume or overwrite):
            raise InputError(f"{folder} holds a dimoo bench run: pass --resume to continue it, or --overwrite")
        if resume:
            try:
                recorded = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise InputError(f"cannot resume into {folder}: {marker} is unreadable; {FIX}") from None
            difference = first_difference(recorded, record)
            if difference:
                raise InputError(f"cannot resume into {folder}: it was made with another {difference}; {FIX}")
            return
    elif resume and folder.is_dir() and any(folder.iterdir()):
        raise InputError(f"cannot resume into {folder}: it was not made by dimoo bench (no {MARKER}); {FIX}")
    if rank == 0:
        from dimoo_npu.files.atomic import write_text_atomically

        write_text_atomically(folder / MARKER, json.dumps(record, sort_keys=True) + "\n")


def run(args: argparse.Namespace) -> int:
    from dimoo_npu.commands.bench_run import check_geneval_metadata, write_dpg_grids, write_geneval_metadata
    from dimoo_npu.commands.generate_run import GenerationRun, run_images
    from dimoo_npu.pipeline import default_checkpoint

    prompts = READERS[args.benchmark](args.prompts)
    samples = DPG_SAMPLES if args.benchmark == "dpg" else (args.samples or GENEVAL_SAMPLES)
    if args.benchmark == "dpg" and args.samples not in (None, DPG_SAMPLES):
        raise InputError(f"DPG-Bench grids {DPG_SAMPLES} samples per prompt: leave out --samples")
    if samples < 1:
        raise InputError(f"--samples {samples} must be at least 1")
    args.checkpoint = str(args.checkpoint or default_checkpoint())
    every = sample_requests(args, prompts, samples)
    rank, world, local_rank = envs.torchrun_ranks()
    mine_prompts = list(range(len(prompts)))[rank::world]
    bench_run = GenerationRun(
        task="t2i",
        checkpoint=args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_length=args.max_length,
        compile=args.compile or None,
        overwrite=args.overwrite,
        output=None,
        from_batch_file=True,
        rank=rank,
        world=world,
        local_rank=local_rank,
        resume=args.resume,
    )
    folder = Path(args.output_dir)
    record = {
        "benchmark": args.benchmark,
        "prompts": str(resolved(args.prompts, "prompts")),
        "samples": samples,
        "checkpoint": bench_run.checkpoint_path,
    }
    claim_folder(folder, record, args.resume, args.overwrite, rank)
    if args.benchmark == "geneval":
        check_geneval_metadata(folder, [prompts[i] for i in mine_prompts], bench_run)
        mine = [every[i * samples + j] for i in mine_prompts for j in range(samples)]
        code = run_images(bench_run, every, mine, args.output_dir)
        write_geneval_metadata(folder, [prompts[i] for i in mine_prompts], bench_run)
        return code
    return write_dpg_grids(folder, prompts, mine_prompts, every, bench_run, run_images)
