"""GenEval-style scoring on the shapes world: pictures by detection, answers and captions by exact text.

The model is reached only through callables (prompts -> images, (images, questions) -> answers, ...),
so the scoring is the same for any model or pipeline and can be tested on ground-truth renders.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dimoo_npu.shapes import world
from dimoo_npu.shapes.detect import detect_object, detect_objects
from dimoo_npu.shapes.world import QUESTIONS, Scene, ShapeObject, answer, canonical_caption, question, render_array

logger = logging.getLogger(__name__)

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position")
ImageGenerator = Callable[[list[str]], Sequence[np.ndarray]]
QuestionAnswerer = Callable[[Sequence[np.ndarray], list[str]], Sequence[str]]
# (source images, instructions, edit types) -> edited images
ImageEditor = Callable[[Sequence[np.ndarray], list[str], list[str]], Sequence[np.ndarray]]
# (images, masks (white = regenerate), prompts) -> completed images
Painter = Callable[[Sequence[np.ndarray], Sequence[np.ndarray], list[str]], Sequence[np.ndarray]]


@dataclass
class Score:
    """Accuracy per attribute and overall (a sample counts only when every attribute is right); ``breakdown``:
    overall accuracy of named subsets (captions: one-object and two-object pictures)."""

    per_attribute: dict[str, float]
    overall: float
    count: int
    failures: list[dict] = field(default_factory=list)
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        summary = {"overall": self.overall, "per_attribute": self.per_attribute, "count": self.count}
        return {**summary, "breakdown": self.breakdown} if self.breakdown else summary


def score_images(expected: Sequence[ShapeObject], images: Sequence[np.ndarray], whole: bool = False) -> Score:
    """Detect the object of each image and compare its attributes with what the prompt asked for.

    ``whole`` also asks for a complete object (a box about as high as wide): a painting that leaves half
    an object can still read right on every attribute."""
    if len(expected) != len(images):
        raise ValueError(f"{len(expected)} expected objects but {len(images)} images")
    names = (*ATTRIBUTES, "whole") if whole else ATTRIBUTES
    hits = {name: 0 for name in names}
    overall, failures = 0, []
    for obj, image in zip(expected, images, strict=True):
        found = detect_object(np.asarray(image))
        right = {name: found is not None and getattr(found, name) == getattr(obj, name) for name in ATTRIBUTES}
        if whole:
            right["whole"] = found is not None and found.whole
        for name, ok in right.items():
            hits[name] += ok
        overall += all(right.values())
        if not all(right.values()):
            failures.append({"prompt": canonical_caption(obj), "detected": None if found is None else found.__dict__})
    count = max(len(expected), 1)
    return Score({n: hits[n] / count for n in names}, overall / count, len(expected), failures)


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


def _looks(objects) -> list[tuple[str, str, str, str]]:
    return sorted((o.shape, o.colour, o.size, o.position) for o in objects)


def score_edits(edits: Sequence[world.Edit], images: Sequence[np.ndarray]) -> Score:
    """An edit is right when the picture holds exactly the target's objects (every attribute); per attribute:
    the edited object (for 'remove': 'removed', nothing left in its third, and 'kept', the others intact)."""
    if len(edits) != len(images):
        raise ValueError(f"{len(edits)} edits but {len(images)} images")
    hits: dict[str, int] = {}
    overall, failures = 0, []
    for edit, image in zip(edits, images, strict=True):
        found = detect_objects(np.asarray(image))
        ok = _looks(found) == _looks(edit.target.objects)
        overall += ok
        if edit.kind == "remove":
            right = {
                "removed": all(d.position != edit.edited.position for d in found),
                "kept": set(_looks(edit.target.objects)) <= set(_looks(found)),
            }
        else:
            there = [d for d in found if d.position == edit.edited.position] or found[:1]
            right = {name: bool(there) and getattr(there[0], name) == getattr(edit.edited, name) for name in ATTRIBUTES}
        for name, good in right.items():
            hits[name] = hits.get(name, 0) + good
        if not ok:
            failures.append(
                {
                    "instruction": edit.instruction,
                    "source": world.scene_caption(edit.source),
                    "detected": [d.__dict__ for d in found],
                }
            )
    count = max(len(edits), 1)
    return Score({n: hit / count for n, hit in hits.items()}, overall / count, len(edits), failures)


def evaluate_edits(edit_images: ImageEditor, edits: Sequence[world.Edit], batch_size: int = 8) -> Score:
    """Apply every edit to its source picture (ground-truth render) and score the result."""
    images: list[np.ndarray] = []
    for start in range(0, len(edits), batch_size):
        chunk = edits[start : start + batch_size]
        sources = [render_array(edit.source) for edit in chunk]
        images.extend(edit_images(sources, [e.instruction for e in chunk], [e.edit_type for e in chunk]))
    score = score_edits(edits, images)
    logger.info("edit %s: overall %.3f %s", edits[0].kind if edits else "-", score.overall, score.per_attribute)
    return score


def heldout_caption_scenes(seed: int = 0) -> list[Scene]:
    """One picture per held-out combination, at its canonical centre; every other one beside a trained object."""
    rng = random.Random(seed)
    scenes = []
    for index, obj in enumerate(world.split_objects("heldout")):
        while index % 2:
            pair = (obj, world.random_object(rng))
            if world.fits(pair):
                scenes.append(Scene(pair))
                break
        else:
            scenes.append(Scene((obj,)))
    return scenes


def score_captions(scenes: Sequence[Scene], predicted: Sequence[str]) -> Score:
    """Exact canonical caption (overall); per attribute: every object's value read back from the caption."""
    if len(scenes) != len(predicted):
        raise ValueError(f"{len(scenes)} scenes but {len(predicted)} captions")
    hits = {name: 0 for name in ATTRIBUTES}
    overall, failures = 0, []
    by_objects: dict[str, list[int]] = {}
    for scene, text in zip(scenes, predicted, strict=True):
        want = world.scene_caption(scene)
        ok = normalise_answer(text) == normalise_answer(want)
        overall += ok
        subset = by_objects.setdefault(CAPTION_SUBSETS[len(scene.objects)], [0, 0])
        subset[0] += ok
        subset[1] += 1
        ordered = sorted(scene.objects, key=lambda obj: (obj.row, obj.col))
        read = world.parse_caption(text)
        for name in ATTRIBUTES:
            hits[name] += len(read) == len(ordered) and all(
                got[name] == getattr(obj, name) for got, obj in zip(read, ordered, strict=True)
            )
        if not ok:
            failures.append({"expected": want, "caption": text})
    count = max(len(scenes), 1)
    breakdown = {name: {"overall": hit / total, "count": total} for name, (hit, total) in sorted(by_objects.items())}
    return Score({n: hits[n] / count for n in ATTRIBUTES}, overall / count, len(scenes), failures, breakdown)


