"""Write a small training manifest of the shapes world: the fine-tuning walk-through's data on CPU.

    python scripts/make_shapes_manifest.py data                   # data/manifest.jsonl, data/images/, data/masks/
    python scripts/make_shapes_manifest.py data --mix-scale 0.05  # 5% of the bundled model's training mix

The records use the README's manifest layout (relative image paths, read from the manifest's folder), and
training-split scenes only, so `dimoo eval shapes` stays held out.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from pathlib import Path


def mix_scale(text: str) -> float:
    """A share of the default mix in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
    if not math.isfinite(value) or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is outside (0, 1]: e.g. 0.01 for 1% of the mix")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where manifest.jsonl, images/ and masks/ go (new or empty)")
    parser.add_argument("--mix-scale", type=mix_scale, default=0.01, help="share of the default mix (default 0.01)")
    parser.add_argument("--seed", type=int, default=1, help="scene seed (the bundled model's own run used 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.folder.exists() and (not args.folder.is_dir() or any(args.folder.iterdir())):
        parser.error(f"{args.folder} exists and is not an empty folder: name a new one")
    from dimoo_npu.shapes.dataset import DataMix, scaled, write_manifest

    mix = dataclasses.replace(scaled(DataMix(), args.mix_scale), seed=args.seed)
    write_manifest(args.folder, mix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
