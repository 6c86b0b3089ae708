"""``dimoo t2i | edit | inpaint | outpaint | understand``: one request from flags or many from --batch-file.

Everything that can be checked without the transformer (sizes, settings, edit types, files, outputs, the
prompt's fit) is checked before it loads. Under torchrun each process samples its share of the requests.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from dimoo_npu import envs
from dimoo_npu.batch_requests import assign_seeds, build_requests, my_share, output_paths
from dimoo_npu.generation_settings import ImageSettings, TextSettings
from dimoo_npu.outputs import save_text
from dimoo_npu.prompts import EDIT_TYPES

logger = logging.getLogger("dimoo")

DTYPES = {
    "auto": None,
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
# Public-code defaults per task: (cfg_scale, cfg_img).
GUIDANCE = {"t2i": (4.0, 0.0), "edit": (2.5, 4.0), "inpaint": (4.0, 0.0), "outpaint": (4.0, 0.0)}
BOXES = {"inpaint": (0.5, 0.5), "outpaint": (1.0, 0.2)}


class CheckpointDefault:
    """A flag's built-in default, which the checkpoint's ``generation_defaults`` replace when the user gives none."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the flags the user left out: the checkpoint's ``generation_defaults``, else the built-in default."""
    from dimoo_npu.pipeline import default_checkpoint, generation_defaults

    args.checkpoint = str(args.checkpoint or default_checkpoint())
    tuned = generation_defaults(args.checkpoint)
    for key, value in vars(args).items():
        if isinstance(value, CheckpointDefault):
            setattr(args, key, tuned.get(key, value.value))


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    common = parser.add_argument_group("model and run")
    common.add_argument(
        "--checkpoint",
        help="DiMOO checkpoint folder (config.json, weights, tokenizer, vqvae/), or a Hugging Face repo id already "
        "in the local cache (e.g. Alpha-VLLM/Lumina-DiMOO; nothing is downloaded); default: the bundled model",
    )
    common.add_argument("--device", default="auto", help="auto | cpu | cuda | npu (auto: npu, then cuda, then cpu)")
    common.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="auto: fp32 on CPU, bf16 otherwise")
    common.add_argument("--seed", type=int, default=0, help="request i uses seed + i (a batch line may set its own)")
    common.add_argument("--batch-file", help="JSONL file, one request per line (fields as the flags, snake_case)")
    common.add_argument("--batch-size", type=int, default=4, help="requests sampled together")
    common.add_argument(
        "--max-length",
        type=int,
        help="longest sequence in tokens (default: DIMOO_MAX_LENGTH, else 8192); longer than the checkpoint's "
        "max_sequence_length runs with a warning",
    )
    if name != "t2i":
        common.add_argument("--image", help="input image")
    if name == "understand":
        _add_understand_arguments(parser)
        return
    common.add_argument("--prompt", help="text prompt")
    common.add_argument("--output", "--out", help="output PNG (one request only)")
    common.add_argument("--output-dir", default=".", help="folder for outputs named by the batch file or by index")
    common.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    _add_image_sampling_arguments(parser, name)
    task = parser.add_argument_group(f"{name} options")
    if name == "t2i":
        task.add_argument(
            "--width",
            type=int,
            default=CheckpointDefault(1024),
            help="multiple of 16 pixels (default: the checkpoint's, else 1024 as the public code)",
        )
        task.add_argument(
            "--height",
            type=int,
            default=CheckpointDefault(1024),
            help="multiple of 16 pixels (default: the checkpoint's, else 1024); width x height / 256 image "
            "tokens plus the prompt must fit --max-length",
        )
    if name == "edit":
        task.add_argument("--edit-type", default="edit", help=f"{', '.join(EDIT_TYPES)} or multi_view_<view>")
        task.add_argument("--ref-image", help="style reference image (image_ref_transfer)")
    if name in BOXES:
        task.add_argument("--mask", help="mask image of the input's size: white = regenerate (replaces the box)")
        task.add_argument(
            "--mask-h-ratio", type=float, default=BOXES[name][0], help="centred box height / image height"
        )
        task.add_argument("--mask-w-ratio", type=float, default=BOXES[name][1], help="centred box width / image width")
    if name != "t2i":
        budget = 512 if name == "edit" else None
        task.add_argument(
            "--image-budget",
            type=int,
            default=CheckpointDefault(budget),
            help="crop inputs to the closest aspect bucket of about N x N pixels (multiple of 32); "
            + ("default 512" if budget else "default: keep the size, cropped to multiples of 16"),
        )


