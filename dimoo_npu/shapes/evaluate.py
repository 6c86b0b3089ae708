"""GenEval-style scoring on the shapes world: text-to-image by detection, understanding by exact answer.

The model is reached only through two callables (prompts -> images, (images, questions) -> answers),
so the scoring is the same for any model or pipeline and can be tested on ground-truth renders.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dimoo_npu.shapes.detect import detect_object
from dimoo_npu.shapes.world import QUESTIONS, Scene, ShapeObject, answer, canonical_caption, question, render_array

logger = logging.getLogger(__name__)

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position")
ImageGenerator = Callable[[list[str]], Sequence[np.ndarray]]
QuestionAnswerer = Callable[[Sequence[np.ndarray], list[str]], Sequence[str]]


@dataclass
class Score:
    """Accuracy per attribute and overall (a sample counts only when every attribute is right)."""

    per_attribute: dict[str, float]
    overall: float
    count: int
    failures: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"overall": self.overall, "per_attribute": self.per_attribute, "count": self.count}


def score_images(expected: Sequence[ShapeObject], images: Sequence[np.ndarray]) -> Score:
    """Detect the object of each image and compare its attributes with what the prompt asked for."""
    if len(expected) != len(images):
        raise ValueError(f"{len(expected)} expected objects but {len(images)} images")
    hits = {name: 0 for name in ATTRIBUTES}
    overall, failures = 0, []
    for obj, image in zip(expected, images, strict=True):
        found = detect_object(np.asarray(image))
        right = {name: found is not None and getattr(found, name) == getattr(obj, name) for name in ATTRIBUTES}
        for name, ok in right.items():
            hits[name] += ok
        overall += all(right.values())
        if not all(right.values()):
            failures.append({"prompt": canonical_caption(obj), "detected": None if found is None else found.__dict__})
    count = max(len(expected), 1)
    return Score({n: hits[n] / count for n in ATTRIBUTES}, overall / count, len(expected), failures)


def normalise_answer(text: str) -> str:
    """Lower case, words only, British spelling: 'Red.' and ' red ' both read 'red'."""
    words = re.findall(r"[a-z]+", text.lower())
    return " ".join(words).replace("color", "colour")


def score_answers(attributes: Sequence[str], expected: Sequence[str], predicted: Sequence[str]) -> Score:
    """Exact-match accuracy (after normalisation) per question attribute and overall."""
    if not len(attributes) == len(expected) == len(predicted):
        raise ValueError(f"{len(attributes)} attributes, {len(expected)} expected, {len(predicted)} predicted")
    totals: dict[str, list[int]] = {}
    failures = []
    for attribute, want, got in zip(attributes, expected, predicted, strict=True):
        ok = normalise_answer(want) == normalise_answer(got)
        totals.setdefault(attribute, [0, 0])
        totals[attribute][0] += ok
        totals[attribute][1] += 1
        if not ok:
            failures.append({"attribute": attribute, "expected": want, "answer": got})
    count = len(expected)
    per_attribute = {name: hit / total for name, (hit, total) in totals.items()}
    overall = sum(hit for hit, _ in totals.values()) / max(count, 1)
    return Score(per_attribute, overall, count, failures)


def evaluate_t2i(generate: ImageGenerator, objects: Sequence[ShapeObject], batch_size: int = 8) -> Score:
    """Generate one image per held-out prompt (canonical phrasing) and score it."""
    prompts = [canonical_caption(obj) for obj in objects]
    images: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        images.extend(generate(prompts[start : start + batch_size]))
    score = score_images(objects, images)
    logger.info("text-to-image: overall %.3f %s", score.overall, score.per_attribute)
    return score


def understanding_items(objects: Sequence[ShapeObject], seed: int = 0) -> list[tuple[ShapeObject, str, str, str]]:
    """(object, attribute, question, expected answer) for every object and every question attribute."""
    rng = random.Random(seed)
    return [(obj, name, question(obj, name, rng), answer(obj, name)) for obj in objects for name in QUESTIONS]


def evaluate_understanding(
    answer_questions: QuestionAnswerer, objects: Sequence[ShapeObject], batch_size: int = 16, seed: int = 0
) -> Score:
    """Ask every question type about each held-out image (ground-truth render) and score the answers."""
    items = understanding_items(objects, seed)
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = [render_array(Scene((obj,))) for obj, *_ in chunk]
        answers.extend(answer_questions(images, [q for _, _, q, _ in chunk]))
    score = score_answers([a for _, a, _, _ in items], [e for *_, e in items], answers)
    logger.info("understanding: overall %.3f %s", score.overall, score.per_attribute)
    return score
