"""The writing half of `dimoo_npu.commands.bench`: GenEval's per-prompt metadata files and DPG-Bench's 2 x 2
grids, each resumable like the samples (`dimoo_npu.batch.resume`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from dimoo_npu.batch.batch_requests import Numbered
from dimoo_npu.batch.prompt_sets import DPG_SAMPLES, BenchPrompt
from dimoo_npu.batch.resume import FIX, State, png_state
from dimoo_npu.commands.generate_run import GenerationRun, png_metadata
from dimoo_npu.files.outputs import check_writable, save_png, save_text
from dimoo_npu.settings.requests import PIXELS_PER_CELL, TextToImageRequest
from dimoo_npu.utils.errors import InputError

logger = logging.getLogger("dimoo")


def metadata_path(folder: Path, prompt: BenchPrompt) -> Path:
    return folder / prompt.name / "metadata.jsonl"


def check_geneval_metadata(folder: Path, prompts: list[BenchPrompt], run: GenerationRun) -> None:
    """Before sampling: a metadata file is new, replaceable (--overwrite), or on --resume the same line."""
    for prompt in prompts:
        path = metadata_path(folder, prompt)
        if not run.resume:
            check_writable(path, run.overwrite)
        elif path.exists() and path.read_text(encoding="utf-8").strip() != prompt.metadata:
            raise InputError(f"cannot resume: {path} holds another prompt's metadata (the prompt file changed); {FIX}")


def write_geneval_metadata(folder: Path, prompts: list[BenchPrompt], run: GenerationRun) -> None:
    """``<05d>/metadata.jsonl``: the prompt's metadata line, which GenEval's evaluator reads as one object."""
    for prompt in prompts:
        path = metadata_path(folder, prompt)
        if not (run.resume and path.exists()):
            save_text(prompt.metadata + "\n", path, overwrite=run.overwrite)


def grid_metadata(requests: list[TextToImageRequest], run: GenerationRun) -> dict[str, Any]:
    """The first sample's record with every sample's seed: what the grid was made from."""
    first = requests[0]
    metadata = png_metadata(first, (first.height // PIXELS_PER_CELL, first.width // PIXELS_PER_CELL), run)
    del metadata["seed"]
    return {**metadata, "seeds": [r.seed for r in requests], "task": "bench dpg"}


def tile(images: list[Image.Image]) -> Image.Image:
    """Four equal images as a 2 x 2 grid, row by row (DPG-Bench cuts it back by --resolution)."""
    width, height = images[0].size
    grid = Image.new("RGB", (2 * width, 2 * height))
    for k, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((k % 2) * width, (k // 2) * height))
    return grid


def write_dpg_grids(
    folder: Path,
    prompts: list[BenchPrompt],
    mine: list[int],
    every: list[Numbered],
    run: GenerationRun,
    run_images: Callable[..., int],
) -> int:
    """Sample the 4 images of each of this rank's prompts (staged under ``.samples/``), then write
    ``<stem>.png``; on --resume a finished grid's prompt is skipped whole."""
    samples = {i: [every[i * DPG_SAMPLES + j] for j in range(DPG_SAMPLES)] for i in mine}
    grids = {i: folder / f"{prompts[i].name}.png" for i in mine}
    records = {i: grid_metadata([item.request for item in samples[i]], run) for i in mine}
    states = {}
    for i in mine:
        if run.resume:
            states[i] = png_state(grids[i], records[i])
        else:
            check_writable(grids[i], run.overwrite)
            states[i] = State.TODO
    todo = [i for i in mine if states[i] is not State.DONE]
    if len(todo) < len(mine):
        logger.info("%d of %d grid(s) already done, skipped", len(mine) - len(todo), len(mine))
    code = run_images(run, every, [item for i in todo for item in samples[i]], str(folder))
    for i in todo:
        images = []
        for item in samples[i]:
            with Image.open(folder / item.request.output) as image:
                images.append(image.copy())
        replace = run.overwrite or states[i] is State.REDO
        save_png(tile(images), grids[i], records[i], overwrite=replace)
        logger.info("wrote %s", grids[i])
    return code
