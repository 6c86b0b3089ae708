"""``dimoo pretokenize``, ``dimoo train`` and ``dimoo export-hf``: from a manifest to a fine-tuned checkpoint.

dimoo pretokenize data/manifest.jsonl data/shards --checkpoint Alpha-VLLM/Lumina-DiMOO --workers 8
dimoo train configs/train/dimoo_8b_ascend.yaml data.shards=data/shards lr=2e-5      # or under torchrun
dimoo export-hf runs/dimoo-8b/checkpoints runs/dimoo-8b/hf
"""

from __future__ import annotations

import argparse

from dimoo_npu.commands import emit
from dimoo_npu.commands.plan import add_train_plan_arguments, plan_train
from dimoo_npu.utils import envs


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    {"train": _train_arguments, "pretokenize": _pretokenize_arguments, "export-hf": _export_arguments}[name](parser)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (configs/train/*.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides: section.key=value or a unique key (lr=1e-4 train_iters=100)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config and the parallel layout for this world size, then exit",
    )
    add_train_plan_arguments(parser)


def _pretokenize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "manifest",
        help="JSONL, one record per line: id, task (t2i|edit|inpaint|mmu), prompt, image, target_image, answer",
    )
    parser.add_argument("output", help="folder for shard-*.safetensors and rejected.jsonl (a rerun resumes)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder: text tokenizer, vqvae/, config.json")
    parser.add_argument(
        "--max-length",
        type=int,
        help="reject samples longer than this (tokens); default: the model's max_sequence_length",
    )
    parser.add_argument(
        "--image-budget",
        type=int,
        help="crop images to the closest bucket of this size (pixels); 0 keeps their size; default: the "
        "checkpoint's generation_defaults image_budget, else 512",
    )
    parser.add_argument(
        "--answer-length",
        type=int,
        help="understanding answers are padded to this; default: the checkpoint's generation_defaults gen_length, "
        "else 256",
    )
    parser.add_argument("--chunk-size", type=int, default=1000, help="records per shard")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--device", default="cpu", help="where the VQ encoder runs (cpu, cuda, npu)")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run's checkpoints/ folder (its latest) or one step-* folder")
    parser.add_argument("output", help="folder to write config.json + safetensors (the layout load_model reads)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="weight dtype")
    parser.add_argument(
        "--assets-from", help="copy tokenizer files and vqvae/ from here (default: the run's model.init_from)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder (swapped whole)")
    parser.add_argument("--merge-lora", action="store_true", help="a LoRA run's checkpoint: merge its adapter in")


def run(args: argparse.Namespace) -> int:
    return {"train": _train, "pretokenize": _pretokenize, "export-hf": _export}[args.command](args)


def _train(args: argparse.Namespace) -> int:
    from dimoo_npu.train.config import load_config

    config = load_config(args.config, args.overrides)
    if args.plan or args.sweep:
        return plan_train(config, args)
    if args.check:
        from dimoo_npu.train.layout import model_config_of, plan_layout

        world = envs.world_size()
        dims, options = plan_layout(config, model_config_of(config, planning=True), world)
        emit(
            f"ok: world {world} = pp {dims.pp} x dp {dims.dp} x tp {dims.tp}, {options.microbatches} "
            f"micro-batch(es) of {config.gpt_args.micro_batch_size} per step"
        )
        return 0
    if config.rl is not None:
        from dimoo_npu.rl.trainer import run_grpo as run_training
    else:
        from dimoo_npu.train.trainer import run_training

    losses = run_training(config)
    if losses and envs.torchrun_ranks()[0] == 0:
        emit(f"trained {len(losses)} step(s); last loss {losses[-1]:.4f}; metrics in {config.output_dir}/metrics.jsonl")
    return 0


def _pretokenize(args: argparse.Namespace) -> int:
    from dimoo_npu.modeling.config import DiMOOConfig
    from dimoo_npu.settings.requests import field_maxima
    from dimoo_npu.train.encode import EncoderSettings
    from dimoo_npu.train.pretokenize import REJECTED, pretokenize
    from dimoo_npu.utils.validate import check_int

    model = DiMOOConfig.from_json(args.checkpoint)  # limits the user leaves out are the checkpoint's own
    tuned = model.generation_defaults
    image_budget = args.image_budget if args.image_budget is not None else tuned.get("image_budget", 512)
    max_length = args.max_length or model.max_sequence_length
    answer_length = args.answer_length or tuned.get("gen_length", 256)
    maxima = field_maxima(max_length)  # the generation commands' rule: no record can fit past these
    check_int("--image-budget", image_budget, 0, maxima["image_budget"], f" for --max-length {max_length}")
    check_int("--answer-length", answer_length, 1, maxima["gen_length"], f" for --max-length {max_length}")
    settings = EncoderSettings(
        checkpoint=args.checkpoint,
        max_length=max_length,
        image_budget=image_budget or None,
        answer_length=answer_length,
        device=args.device,
    )
    summary = pretokenize(args.manifest, args.output, settings, args.chunk_size, args.workers)
    if summary.samples == 0 and summary.chunks_skipped == 0:
        from dimoo_npu.utils.errors import InputError

        raise InputError(
            f"no sample written: all {summary.rejected} record(s) were rejected: see {args.output}/{REJECTED} "
            "for each reason, fix the records or the limits (--max-length, --image-budget, --answer-length)"
        )
    emit(
        f"{summary.samples} sample(s) written, {summary.rejected} rejected (see {args.output}/{REJECTED}), "
        f"{summary.chunks_skipped} shard(s) already done"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from dimoo_npu.train.checkpoint import export_hf

    folder = export_hf(
        args.checkpoint, args.output, getattr(torch, args.dtype), args.assets_from, args.overwrite, args.merge_lora
    )
    emit(f"exported to {folder}")
    return 0
