"""The work behind the generation commands: check, prepare token ids, load the model, sample, write.

Kept apart from `dimoo_npu.commands.generate` so that ``dimoo --help`` imports no torch.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import dimoo_npu
from dimoo_npu.batch_requests import Request
from dimoo_npu.commands import emit
from dimoo_npu.commands.generate import BOXES, DTYPES, answers_path, text_settings, write_answers
from dimoo_npu.generation_settings import ImageSettings
from dimoo_npu.image_prep import load_image
from dimoo_npu.outputs import check_writable, save_png
from dimoo_npu.pipeline import DiMOOPipeline, check_image_size, default_checkpoint
from dimoo_npu.prompts import check_edit_type
from dimoo_npu.sequences import ImagePrompt

logger = logging.getLogger("dimoo")


def pick_device(name: str, local_rank: int) -> torch.device:
    """The user's device; under torchrun an accelerator without an explicit index is this process's own."""
    from dimoo_npu.adapters import resolve_device

    backend, device = resolve_device(name)
    if ":" not in name and device.type != "cpu":
        device = backend.device(local_rank)
    if device.type != "cpu":
        backend.set_device(device.index or 0)
    return device


def load_pipeline(args: argparse.Namespace, local_rank: int) -> DiMOOPipeline:
    """Tokenizers now, the transformer lazily (after every request has been prepared and checked)."""
    checkpoint = args.checkpoint or default_checkpoint()
    dtype = DTYPES[args.dtype]
    device = pick_device(args.device, local_rank)
    logger.info("checkpoint %s on %s (%s)", checkpoint, device, dtype or "default dtype")
    pipeline = DiMOOPipeline.from_pretrained(
        checkpoint, device, getattr(torch, dtype) if dtype else None, lazy=True, max_length=args.max_length
    )
    pipeline.progress = True
    return pipeline


def precheck(task: str, request: Request) -> None:
    """What needs neither model nor tokenizer: sizes, the edit type, the input files."""
    if task == "t2i":
        check_image_size(int(request["width"]), int(request["height"]))
    if task == "edit":
        check_edit_type(request["edit_type"])
    for key in ("image", "ref_image", "mask"):
        if request[key]:
            load_image(request[key])


def prepare(pipeline: DiMOOPipeline, task: str, request: Request, args: argparse.Namespace) -> ImagePrompt:
    if task == "t2i":
        return pipeline.prepare_text_to_image(request["prompt"], int(request["width"]), int(request["height"]))
    image = load_image(request["image"])
    if task == "edit":
        reference = load_image(request["ref_image"]) if request["ref_image"] else None
        return pipeline.prepare_edit(image, request["prompt"], request["edit_type"], reference, args.image_budget)
    mask = load_image(request["mask"], mode="L") if request["mask"] else None
    box = (float(request["mask_h_ratio"]), float(request["mask_w_ratio"]))
    return pipeline.prepare_paint(
        image, request["prompt"], mask=mask, box=box, outside=task == "outpaint", image_budget=args.image_budget
    )


def png_metadata(
    task: str, request: Request, prepared: ImagePrompt, settings: ImageSettings, args: argparse.Namespace
) -> dict[str, Any]:
    rows, cols = prepared.grid
    details = {key: request[key] for key in ("edit_type", "image", "ref_image", "mask") if request[key]}
    if task in BOXES and not request["mask"]:
        details.update(mask_h_ratio=request["mask_h_ratio"], mask_w_ratio=request["mask_w_ratio"])
    if task != "t2i":
        details["image_budget"] = args.image_budget
    return {
        "prompt": request["prompt"] or "",
        "seed": str(request["seed"]),
        "task": task,
        "settings": {
            **asdict(settings),
            "width": cols * 16,
            "height": rows * 16,
            **details,
            "checkpoint": str(args.checkpoint),
            "dtype": args.dtype,
        },
        "software": f"dimoo_npu {dimoo_npu.__version__}",
    }


def run_images(
    args: argparse.Namespace, requests: list[Request], paths: list[Path], settings: ImageSettings, local_rank: int
) -> int:
    task = args.command
    for request, path in zip(requests, paths, strict=True):
        check_writable(path, args.overwrite)
        precheck(task, request)
    if not requests:
        logger.info("no request for this process")
        return 0
    pipeline = load_pipeline(args, local_rank)
    prepared = [prepare(pipeline, task, request, args) for request in requests]
    with tqdm(total=len(requests), desc=task, unit="image") as progress:
        for start in range(0, len(requests), args.batch_size):
            chunk = range(start, min(start + args.batch_size, len(requests)))
            images = pipeline.generate_images(
                [prepared[i] for i in chunk], settings, [requests[i]["seed"] for i in chunk], args.batch_size
            )
            for i, image in zip(chunk, images, strict=True):
                metadata = png_metadata(task, requests[i], prepared[i], settings, args)
                save_png(image, paths[i], metadata, overwrite=args.overwrite)
                logger.info("wrote %s", paths[i])
            progress.update(len(chunk))
    return 0


def run_understanding(args: argparse.Namespace, requests: list[Request], share: tuple[int, int, int]) -> int:
    rank, world, local_rank = share
    settings = text_settings(args).check()
    path = answers_path(args.output, rank, world)
    if path is not None:
        check_writable(path, args.overwrite)
    for request in requests:
        precheck("understand", request)
    if not requests:
        logger.info("no request for this process")
        return 0
    pipeline = load_pipeline(args, local_rank)
    prepared = [
        pipeline.prepare_understanding(load_image(r["image"]), r["question"], settings.gen_length, args.image_budget)
        for r in requests
    ]
    answers: list[str] = []
    with tqdm(total=len(requests), desc="understand", unit="answer") as progress:
        for start in range(0, len(requests), args.batch_size):
            chunk = slice(start, start + args.batch_size)
            answers += pipeline.answer(prepared[chunk], settings, [r["seed"] for r in requests[chunk]], args.batch_size)
            progress.update(len(prepared[chunk]))
    if path is None and not args.batch_file:
        emit(answers[0])
        return 0
    rows = [
        {"index": r.index, "image": r["image"], "question": r["question"], "seed": r["seed"], "answer": answer}
        for r, answer in zip(requests, answers, strict=True)
    ]
    write_answers(rows, path, args.overwrite)
    return 0
