"""``dimoo plan sample`` and ``dimoo train CONFIG --plan/--sweep``: memory and time before the hardware exists.

dimoo plan sample --accelerator 910b --width 1024 --height 1024 --cfg-scale 4 --use-cache
WORLD_SIZE=16 dimoo train configs/train/dimoo_8b_ascend.yaml --plan --json plan.json
WORLD_SIZE=64 dimoo train configs/train/dimoo_8b_ascend.yaml --sweep --accelerator 910b
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from dimoo_npu.commands import emit
from dimoo_npu.commands.quantize import add_quantize_argument
from dimoo_npu.modeling.presets import PRESETS
from dimoo_npu.planner.hardware import ACCELERATORS
from dimoo_npu.settings.generation_settings import check_not_negative
from dimoo_npu.utils.errors import InputError
from dimoo_npu.utils.validate import check_image_dimension

DEFAULT_PRESET = "lumina-dimoo-8b"


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("task", choices=("sample",), help="what to plan (training: dimoo train CONFIG --plan)")
    add_accelerator_argument(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="read the model's sizes from this folder's config.json")
    source.add_argument("--preset", choices=sorted(PRESETS), help=f"built-in model sizes (default: {DEFAULT_PRESET})")
    parser.add_argument("--width", type=int, default=1024, help="image width in pixels (a multiple of 16)")
    parser.add_argument("--height", type=int, default=1024, help="image height in pixels (a multiple of 16)")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance; > 0 adds a row")
    parser.add_argument("--use-cache", action="store_true", help="ML-Cache: keep every layer's K/V per row")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens before the image (system + prompt)")
    parser.add_argument("--batch", type=int, help="images per forward to check (default: the largest that fits)")
    add_quantize_argument(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the plan as JSON")


def add_accelerator_argument(parser: argparse.ArgumentParser, default: str | None = "910b") -> None:
    parser.add_argument(
        "--accelerator",
        choices=sorted(ACCELERATORS),
        default=default,
        help="910b (64 GB), h100 (80 GB) or h200 (141 GB); assumptions are printed with the plan",
    )


def add_train_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `dimoo train` takes for planning (no hardware, no weights: model.preset stands in)."""
    parser.add_argument(
        "--plan",
        action="store_true",
        help="per-rank memory by term and the predicted step time for WORLD_SIZE ranks; exit 1 if a rank overflows",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="rank every valid (tp, pp, dp, recompute, micro-batch) for WORLD_SIZE by predicted step time",
    )
    parser.add_argument("--json", metavar="FILE", help="with --plan or --sweep: also write the result as JSON")
    add_accelerator_argument(parser, default=None)


def run(args: argparse.Namespace) -> int:
    from dimoo_npu.modeling.config import DiMOOConfig
    from dimoo_npu.modeling.presets import preset_config
    from dimoo_npu.planner.hardware import accelerator
    from dimoo_npu.planner.sample_plan import SampleSettings, plan_sampling

    for name in ("width", "height"):
        value = check_image_dimension(f"--{name}", getattr(args, name))
        if value < 16 or value % 16:
            raise InputError(
                f"--{name} {value} is not a positive multiple of 16 pixels: use {max(16, value // 16 * 16)}"
            )
    check_not_negative(cfg_scale=args.cfg_scale)
    if args.batch is not None and args.batch < 1:
        raise InputError(f"--batch {args.batch} must be at least 1")
    if args.prompt_tokens < 0:
        raise InputError(f"--prompt-tokens {args.prompt_tokens} must not be negative")
    if args.checkpoint:
        model, name = DiMOOConfig.from_json(args.checkpoint), args.checkpoint
    else:
        name = args.preset or DEFAULT_PRESET
        model = preset_config(name)
    settings = SampleSettings(
        width=args.width, height=args.height, cfg_scale=args.cfg_scale, use_cache=args.use_cache,
        prompt_tokens=args.prompt_tokens, batch=args.batch,
        quantize=args.quantize or model.quantization_config.get("scheme"),
    )  # fmt: skip
    plan = plan_sampling(model, settings, accelerator(args.accelerator))
    emit(plan.format(name))
    _write_json(args.json, plan.to_dict())
    return 0 if plan.fits and plan.largest_batch >= 1 else 1


def plan_train(config: Any, args: argparse.Namespace) -> int:
    """``dimoo train CONFIG --plan`` / ``--sweep``: exit 1 when the layout (or every layout) does not fit."""
    from dimoo_npu.planner.hardware import accelerator
    from dimoo_npu.planner.report import format_plan, format_sweep
    from dimoo_npu.planner.sweep import sweep
    from dimoo_npu.planner.train_plan import layout_of, plan_training
    from dimoo_npu.train.layout import model_config_of, plan_layout
    from dimoo_npu.utils import envs

    world = envs.world_size()
    model = model_config_of(config, planning=True)
    device = accelerator(args.accelerator or ("h100" if config.device == "cuda" else "910b"))
    model_name = config.model.preset or config.model.init_from or "model.config"
    if args.sweep:
        plans, valid = sweep(config, model, world, device)
        emit(format_sweep(plans, valid, world))
        _write_json(args.json, {"world": world, "valid": valid, "fits": [p.to_dict() for p in plans]})
        return 0 if plans else 1
    dims, options = plan_layout(config, model, world)
    plan = plan_training(model, layout_of(config, dims, options, model), device)
    if config.rl is not None:  # Self-GRPO: the reference model and the rollout batch too
        from dimoo_npu.planner.rl_plan import add_rl_terms

        add_rl_terms(plan, config)
    emit(format_plan(plan, model_name))
    _write_json(args.json, plan.to_dict())
    return 0 if plan.fits else 1


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        from dimoo_npu.files.atomic import write_text_atomically

        write_text_atomically(path, json.dumps(payload, indent=1) + "\n")
