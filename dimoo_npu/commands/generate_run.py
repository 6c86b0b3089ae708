"""The work behind the generation commands: check files and outputs, prepare token ids, load the model, sample,
write. Requests arrive resolved and checked (`dimoo_npu.batch.batch_requests`); this module never reads argparse.

Kept apart from `dimoo_npu.commands.generate` so that ``dimoo --help`` imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

import dimoo_npu
from dimoo_npu.batch.answer_files import answered, answers_path, append_rows
from dimoo_npu.batch.batch_progress import BatchProgress
from dimoo_npu.batch.batch_requests import Numbered, output_paths
from dimoo_npu.batch.resume import State, png_state
from dimoo_npu.commands import emit
from dimoo_npu.files.hub_cache import resolve_checkpoint
from dimoo_npu.files.outputs import check_writable, save_png, save_text
from dimoo_npu.pipeline import DiMOOPipeline
from dimoo_npu.settings.requests import ImageRequest, InpaintRequest, UnderstandRequest
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
    resume: bool = False  # skip requests whose output exists with the same settings

    @property
    def checkpoint_path(self) -> str:
        """The checkpoint as outputs record it: its resolved folder, however it was named."""
        return str(resolve_checkpoint(self.checkpoint).resolve())

    quantize: str | None = None  # w8a8 | w8a16: quantize a float checkpoint while it loads


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
        run.checkpoint,
        device,
        dtype,
        lazy=True,
        max_length=run.max_length,
        compile=run.compile,
        quantize=run.quantize,
        lora=run.lora,
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
            "checkpoint": run.checkpoint_path,
            **({"lora": str(run.lora)} if run.lora else {}),
            "dtype": run.dtype,
        },
        "software": f"dimoo_npu {dimoo_npu.__version__}",
    }


def run_images(run: GenerationRun, every: list[Numbered], mine: list[Numbered], output_dir: str) -> int:
    """Sample this process's share of the requests; each PNG is written as soon as its batch is done.

    With ``run.resume`` an output made with the same settings is skipped and an unreadable one made again.
    """
    paths = output_paths(every, run.task, run.output, output_dir)
    paths = [paths[item.index] for item in mine]
    for item, path in zip(mine, paths, strict=True):
        if not run.resume:
            check_writable(path, run.overwrite)
        check_files(item.request)
    if not mine:
        logger.info("no request for this process")
        BatchProgress(0, 0, run.rank, run.world).finish()
        return 0
    pipeline = load_pipeline(run)
    requests = [item.request for item in mine]
    prepared = [pipeline.prepare(request) for request in requests]
    metadata = [png_metadata(r, p.grid, run) for r, p in zip(requests, prepared, strict=True)]
    states = [png_state(p, m) for p, m in zip(paths, metadata, strict=True)] if run.resume else None
    todo = [i for i in range(len(mine)) if states is None or states[i] is not State.DONE]
    progress = BatchProgress(len(mine), len(mine) - len(todo), run.rank, run.world)
    settings = [requests[i].image_settings() for i in todo]
    seeds = [requests[i].seed for i in todo]
    with tqdm(total=len(todo), desc=run.task, unit="image") as bar:
        for chunk, grids in pipeline.iter_grids([prepared[i] for i in todo], settings, seeds, run.batch_size):
            for j, image in zip(chunk, pipeline.decode_images(grids), strict=True):
                i = todo[j]
                replace = run.overwrite or (states is not None and states[i] is State.REDO)
                save_png(image, paths[i], metadata[i], overwrite=replace)
                logger.info("wrote %s", paths[i])
            bar.update(len(chunk))
            progress.update(len(chunk))
    progress.finish()
    return 0


def write_answers(rows: list[dict[str, Any]]) -> None:
    """Answers as JSON lines on stdout."""
    sys.stdout.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    sys.stdout.flush()


def answer_record(request: UnderstandRequest, run: GenerationRun) -> dict[str, Any]:
    """What identifies an answer row and how it was sampled (a resume compares these)."""
    settings = {**dataclasses.asdict(request.text_settings()), "image_budget": request.image_budget}
    return {
        "image": request.image,
        "question": request.question,
        "seed": request.seed,
        "settings": {**settings, "checkpoint": run.checkpoint_path, "dtype": run.dtype},
    }


def run_understanding(run: GenerationRun, mine: list[Numbered]) -> int:
    """Answer this process's share; rows are appended to its answers file after every batch."""
    path = answers_path(run.output, run.rank, run.world)
    if path is not None and not run.resume:
        check_writable(path, run.overwrite)
    for item in mine:
        check_files(item.request)
    records = {item.index: answer_record(item.request, run) for item in mine}
    done = answered(run.output, path, records) if run.resume and path is not None else set()
    todo = [item for item in mine if item.index not in done]
    progress = BatchProgress(len(mine), len(done), run.rank, run.world)
    if path is not None and run.overwrite:
        save_text("", path, overwrite=True)  # appended to from here on
    if not todo:
        logger.info("no request left for this process")
        progress.finish()
        return 0
    pipeline = load_pipeline(run)
    requests = [item.request for item in todo]
    prepared = [pipeline.prepare(request) for request in requests]
    settings = [request.text_settings() for request in requests]
    seeds = [request.seed for request in requests]
    if path is None and not run.from_batch_file:
        answer = pipeline.answer(prepared, settings, seeds, run.batch_size)[0]
        if not answer:
            logger.error(EMPTY_ANSWER)
            return 1
        emit(answer)
        return 0
    for chunk, answers in pipeline.iter_answers(prepared, settings, seeds, run.batch_size):
        rows = [
            {"index": todo[i].index, **records[todo[i].index], "answer": answer}
            | ({} if answer else {"error": EMPTY_ANSWER})
            for i, answer in zip(chunk, answers, strict=True)
        ]
        if path is None:
            write_answers(rows)
        else:
            append_rows(rows, path)
            logger.info("appended %d answer(s) to %s", len(rows), path)
        progress.update(len(rows), failed=sum(not answer for answer in answers))
    progress.finish()
    if progress.failed:
        logger.error(
            "%d of %d answers decoded to nothing (their rows carry an error field)", progress.failed, len(todo)
        )
    return 1 if progress.failed else 0
