"""Benchmark prompt sets read from the user's own copy (nothing is downloaded), and where each benchmark's
evaluator expects the images (`dimoo bench`).

- GenEval (``djghosh13/geneval``, ``prompts/evaluation_metadata.jsonl``): one JSON object per line with at
  least ``tag`` and ``prompt``; its ``evaluation/evaluate_images.py`` reads ``<D>/<05d>/metadata.jsonl`` (that
  line, one JSON object) and every ``<D>/<05d>/samples/<digits>.png``.
- DPG-Bench (ELLA repository, ``dpg_bench/prompts/``): a folder of ``<id>.txt`` files holding one prompt each;
  its ``compute_dpg_bench.py`` reads ``<D>/<id>.png``, a 2 x 2 grid of 4 samples cut by ``--resolution``.
Torch-free.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from dimoo_npu.utils.errors import InputError
from dimoo_npu.utils.validate import read_text_file, resolved

DPG_SAMPLES = 4  # the 2 x 2 grid the evaluator cuts


@dataclass(frozen=True)
class BenchPrompt:
    """One prompt of a set: the name its outputs take, the text, and (GenEval) its metadata line."""

    name: str
    prompt: str
    metadata: str = ""


def read_geneval(path: str | os.PathLike) -> list[BenchPrompt]:
    """``evaluation_metadata.jsonl``: every non-blank line a JSON object with string ``tag`` and ``prompt``."""
    path = Path(path)
    if resolved(path, "GenEval prompts").is_dir():
        raise InputError(f"GenEval prompts {path} is a folder: pass the evaluation_metadata.jsonl file")
    prompts = []
    for number, line in enumerate(read_text_file(path, "GenEval prompts").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(
                f"{path}:{number} is not valid JSON ({err.msg}): GenEval prompts are evaluation_metadata.jsonl, "
                'one object per line like {"tag": "single_object", "include": [...], "prompt": "a photo of a cat"}'
            ) from None
        for key in ("tag", "prompt"):
            if not isinstance(item, dict) or not isinstance(item.get(key), str) or not item[key].strip():
                raise InputError(
                    f"{path}:{number} has no {key} string: GenEval metadata lines carry tag, include and prompt"
                )
        prompts.append(BenchPrompt(f"{len(prompts):05d}", item["prompt"], line.strip()))
    if not prompts:
        raise InputError(f"GenEval prompts {path} has no lines: pass prompts/evaluation_metadata.jsonl")
    return prompts


def read_dpg(folder: str | os.PathLike) -> list[BenchPrompt]:
    """DPG-Bench's ``prompts/`` folder: each ``<id>.txt`` one prompt on one line, taken in name order."""
    folder = Path(folder)
    if not resolved(folder, "DPG-Bench prompts").is_dir():
        raise InputError(
            f"DPG-Bench prompts {folder} is not a folder: pass dpg_bench/prompts (one .txt file per prompt)"
        )
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise InputError(f"DPG-Bench prompts {folder} holds no .txt files: pass dpg_bench/prompts")
    prompts = []
    for file in files:
        lines = [(n, line.strip()) for n, line in enumerate(read_text_file(file, "prompt").splitlines(), 1)]
        lines = [(n, line) for n, line in lines if line]
        if not lines:
            raise InputError(f"{file}:1 is empty: a DPG-Bench prompt file holds one prompt")
        if len(lines) > 1:
            raise InputError(f"{file}:{lines[1][0]} is a second prompt: a DPG-Bench prompt file holds one line")
        prompts.append(BenchPrompt(file.stem, lines[0][1]))
    return prompts


READERS = {"geneval": read_geneval, "dpg": read_dpg}


def sample_outputs(benchmark: str, prompt: BenchPrompt, samples: int) -> list[str]:
    """The PNGs sampled for one prompt, relative to the output folder (DPG's are staged, then gridded)."""
    if benchmark == "geneval":
        return [f"{prompt.name}/samples/{j:04d}.png" for j in range(samples)]
    return [f".samples/{prompt.name}/{j}.png" for j in range(samples)]
