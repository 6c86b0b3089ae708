"""``dimoo eval shapes``: GenEval-style accuracy of a model on the shapes world's held-out combinations.

Text-to-image: one image per held-out prompt, the object detected and its shape, colour, size and
position compared with the prompt. Understanding: every question type on each held-out image (at the
canonical centre of its third, or with ``--placements all`` at every placement the world allows there).
Prints a JSON report (and writes it with ``--output``).
"""

from __future__ import annotations

import argparse

from dimoo_npu.commands import emit

SUITES = ("shapes",)


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    from dimoo_npu.shapes.embedded import ANSWER_SETTINGS, T2I_SETTINGS

    parser.add_argument("suite", choices=SUITES, help="what to evaluate (shapes: the embedded model's world)")
    parser.add_argument("--checkpoint", help="checkpoint folder (default: the embedded shapes model)")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | npu")
    parser.add_argument(
        "--split",
        choices=("heldout", "train"),
        default="heldout",
        help="which combinations: heldout (never trained on; the accuracy figures) or train (to choose settings on)",
    )
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N objects (0 = all)")
    parser.add_argument("--tasks", default="t2i,mmu", help="comma-separated: t2i, mmu")
    parser.add_argument("--timesteps", type=int, default=T2I_SETTINGS["timesteps"], help="image sampling steps")
    parser.add_argument("--temperature", type=float, default=T2I_SETTINGS["temperature"], help="image sampling")
    parser.add_argument("--cfg-scale", type=float, default=T2I_SETTINGS["cfg_scale"], help="text guidance")
    parser.add_argument(
        "--placements",
        choices=("canonical", "all"),
        default="canonical",
        help="understanding images: each held-out combination at its third's canonical centre, or at every placement",
    )
    parser.add_argument("--answer-steps", type=int, default=ANSWER_SETTINGS["steps"], help="answer sampling steps")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=16, help="requests sampled together")
    parser.add_argument("--output", help="also write the JSON report (with failures) here")
    parser.add_argument("--images-dir", help="save each generated image here as <prompt>.png")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from dimoo_npu.atomic import write_text_atomically
    from dimoo_npu.errors import InputError
    from dimoo_npu.generation_settings import ImageSettings, TextSettings
    from dimoo_npu.pipeline import DiMOOPipeline
    from dimoo_npu.shapes import world
    from dimoo_npu.shapes.embedded import ANSWER_SETTINGS, EMBEDDED_CHECKPOINT
    from dimoo_npu.shapes.evaluate import evaluate_t2i, evaluate_understanding

    tasks = {t.strip() for t in args.tasks.split(",") if t.strip()}
    if not tasks or tasks - {"t2i", "mmu"}:
        raise InputError(f"--tasks {args.tasks!r}: use t2i, mmu or both (comma-separated)")
    pipeline = DiMOOPipeline.from_pretrained(args.checkpoint or EMBEDDED_CHECKPOINT, args.device)
    objects = world.split_objects(args.split)[: args.limit or None]
    image_settings = ImageSettings(timesteps=args.timesteps, temperature=args.temperature, cfg_scale=args.cfg_scale)
    text_settings = TextSettings(**{**ANSWER_SETTINGS, "steps": args.answer_steps})
    images_dir = Path(args.images_dir) if args.images_dir else None
    if images_dir:
        images_dir.mkdir(parents=True, exist_ok=True)

    def generate(prompts: list[str]) -> list[np.ndarray]:
        size = world.IMAGE_SIZE
        pictures = pipeline.text_to_image(
            prompts, width=size, height=size, settings=image_settings, seed=args.seed, batch_size=args.batch_size
        )
        if images_dir:
            for prompt, picture in zip(prompts, pictures, strict=True):
                picture.save(images_dir / f"{prompt.replace(' ', '_')}.png")
        return [np.asarray(picture.convert("RGB")) for picture in pictures]

    def answer(images, questions: list[str]) -> list[str]:
        from PIL import Image

        pictures = [Image.fromarray(image) for image in images]
        return pipeline.understand(
            pictures, questions, settings=text_settings, image_budget=None, seed=args.seed, batch_size=args.batch_size
        )

    report: dict = {
        "checkpoint": str(args.checkpoint or EMBEDDED_CHECKPOINT),
        "split": args.split,
        "objects": len(objects),
        "understanding_placements": args.placements,
        "image_settings": vars(image_settings),
        "text_settings": vars(text_settings),
    }
    failures = {}
    if "t2i" in tasks:
        score = evaluate_t2i(generate, objects, batch_size=args.batch_size)
        report["t2i"], failures["t2i"] = score.as_dict(), score.failures
    if "mmu" in tasks:
        shown = [placed for obj in objects for placed in world.placements(obj)] if args.placements == "all" else objects
        score = evaluate_understanding(answer, shown, batch_size=args.batch_size, seed=args.seed)
        report["understanding"], failures["understanding"] = score.as_dict(), score.failures
    emit(json.dumps(report, indent=2))
    if args.output:
        write_text_atomically(Path(args.output), json.dumps({**report, "failures": failures}, indent=2) + "\n")
    return 0
