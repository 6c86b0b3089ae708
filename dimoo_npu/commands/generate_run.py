"""The work behind the generation commands: check files and outputs, prepare token ids, load the model, sample,
write. Requests arrive resolved and checked (`dimoo_npu.batch_requests`); this module never reads argparse.

Kept apart from `dimoo_npu.commands.generate` so that ``dimoo --help`` imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import dimoo_npu
from dimoo_npu.batch_requests import Numbered, output_paths
from dimoo_npu.commands import emit
from dimoo_npu.outputs import check_writable, save_png, save_text
from dimoo_npu.pipeline import DiMOOPipeline
from dimoo_npu.requests import ImageRequest, InpaintRequest
from dimoo_npu.tasks import check_files
from dimoo_npu.tasks.understand import EMPTY_ANSWER

logger = logging.getLogger("dimoo")


@dataclass(frozen=True)
class GenerationRun:
    """What a generation command runs with, besides its requests."""

    task: str
    checkpoint: str
    device: str
    dtype: str  # auto | float32 | bfloat16 | float16
    batch_size: int  # requests per forward, after grouping by grid and settings
    max_length: int | None
    compile: bool | None  # graph mode; None: DIMOO_COMPILE
    overwrite: bool
    output: str | None  # one request's PNG; understanding: the answers file
    from_batch_file: bool
    lora: str | None = None  # adapter folder merged at load
    rank: int = 0
    world: int = 1
    local_rank: int = 0


def pick_device(name: str, local_rank: int) -> torch.device:
    """The user's device; under torchrun an accelerator without an explicit index is this process's own."""
    from dimoo_npu.adapters import resolve_device

    backend, device = resolve_device(name)
    if ":" not in name and device.type != "cpu":
        device = backend.device(local_rank)
    if device.type != "cpu":
        backend.set_device(device.index or 0)
    return device


def load_pipeline(run: GenerationRun) -> DiMOOPipeline:
    """Tokenizers now, the transformer lazily (after every request has been prepared and checked)."""
    dtype = None if run.dtype == "auto" else getattr(torch, run.dtype)
    device = pick_device(run.device, run.local_rank)
    logger.info("checkpoint %s on %s (%s)", run.checkpoint, device, run.dtype)
    pipeline = DiMOOPipeline.from_pretrained(
        run.checkpoint, device, dtype, lazy=True, max_length=run.max_length, compile=run.compile, lora=run.lora
    )
    pipeline.progress = True
    return pipeline


def png_metadata(request: ImageRequest, grid: tuple[int, int], run: GenerationRun) -> dict[str, Any]:
    """What the PNG says about how it was made: the request's fields, the size made, the checkpoint and dtype."""
    rows, cols = grid
    fields = {k: v for k, v in dataclasses.asdict(request).items() if v is not None and k not in ("prompt", "seed")}
    fields.pop("output", None)
    if isinstance(request, InpaintRequest) and request.mask:
        del fields["mask_h_ratio"], fields["mask_w_ratio"]  # the mask replaces the box
    return {
        "prompt": request.prompt or "",
        "seed": str(request.seed),
        "task": run.task,
        "settings": {
            **dataclasses.asdict(request.image_settings()),
            **fields,
            "width": cols * 16,
            "height": rows * 16,
            "checkpoint": str(run.checkpoint),
            **({"lora": str(run.lora)} if run.lora else {}),
            "dtype": run.dtype,
        },
        "software": f"dimoo_npu {dimoo_npu.__version__}",
    }


def run_images(run: GenerationRun, every: list[Numbered], mine: list[Numbered], output_dir: str) -> int:
    """Sample this process's share of the requests; each PNG is written as soon as its batch is done."""
    paths = output_paths(every, run.task, run.output, output_dir)
    paths = [paths[item.index] for item in mine]
    for item, path in zip(mine, paths, strict=True):
        check_writable(path, run.overwrite)
        check_files(item.request)
    if not mine:
        logger.info("no request for this process")
        return 0
    pipeline = load_pipeline(run)
    requests = [item.request for item in mine]
    prepared = [pipeline.prepare(request) for request in requests]
    settings = [request.image_settings() for request in requests]
    seeds = [request.seed for request in requests]
    with tqdm(total=len(requests), desc=run.task, unit="image") as progress:
        for chunk, grids in pipeline.iter_grids(prepared, settings, seeds, run.batch_size):
            for i, image in zip(chunk, pipeline.decode_images(grids), strict=True):
                save_png(image, paths[i], png_metadata(requests[i], prepared[i].grid, run), overwrite=run.overwrite)
                logger.info("wrote %s", paths[i])
            progress.update(len(chunk))
    return 0


def answers_path(output: str | None, rank: int, world: int) -> Path | None:
    """Where this process writes its answers: ``output``, one file per rank under torchrun, or None (stdout)."""
    if not output:
        return None
    path = Path(output)
    return path.with_name(f"{path.stem}.rank{rank}-of-{world}{path.suffix}") if world > 1 else path


def write_answers(rows: list[dict[str, Any]], path: Path | None, overwrite: bool) -> None:
    """Answers as JSON lines, to ``path`` (atomically) or to stdout."""
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if path is None:
        sys.stdout.write(lines)
        return
    save_text(lines, path, overwrite)
    logger.info("wrote %d answer(s) to %s", len(rows), path)


def run_understanding(run: GenerationRun, mine: list[Numbered]) -> int:
    path = answers_path(run.output, run.rank, run.world)
    if path is not None:
        check_writable(path, run.overwrite)
    for item in mine:
        check_files(item.request)
    if not mine:
        logger.info("no request for this process")
        return 0
    pipeline = load_pipeline(run)
    requests = [item.request for item in mine]
    prepared = [pipeline.prepare(request) for request in requests]
    settings = [request.text_settings() for request in requests]
    answers = pipeline.answer(prepared, settings, [r.seed for r in requests], run.batch_size)
    if path is None and not run.from_batch_file:
        if not answers[0]:
            logger.error(EMPTY_ANSWER)
            return 1
        emit(answers[0])
        return 0
    rows = [
        {"index": item.index, "image": item.request.image, "question": item.request.question}
        | {"seed": item.request.seed, "answer": answer}
        | ({} if answer else {"error": EMPTY_ANSWER})
        for item, answer in zip(mine, answers, strict=True)
    ]
    write_answers(rows, path, run.overwrite)
    empty = sum(not answer for answer in answers)
    if empty:
        logger.error("%d of %d answers decoded to nothing (their rows carry an error field)", empty, len(answers))
    return 1 if empty else 0
