"""A local lmms-eval task over the bundled model's world: the questions of ``dimoo eval shapes --task qa``.

``python -m dimoo_npu.integrations.shapes_task --output-dir D [--limit N]`` writes D/dimoo_shapes_qa.yaml, D/utils.py,
D/test.jsonl and D/images/ (the held-out pictures, rendered here: nothing is downloaded); then
``lmms-eval --model dimoo --tasks dimoo_shapes_qa --include_path D`` scores the same items, in the same order and
by the same exact-match rule (`dimoo_npu.shapes.evaluate.score_answers`), as ``dimoo eval shapes --task qa
--limit N``. lmms-eval is not needed to write the task.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from dimoo_npu.files.atomic import replace_directory
from dimoo_npu.utils.errors import InputError

TASK_NAME = "dimoo_shapes_qa"
METRIC = "accuracy"

_YAML = """\
# Written by python -m dimoo_npu.integrations.shapes_task: questions about held-out shapes-world pictures.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  items: {items}
"""

_UTILS = '''\
"""lmms-eval functions of the {task} task (written by python -m dimoo_npu.integrations.shapes_task)."""

from pathlib import Path

from dimoo_npu.integrations.shapes_task import task_functions

doc_to_visual, doc_to_text, process_results = task_functions(Path(__file__).resolve().parent)
'''


def task_items(limit: int | None = None, seed: int = 0) -> list[dict]:
    """The question items of ``dimoo eval shapes --task qa --limit N --seed S`` (held-out, canonical placements),
    in its order, each with its picture as an array."""
    from dimoo_npu.shapes import evaluate, world

    objects = world.split_objects("heldout")[: limit or None]
    return [
        {
            "attribute": attribute,
            "question": question,
            "answer": answer,
            "picture": world.render_array(world.Scene((obj,))),
        }
        for obj, attribute, question, answer in evaluate.understanding_items(objects, seed)
    ]


def write_task(folder: str | Path, limit: int | None = None, seed: int = 0) -> Path:
    """The task folder (refused if it already holds anything: nothing the user had is replaced)."""
    folder = Path(folder).resolve()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"--output-dir {folder} exists and is not an empty folder: name a new folder")
    items = task_items(limit, seed)

    def fill(staging: Path) -> None:
        (staging / "images").mkdir()
        lines = []
        for index, item in enumerate(items):
            name = f"images/{index:04d}.png"
            Image.fromarray(item["picture"]).save(staging / name)
            fields = {key: item[key] for key in ("attribute", "question", "answer")}
            lines.append(json.dumps({"id": index, "image": name, **fields}))
        (staging / "test.jsonl").write_text("\n".join(lines) + "\n")
        (staging / f"{TASK_NAME}.yaml").write_text(
            _YAML.format(task=TASK_NAME, data=json.dumps(str(folder / "test.jsonl")), metric=METRIC, items=len(items))
        )
        (staging / "utils.py").write_text(_UTILS.format(task=TASK_NAME))

    return replace_directory(folder, fill)


def task_functions(folder: Path) -> tuple[Callable, Callable, Callable]:
    """doc_to_visual, doc_to_text and process_results of the task written in ``folder``."""
    from dimoo_npu.shapes.evaluate import normalise_answer

    def doc_to_visual(doc: dict) -> list[Image.Image]:
        with Image.open(folder / doc["image"]) as picture:
            return [picture.convert("RGB")]

    def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
        return doc["question"]

    def process_results(doc: dict, results: list[str]) -> dict[str, float]:
        return {METRIC: float(normalise_answer(results[0]) == normalise_answer(doc["answer"]))}

    return doc_to_visual, doc_to_text, process_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dimoo_npu.integrations.shapes_task", description=__doc__)
    parser.add_argument("--output-dir", required=True, help="a new (or empty) folder for the task")
    parser.add_argument("--limit", type=int, default=0, help="only the first N held-out objects, 4 questions each")
    parser.add_argument("--seed", type=int, default=0, help="question phrasing seed (dimoo eval shapes --seed)")
    args = parser.parse_args(argv)
    try:
        folder = write_task(args.output_dir, args.limit or None, args.seed)
    except InputError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    sys.stdout.write(f"{folder}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
