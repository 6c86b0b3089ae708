"""The ``dimoo`` command: parses arguments and hands them to one command module.

Each command lives in ``dimoo_npu.commands.<module>`` with ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run`` so ``dimoo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dimoo_npu import envs
from dimoo_npu.adapters import BackendUnavailableError
from dimoo_npu.errors import DimooError

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
    "eval": ("eval", "GenEval-style accuracy on the shapes world (text-to-image and understanding, held out)"),
    "pretokenize": ("train", "JSONL manifest -> token shards for training (parallel, resumable, bad records reported)"),
    "train": ("train", "masked-diffusion fine-tuning from a YAML config (one process or torchrun; tp/pp/dp)"),
    "export-hf": ("train", "training checkpoint -> Hugging Face safetensors folder that load_model reads"),
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
        return int(args._module.run(args) or 0)
    except (DimooError, BackendUnavailableError, FileNotFoundError, FileExistsError) as err:
        logging.getLogger("dimoo").error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
