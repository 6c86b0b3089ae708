"""``dimoo t2i | edit | inpaint | outpaint | understand``: one request from flags or many from --batch-file.

The task's flags are derived from its request type (`dimoo_npu.settings.requests`): one flag per field, with the field's
type and help; the run's own flags (checkpoint, device, batching, where outputs go) are added here. Everything
that needs no transformer is checked before it loads. Torch-free: the work is in `dimoo_npu.commands.generate_run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from dimoo_npu.batch.batch_requests import assign_seeds, build_requests, my_share
from dimoo_npu.commands.quantize import add_quantize_argument
from dimoo_npu.settings.requests import DEFAULTS, TASKS, field_type, generation_defaults, trained_length
from dimoo_npu.tokens.lengths import length_cap
from dimoo_npu.utils import envs
from dimoo_npu.utils.errors import InputError

logger = logging.getLogger("dimoo")

DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Fields that are the run's flags, not defaults for every request: --seed is the base seed (request i: seed + i),
# --output names the file of a single request.
RUN_FIELDS = ("seed", "output")
FLAG_ALIASES = {"output": ["--out"], "question": ["--prompt"]}


def dtype_name(text: str) -> str:
    return DTYPE_ALIASES.get(text, text)


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    common = parser.add_argument_group("model and run")
    add_model_arguments(common)
    common.add_argument("--batch-file", help="JSONL file, one request per line (any field below, snake_case)")
    add_write_arguments(common, "--batch-file")
    if name == "understand":
        common.add_argument("--output", "--out", help="write answers as JSON lines here (default: print them)")
    else:
        common.add_argument("--output-dir", default=".", help="folder for outputs named by the batch file or by index")
    add_request_arguments(parser.add_argument_group(f"{name} request (also the fields of a batch-file line)"), name)


def add_model_arguments(common: argparse._ArgumentGroup) -> None:
    """The checkpoint, device and batching flags every sampling command shares."""
    common.add_argument(
        "--checkpoint",
        help="DiMOO checkpoint folder (config.json, weights, tokenizer, vqvae/), or a Hugging Face repo id already "
        "in the local cache (e.g. Alpha-VLLM/Lumina-DiMOO; nothing is downloaded); default: the bundled model",
    )
    common.add_argument("--device", default="auto", help="auto | cpu | cuda | npu (auto: npu, then cuda, then cpu)")
    common.add_argument("--lora", help="LoRA adapter folder (peft format) merged into the weights at load")
    common.add_argument(
        "--dtype", default="auto", type=dtype_name, choices=DTYPES, help="auto: fp32 on CPU, bf16 otherwise"
    )
    add_quantize_argument(common)
    common.add_argument("--seed", type=int, default=0, help="request i uses seed + i (a batch line may set its own)")
    common.add_argument("--batch-size", type=int, default=4, help="requests per forward, after grouping by size")
    common.add_argument(
        "--max-length",
        type=int,
        help="longest sequence in tokens (default: DIMOO_MAX_LENGTH, else 8192); longer than the checkpoint's "
        "max_sequence_length runs with a warning",
    )
    common.add_argument(
        "--compile", action="store_true", help="graph mode: torch.compile the forward (or DIMOO_COMPILE=1)"
    )


def add_write_arguments(common: argparse._ArgumentGroup, batch: str) -> None:
    """--overwrite or --resume (not both): what to do with outputs an earlier run left."""
    choice = common.add_mutually_exclusive_group()
    choice.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    choice.add_argument(
        "--resume",
        action="store_true",
        help=f"continue an interrupted {batch} run: skip outputs made with the same checkpoint and settings, "
        "redo unreadable ones, refuse (naming the field) ones made otherwise",
    )


def add_request_arguments(group: argparse._ArgumentGroup, task: str, only: tuple[str, ...] = ()) -> None:
    """One flag per field of the task's request type (``only``: these fields); an unset flag stays None (the
    defaults table fills it)."""
    defaults = DEFAULTS[task]
    for field in dataclasses.fields(TASKS[task]):
        if field.name == "seed" or (only and field.name not in only):
            continue
        flags = ["--" + field.name.replace("_", "-"), *FLAG_ALIASES.get(field.name, [])]
        kind = field_type(TASKS[task], field.name)
        help_text = field.metadata["help"]
        if field.name in defaults:
            help_text += f" (default: the checkpoint's, else {defaults[field.name]})"
        if field.name == "output":
            help_text += "; one request only"
        if kind is bool:
            group.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(*flags, dest=field.name, type=kind, help=help_text)


def run(args: argparse.Namespace) -> int:
    from dimoo_npu.commands.generate_run import GenerationRun, run_images, run_understanding
    from dimoo_npu.pipeline import default_checkpoint

    task = args.command
    if args.resume and not args.batch_file:
        raise InputError("--resume continues a --batch-file run: pass the batch file of the run to continue")
    if args.resume and task == "understand" and not args.output:
        raise InputError("--resume reads the answers an earlier run wrote: pass its --output file")
    args.checkpoint = str(args.checkpoint or default_checkpoint())
    flags = {key: value for key, value in vars(args).items() if key not in RUN_FIELDS}
    cap = length_cap(trained_length(args.checkpoint), args.max_length)
    requests = assign_seeds(
        build_requests(task, flags, args.batch_file, generation_defaults(args.checkpoint), cap), args.seed
    )
    rank, world, local_rank = envs.torchrun_ranks()
    mine = my_share(requests, rank, world)
    logger.info("%s: %d request(s) in all, %d on rank %d of %d", task, len(requests), len(mine), rank, world)
    run = GenerationRun(
        task=task,
        checkpoint=args.checkpoint,
        lora=args.lora,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_length=args.max_length,
        compile=args.compile or None,
        quantize=args.quantize,
        overwrite=args.overwrite,
        output=args.output,
        from_batch_file=bool(args.batch_file),
        rank=rank,
        world=world,
        local_rank=local_rank,
        resume=args.resume,
    )
    if task == "understand":
        return run_understanding(run, mine)
    return run_images(run, requests, mine, args.output_dir)
