"""The ``dimoo`` command: parses arguments and hands them to one command module.

Each command lives in ``dimoo_npu.commands.<module>`` with ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run`` so ``dimoo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from dimoo_npu.utils import envs
from dimoo_npu.utils.errors import BackendUnavailableError, DimooError
from dimoo_npu.utils.validate import check_args

# command name -> (module under dimoo_npu.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("check", "compare every layer of a checkpoint across backends (cpu-ref, cpu, npu, cuda, onnxruntime)"),
    "export-onnx": ("export", "export the transformer and the VQ decoder to ONNX, checked in onnxruntime"),
    "doctor": ("doctor", "which backends work here and why not, versions, op implementations, one-line fixes"),
    "t2i": ("generate", "text-to-image: any size that is a multiple of 16, batched, PNGs with their settings"),
    "edit": ("generate", "image-to-image: editing, control, dense prediction, subject, style transfer, multi-view"),
    "inpaint": ("generate", "regenerate a centred box or the white region of a mask image"),
    "outpaint": ("generate", "regenerate outside a centred box (or the white region of a mask image)"),
    "understand": ("generate", "answer a question about an image"),
    "eval": (
        "eval",
        "GenEval-style accuracy on the shapes world, held out: t2i, edits, inpaint/outpaint, questions, captions",
    ),
    "pretokenize": ("train", "JSONL manifest -> token shards for training (parallel, resumable, bad records reported)"),
    "train": ("train", "masked-diffusion fine-tuning from a YAML config (one process or torchrun; tp/pp/dp)"),
    "export-hf": ("train", "training checkpoint -> Hugging Face safetensors folder that load_model reads"),
    "serve": ("serve", "OpenAI-compatible HTTP server (images, edits, chat) with continuous batching"),
    "bench": ("bench", "GenEval / DPG-Bench images from your prompts, in the layout their evaluators read"),
    "quantize": ("quantize", "float checkpoint -> int8 checkpoint (w8a8: int8 weights and activations; w8a16)"),
    "plan": ("plan", "memory of sampling for a size, batch and CFG on an accelerator (training: train --plan)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dimoo", description="Lumina-DiMOO on Ascend NPU, CUDA and CPU")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"dimoo_npu.commands.{module_name}")
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command, name)
        command.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=envs.log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_args(vars(args))
        return int(args._module.run(args) or 0)
    except BaseException as err:  # the one place exceptions become exit codes (DCP's are BaseExceptions)
        if isinstance(err, (SystemExit, GeneratorExit)):
            raise
        return exit_code(err, sys.argv[1:] if argv is None else argv)


# errno -> what to do about it; these OSErrors are the user's to fix (exit 2), not bugs.
DISK_ERRORS = {
    errno.ENOSPC: "free some space, or write somewhere else",
    errno.EDQUOT: "free some space under your quota, or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EACCES: "check its permissions, or use another path",
    errno.EPERM: "check its permissions, or use another path",
}


def exit_code(err: BaseException, argv: list[str]) -> int:
    """User errors: one line, exit 2. Ctrl-C: 130. Anything else: one line naming the traceback's file, exit 1."""
    log = logging.getLogger("dimoo")
    if isinstance(err, (DimooError, BackendUnavailableError, FileNotFoundError, FileExistsError)):
        log.error("%s", err)
        return 2
    if isinstance(err, OSError) and err.errno in DISK_ERRORS:
        log.error("%s%s: %s", err.strerror, f" ({err.filename})" if err.filename else "", DISK_ERRORS[err.errno])
        return 2
    if isinstance(err, KeyboardInterrupt):
        log.error("interrupted: no partial output was kept (outputs are written under temporary names first)")
        return 130
    where = None if envs.debug() else write_traceback(err, argv)
    if where is None:  # asked for, or the temp folder cannot take it: print it in full
        log.error("unexpected error", exc_info=err)
        return 1
    first_line = (str(err).strip().splitlines() or [""])[0][:300]
    log.error(
        "unexpected error %s: %s; the full traceback is in %s (report it, or set DIMOO_DEBUG=1 to print it)",
        type(err).__name__,
        first_line,
        where,
    )
    return 1


def write_traceback(err: BaseException, argv: list[str]) -> Path | None:
    """The command line and the traceback in a new file under the temp folder (None if it cannot be written)."""
    try:
        handle, name = tempfile.mkstemp(prefix=f"dimoo-error-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(f"dimoo {' '.join(argv)}\n\n")
            file.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
    except OSError:
        return None
    return Path(name)


if __name__ == "__main__":
    sys.exit(main())