CAPTION_SUBSETS = {1: "one_object", 2: "two_objects"}  # `score_captions` breakdown names, by objects pictured


def evaluate_captions(answer_questions: QuestionAnswerer, scenes: Sequence[Scene], batch_size: int = 16) -> Score:
    """Ask for a caption of each picture (the two phrasings in turn) and compare with the canonical one."""
    captions: list[str] = []
    for start in range(0, len(scenes), batch_size):
        chunk = range(start, min(start + batch_size, len(scenes)))
        asked = [world.CAPTION_QUESTIONS[i % len(world.CAPTION_QUESTIONS)] for i in chunk]
        captions.extend(answer_questions([render_array(scenes[i]) for i in chunk], asked))
    score = score_captions(scenes, captions)
    logger.info("captions: overall %.3f %s", score.overall, score.per_attribute)
    return score


def paint_items(kind: str, seed: int = 0) -> list[tuple[ShapeObject, np.ndarray]]:
    """(object, mask) per held-out combination at a random placement: a region cutting through the object."""
    rng = random.Random(seed)
    items = []
    for obj in world.split_objects("heldout"):
        shown = world.placed(obj, rng)
        mask = world.region_mask(world.paint_region(shown, kind, rng), kind)
        items.append((shown, np.asarray(mask)))
    return items


def evaluate_paint(
    paint: Painter, items: Sequence[tuple[ShapeObject, np.ndarray]], batch_size: int = 8, kind: str = "inpaint"
) -> Score:
    """Complete each picture inside (inpaint) or outside (outpaint) its mask and detect the completed object."""
    images: list[np.ndarray] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        pictures = [render_array(Scene((obj,))) for obj, _ in chunk]
        images.extend(paint(pictures, [mask for _, mask in chunk], [canonical_caption(obj) for obj, _ in chunk]))
    score = score_images([obj for obj, _ in items], images, whole=True)
    logger.info("%s: overall %.3f %s", kind, score.overall, score.per_attribute)
    return score