def _add_image_sampling_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    cfg_scale, cfg_img = GUIDANCE[name]
    group = parser.add_argument_group("sampling")
    group.add_argument("--timesteps", type=int, default=CheckpointDefault(64), help="sampling steps")
    group.add_argument("--temperature", type=float, default=CheckpointDefault(1.0), help="0 = greedy")
    group.add_argument(
        "--cfg-scale", type=float, default=CheckpointDefault(cfg_scale), help="text guidance scale (0 = off)"
    )
    if name == "edit":
        group.add_argument(
            "--cfg-img", type=float, default=CheckpointDefault(cfg_img), help="image guidance scale (0 = off)"
        )
    group.add_argument("--use-cache", action="store_true", help="ML-Cache: reuse confident positions between steps")
    group.add_argument("--cache-ratio", type=float, default=0.9, help="share of positions reused on cached steps")
    group.add_argument("--warmup-ratio", type=float, default=0.3, help="share of first steps always computed in full")
    group.add_argument("--refresh-interval", type=int, default=5, help="full refresh every N steps after warm-up")


def _add_understand_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("understanding")
    group.add_argument("--question", "--prompt", dest="question", help="question about the image")
    group.add_argument("--output", "--out", help="write answers as JSON lines here (default: print them)")
    group.add_argument("--overwrite", action="store_true", help="replace an --output that already exists")
    group.add_argument(
        "--gen-length", type=int, default=CheckpointDefault(1024), help="answer tokens (stops early at EOS)"
    )
    group.add_argument("--block-length", type=int, default=CheckpointDefault(256), help="answer block length")
    group.add_argument("--steps", type=int, default=CheckpointDefault(128), help="sampling steps over the whole answer")
    group.add_argument("--temperature", type=float, default=CheckpointDefault(0.0), help="0 = greedy")
    group.add_argument("--cfg-scale", type=float, default=CheckpointDefault(0.0), help="guidance scale (0 = off)")
    group.add_argument(
        "--image-budget",
        type=int,
        default=CheckpointDefault(1024),
        help="crop the image to a bucket of about N x N pixels (default: the checkpoint's, else 1024 as the "
        "public understanding script)",
    )


def run(args: argparse.Namespace) -> int:
    from dimoo_npu.commands.generate_run import run_images, run_understanding

    task = args.command
    resolve_defaults(args)
    flags = {key: value for key, value in vars(args).items() if key not in ("seed", "output")}
    requests = build_requests(task, flags, args.batch_file)
    assign_seeds(requests, args.seed)
    rank, world, local_rank = envs.torchrun_ranks()
    mine = my_share(requests, rank, world)
    logger.info("%s: %d request(s) in all, %d on rank %d of %d", task, len(requests), len(mine), rank, world)
    if task == "understand":
        return run_understanding(args, mine, (rank, world, local_rank))
    settings = image_settings(args).check()
    paths = output_paths(requests, task, args.output, args.output_dir)
    return run_images(args, mine, [paths[r.index] for r in mine], settings, local_rank)


def image_settings(args: argparse.Namespace) -> ImageSettings:
    return ImageSettings(
        timesteps=args.timesteps,
        temperature=args.temperature,
        cfg_scale=args.cfg_scale,
        cfg_img=getattr(args, "cfg_img", 0.0),
        use_cache=args.use_cache,
        cache_ratio=args.cache_ratio,
        warmup_ratio=args.warmup_ratio,
        refresh_interval=args.refresh_interval,
    )


def text_settings(args: argparse.Namespace) -> TextSettings:
    return TextSettings(
        gen_length=args.gen_length,
        block_length=args.block_length,
        steps=args.steps,
        temperature=args.temperature,
        cfg_scale=args.cfg_scale,
    )


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
