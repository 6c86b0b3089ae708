"""``dimoo eval shapes``: GenEval-style accuracy of a model on the shapes world's held-out combinations.

Every task the CLI offers, each on combinations never trained on: text-to-image (held-out prompts), each
edit kind (the target's edited object held out; for removal the source's), captions and questions
(held-out pictures), inpainting and outpainting (a held-out object, the mask cutting through it). Pictures
are read back by the detector, answers compared word for word. Sampling follows the checkpoint's
``generation_defaults``; flags override. Prints one JSON report (and writes it, with failures, to ``--output``).
"""

from __future__ import annotations

import argparse

from dimoo_npu.commands import emit
from dimoo_npu.commands.quantize import add_quantize_argument

SUITES = ("shapes",)
PAINT_TASKS = ("inpaint", "outpaint")


def task_names() -> tuple[str, ...]:
    """Every task the report can hold, in report order."""
    from dimoo_npu.shapes.world import EDITS

    return ("t2i", *(f"edit-{kind}" for kind in EDITS), "caption", "qa", *PAINT_TASKS)


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("suite", choices=SUITES, help="what to evaluate (shapes: the embedded model's world)")
    parser.add_argument("--checkpoint", help="checkpoint folder (default: the embedded shapes model)")
    parser.add_argument("--lora", help="LoRA adapter folder (peft format) merged into the weights at load")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | npu")
    add_quantize_argument(parser)
    parser.add_argument(
        "--split",
        choices=("heldout", "train"),
        default="heldout",
        help="text-to-image and questions: heldout (never trained on; the accuracy figures) or train (to choose "
        "settings on); the other tasks are always held out",
    )
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N items of each task (0 = all)")
    parser.add_argument(
        "--task",
        default="all",
        help="comma-separated: all, t2i, edit (every kind) or edit-<kind> (recolour, move, turn, resize, remove, "
        "add), caption, qa, inpaint, outpaint",
    )
    parser.add_argument("--timesteps", type=int, help="image sampling steps (default: the checkpoint's)")
    parser.add_argument("--temperature", type=float, help="image sampling temperature (default: the checkpoint's)")
    parser.add_argument("--cfg-scale", type=float, help="text guidance (default: the checkpoint's)")
    parser.add_argument("--cfg-img", type=float, help="image guidance of edits (default: the checkpoint's)")
    parser.add_argument(
        "--placements",
        choices=("canonical", "all"),
        default="canonical",
        help="question images: each held-out combination at its third's canonical centre, or at every placement",
    )
    parser.add_argument("--answer-steps", type=int, help="answer sampling steps (default: the checkpoint's)")
    from dimoo_npu.commands.generate import add_request_arguments
    from dimoo_npu.settings.requests import UNDERSTAND_SPEED_FIELDS

    add_request_arguments(
        parser.add_argument_group("answer speed (caption, qa)"), "understand", UNDERSTAND_SPEED_FIELDS
    )
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=16, help="requests sampled together")
    parser.add_argument("--output", help="also write the JSON report (with failures) here")
    parser.add_argument("--images-dir", help="save each generated image here as <task>-<index>.png")


