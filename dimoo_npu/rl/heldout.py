"""In-run scoring of a Self-GRPO run on the shapes world: the target tasks on a small held-out slice, greedy.

The detector and the true captions score here, never reward: the figures go to ``metrics.jsonl`` as
``heldout_<task>`` so a run shows where it is heading (and where it flattens) without the full `dimoo eval shapes`.
A slice is the first ``limit`` items of the full evaluation's own list, so the two read alike; the caption slice
takes the two-object pictures only (every one-object caption is already right on the bundled model).
"""

from __future__ import annotations

from collections.abc import Sequence

from dimoo_npu.shapes import evaluate, world
from dimoo_npu.utils.errors import ConfigError

HELDOUT_TASKS: tuple[str, ...] = ("t2i", *(f"edit-{kind}" for kind in world.EDITS), "caption", "qa")


def check_heldout_tasks(names: Sequence[str]) -> list[str]:
    """``names`` as a list, or a `ConfigError` naming the first unknown one."""
    for name in names:
        if name not in HELDOUT_TASKS:
            raise ConfigError(f"rl.eval_tasks names {name!r}: use {', '.join(HELDOUT_TASKS)}")
    return list(names)


def score_heldout(
    tasks: Sequence[str],
    limit: int,
    generate: evaluate.ImageGenerator,
    edit: evaluate.ImageEditor,
    answer: evaluate.QuestionAnswerer,
) -> dict[str, float]:
    """``heldout_<task>``: the overall accuracy of each task on its first ``limit`` held-out items."""
    scores = {}
    objects = world.split_objects("heldout")[:limit]
    for task in tasks:
        if task == "t2i":
            score = evaluate.evaluate_t2i(generate, objects, batch_size=limit)
        elif task.startswith("edit-"):
            edits = world.heldout_edits(task.removeprefix("edit-"))[:limit]
            score = evaluate.evaluate_edits(edit, edits, batch_size=limit)
        elif task == "caption":
            scenes = [scene for scene in evaluate.heldout_caption_scenes() if len(scene.objects) == 2][:limit]
            score = evaluate.evaluate_captions(answer, scenes, batch_size=limit)
        else:
            score = evaluate.evaluate_understanding(answer, objects, batch_size=4 * limit)
        scores[f"heldout_{task}"] = score.overall
    return scores
