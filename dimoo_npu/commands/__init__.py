"""One module per `dimoo` command (see `dimoo_npu.cli`)."""

import sys


def emit(text: str) -> None:
    """A command's result on stdout (logs and progress go to stderr through logging and tqdm)."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()