def selected_tasks(text: str) -> list[str]:
    """The tasks ``--task`` names, in report order; InputError for an unknown name."""
    from dimoo_npu.utils.errors import InputError

    names = task_names()
    asked = {t.strip() for t in text.split(",") if t.strip()}
    expanded = set()
    for name in asked:
        if name == "all":
            expanded.update(names)
        elif name == "edit":
            expanded.update(n for n in names if n.startswith("edit-"))
        elif name in names:
            expanded.add(name)
        else:
            raise InputError(f"--task {name!r} is not a task: use all, edit or any of {', '.join(names)}")
    if not expanded:
        raise InputError("--task names no task: use all, or a comma-separated list such as t2i,caption")
    return [n for n in names if n in expanded]


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from dimoo_npu.files.atomic import write_text_atomically
    from dimoo_npu.files.outputs import save_png
    from dimoo_npu.pipeline import DiMOOPipeline, generation_defaults
    from dimoo_npu.settings.generation_settings import ImageSettings, TextSettings, check_cache_settings
    from dimoo_npu.settings.requests import UNDERSTAND_SPEED_FIELDS, UnderstandRequest, resolve
    from dimoo_npu.shapes import evaluate, world
    from dimoo_npu.shapes.embedded import EMBEDDED_CHECKPOINT
    from dimoo_npu.utils.validate import output_file

    tasks = selected_tasks(args.task)
    if args.output:
        output_file(args.output, "--output")  # a folder or an unwritable path is refused before the run
    checkpoint = Path(args.checkpoint or EMBEDDED_CHECKPOINT)
    defaults = generation_defaults(checkpoint)
    speed = resolve(UnderstandRequest(**{name: getattr(args, name) for name in UNDERSTAND_SPEED_FIELDS}), defaults)
    check_cache_settings(speed.kv_cache, speed.parallel_threshold)  # before the model loads
    pipeline = DiMOOPipeline.from_pretrained(checkpoint, args.device, quantize=args.quantize, lora=args.lora)
    image_settings = ImageSettings(
        timesteps=_pick(args.timesteps, defaults, "timesteps", 64),
        temperature=_pick(args.temperature, defaults, "temperature", 0.0),
        cfg_scale=_pick(args.cfg_scale, defaults, "cfg_scale", 0.0),
        cfg_img=_pick(args.cfg_img, defaults, "cfg_img", 0.0),
    ).check()
    gen_length = int(defaults.get("gen_length", 8))
    text_settings = TextSettings(
        gen_length=gen_length,
        block_length=int(defaults.get("block_length", gen_length)),
        steps=_pick(args.answer_steps, defaults, "steps", gen_length),
        temperature=float(defaults.get("temperature", 0.0)),
        kv_cache=speed.kv_cache,
        parallel_threshold=speed.parallel_threshold,
    ).check()
    budget = defaults.get("image_budget")
    images_dir = Path(args.images_dir) if args.images_dir else None
    if images_dir:
        images_dir.mkdir(parents=True, exist_ok=True)
    size, batch = world.IMAGE_SIZE, args.batch_size
    limit = args.limit or None

    def kept(task: str, pictures) -> list[np.ndarray]:
        """RGB arrays of ``pictures``, saved under --images-dir when given."""
        arrays = [np.asarray(picture.convert("RGB")) for picture in pictures]
        if images_dir:
            start = len(list(images_dir.glob(f"{task}-*.png")))
            for index, picture in enumerate(pictures, start):
                save_png(picture, images_dir / f"{task}-{index:03d}.png", {"task": task, "checkpoint": args.checkpoint})
        return arrays

    def generate(prompts: list[str]) -> list[np.ndarray]:
        pictures = pipeline.text_to_image(
            prompts, width=size, height=size, settings=image_settings, seed=args.seed, batch_size=batch
        )
        return kept("t2i", pictures)

    def answer(images, questions: list[str]) -> list[str]:
        pictures = [Image.fromarray(image) for image in images]
        return pipeline.understand(
            pictures, questions, settings=text_settings, image_budget=budget, seed=args.seed, batch_size=batch
        )

    def editor(task: str):
        def edit(images, instructions: list[str], edit_types: list[str]) -> list[np.ndarray]:
            (edit_type,) = set(edit_types)  # one edit kind per call
            pictures = pipeline.edit(
                [Image.fromarray(image) for image in images], instructions, edit_type, image_budget=budget,
                settings=image_settings, seed=args.seed, batch_size=batch,
            )  # fmt: skip
            return kept(task, pictures)

        return edit

    def painter(task: str):
        def paint(images, masks, prompts: list[str]) -> list[np.ndarray]:
            pictures = pipeline.inpaint(
                [Image.fromarray(image) for image in images], prompts, masks=[Image.fromarray(m) for m in masks],
                image_budget=budget, settings=image_settings, seed=args.seed, batch_size=batch,
            )  # fmt: skip
            return kept(task, pictures)

        return paint

    objects = world.split_objects(args.split)[:limit]
    report: dict = {
        "checkpoint": str(checkpoint),
        "split": args.split,
        "tasks": tasks,
        "image_settings": vars(image_settings),
        "text_settings": vars(text_settings),
    }
    failures = {}
    for task in tasks:
        if task == "t2i":
            score = evaluate.evaluate_t2i(generate, objects, batch_size=batch)
        elif task.startswith("edit-"):
            edits = world.heldout_edits(task.removeprefix("edit-"), seed=args.seed)[:limit]
            score = evaluate.evaluate_edits(editor(task), edits, batch_size=batch)
        elif task == "caption":
            scenes = evaluate.heldout_caption_scenes(seed=args.seed)[:limit]
            score = evaluate.evaluate_captions(answer, scenes, batch_size=batch)
        elif task == "qa":
            shown = [p for obj in objects for p in world.placements(obj)] if args.placements == "all" else objects
            score = evaluate.evaluate_understanding(answer, shown, batch_size=batch, seed=args.seed)
            report["qa_placements"] = args.placements
        else:
            items = evaluate.paint_items(task, seed=args.seed)[:limit]
            score = evaluate.evaluate_paint(painter(task), items, batch_size=batch, kind=task)
        report[task], failures[task] = score.as_dict(), score.failures
    emit(json.dumps(report, indent=2))
    if args.output:
        write_text_atomically(Path(args.output), json.dumps({**report, "failures": failures}, indent=2) + "\n")
    return 0


def _pick(flag, defaults: dict, key: str, fallback):
    """A flag the user set, else the checkpoint's generation default, else ``fallback``."""
    if flag is not None:
        return flag
    return type(fallback)(defaults.get(key, fallback))
