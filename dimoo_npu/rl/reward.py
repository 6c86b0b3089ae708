"""Rewards of Self-GRPO: a reward spec (prompts with question/answer pairs) and what turns images into rewards.

Self-reward (the Lumina-DiMOO paper's Self-GRPO: generate, understand, assess, reward): a model answers every
question of a prompt's spec about the image generated for it, and the reward is the fraction of answers that
match the expected ones (after `dimoo_npu.shapes.evaluate.normalise_answer`). The spec comes from the shapes world
(a question per attribute a prompt states, its answer from the same attribute) or from a JSONL file
(``{"prompt": ..., "questions": [{"question": ..., "answer": ...}, ...]}`` per line). Beside text-to-image, the shapes
world gives edit items (an instruction, its source picture and the one right target; each question is asked about
one object's place in the result, the rest painted white: `object_view`) and caption items (a picture and its
canonical caption); an answer to a caption question earns the share of the expected objects' attributes it reads
right (`caption_credit`), any other answer 1 or 0. An external reward
``module:function`` takes PIL RGB images and prompt strings and returns one float in [0, 1] per image; it is code
the user names in the run config, imported as such.
"""

from __future__ import annotations

import importlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dimoo_npu.shapes import world
from dimoo_npu.shapes.evaluate import normalise_answer
from dimoo_npu.utils.errors import ConfigError, InputError

SHAPES_SPEC = "shapes"
# Rollout tasks of the shapes world. Removal has no self-reward: a picture left empty answers no question.
SHAPES_TASKS: tuple[str, ...] = ("t2i", *(f"edit-{kind}" for kind in world.EDITS if kind != "remove"), "caption")
Answerer = Callable[[list[Image.Image], list[str]], list[str]]
RewardFunction = Callable[[list[Image.Image], list[str]], Sequence[float]]


class RewardError(InputError):
    """A reward function failed or returned something that is not a reward: the run stops before the update."""


@dataclass(frozen=True)
class RewardItem:
    prompt: str
    questions: tuple[tuple[str, str], ...]  # (question, expected answer)
    scene: world.Scene | None = field(default=None, compare=False)  # what the prompt asks for (shapes world)
    task: str = "t2i"  # a SHAPES_TASKS name: how the item is rolled out
    source: world.Scene | None = field(default=None, compare=False)  # an edit's source picture
    edit_type: str | None = None  # an edit's public edit type (`dimoo edit --edit-type`)
    views: tuple[int, ...] = ()  # per question: the index of the scene object whose `object_view` it asks about


def shapes_spec(attributes: Sequence[str] | None, seed: int) -> list[RewardItem]:
    """One item per single-object combination of the training split: its canonical caption, and one question
    per asked attribute (phrasing drawn from ``seed``) with the attribute's value as the answer."""
    asked = list(world.QUESTIONS) if attributes is None else list(attributes)
    if not asked:
        raise ConfigError(f"rl.attributes is empty: name at least one of {', '.join(world.QUESTIONS)}")
    unknown = [name for name in asked if name not in world.QUESTIONS]
    if unknown:
        raise ConfigError(
            f"rl.attributes names {unknown[0]!r}, which the shapes world has no question for: "
            f"use {', '.join(world.QUESTIONS)}"
        )
    rng = random.Random(seed)
    return [
        RewardItem(
            world.canonical_caption(obj),
            tuple((world.question(obj, name, rng), world.answer(obj, name)) for name in asked),
            world.Scene((obj,)),
        )
        for obj in world.split_objects("train")
    ]


# One phrasing per attribute that does not name the shape (the judge must not be told what to see).
VIEW_QUESTIONS = {name: next(q for q in phrasings if "{shape}" not in q) for name, phrasings in world.QUESTIONS.items()}


def shapes_task_spec(task: str, seed: int, count: int) -> list[RewardItem]:
    """``count`` training-split items of an edit or caption ``task`` (`SHAPES_TASKS`), drawn from ``seed``.

    An edit's result is judged object by object: every attribute of every target object is asked about that
    object's `object_view` of the picture, a one-object picture of the kind the model answers best (0.99 held out;
    on a two-object picture it names a shape's colour, position and size only 0.56, 0.31 and 0.69 of the time)."""
    if task not in SHAPES_TASKS or task == "t2i":
        raise ConfigError(f"rl.tasks names {task!r}: use {', '.join(SHAPES_TASKS)}")
    rng = random.Random(f"{seed}:{task}")
    items = []
    for index in range(count):
        asked = world.CAPTION_QUESTIONS[index % len(world.CAPTION_QUESTIONS)]
        if task == "caption":
            scene = world.picture_scene(rng, 1 + index % 2)  # one and two objects in turn
            items.append(RewardItem(asked, ((asked, world.scene_caption(scene)),), scene, task))
            continue
        edit = world.sample_edit(task.removeprefix("edit-"), rng)
        asks = [(index, name) for index in range(len(edit.target.objects)) for name in VIEW_QUESTIONS]
        questions = tuple((VIEW_QUESTIONS[name], world.answer(edit.target.objects[i], name)) for i, name in asks)
        views = tuple(index for index, _ in asks)
        items.append(RewardItem(edit.instruction, questions, edit.target, task, edit.source, edit.edit_type, views))
    return items


def object_view(picture: Image.Image, scene: world.Scene, index: int) -> Image.Image:
    """``picture`` painted white except where ``scene.objects[index]`` belongs: its third of the picture and its code
    cells, less the code cells of the other objects (objects share no cell), so one object is left to ask about."""
    obj, keep = scene.objects[index], np.zeros((world.IMAGE_SIZE, world.IMAGE_SIZE), dtype=bool)
    bounds = (0, *world.REGION_BOUNDS, world.IMAGE_SIZE)
    keep[round(bounds[obj.row]) : round(bounds[obj.row + 1]), round(bounds[obj.col]) : round(bounds[obj.col + 1])] = (
        True
    )
    for other_index, other in enumerate(scene.objects):
        for row, col in world.cells(other):
            cell = np.s_[
                row * world.CODE_CELL : (row + 1) * world.CODE_CELL, col * world.CODE_CELL : (col + 1) * world.CODE_CELL
            ]
            keep[cell] = other_index == index
    pixels = np.asarray(picture.convert("RGB")).copy()
    pixels[~keep] = world.BACKGROUND
    return Image.fromarray(pixels)


def caption_credit(expected: str, got: str) -> float:
    """The share of the expected caption's (object, attribute) slots that ``got`` reads right, objects in reading
    order; a caption naming more or fewer objects is divided by the longer list (an extra object costs)."""
    want, read = world.parse_caption(expected), world.parse_caption(got)
    right = sum(w[name] == r[name] for w, r in zip(want, read) for name in w)  # noqa: B905 - unequal on purpose
    return right / (len(want[0]) * max(len(want), len(read)))


def answer_credit(question: str, expected: str, got: str) -> float:
    """1 or 0 for an answer (after `normalise_answer`); `caption_credit` for a caption question."""
    if normalise_answer(got) == normalise_answer(expected):
        return 1.0
    return caption_credit(expected, got) if question in world.CAPTION_QUESTIONS else 0.0


def load_spec(path: str | Path, questions_needed: bool = True) -> list[RewardItem]:
    """Items of a JSONL reward spec; refused whole (the line named) when a line is not a prompt with questions."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"rl.prompts {path} is not a file: use 'shapes' or a JSONL of prompts with questions")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where} is not JSON ({err.msg})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f'{where} has no "prompt" string: write {{"prompt": ..., "questions": [...]}}')
        pairs = record.get("questions", [])
        if not isinstance(pairs, list) or not all(
            isinstance(p, dict) and isinstance(p.get("question"), str) and isinstance(p.get("answer"), str)
            for p in pairs
        ):
            raise ConfigError(f'{where}: "questions" must be a list of {{"question": str, "answer": str}}')
        if questions_needed and not pairs:
            raise ConfigError(f"{where} has no questions, so the self-reward could not score it: add some")
        items.append(RewardItem(prompt, tuple((p["question"], p["answer"]) for p in pairs)))
    if not items:
        raise ConfigError(f"reward spec {path} holds no prompt: add one JSON line per prompt")
    return items


def load_reward_function(name: str) -> RewardFunction:
    """The callable ``module:function`` names (imported: it is code the user chose to run)."""
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"rl.reward_function {name!r} is not module:function (e.g. my_rewards:score)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"rl.reward_function {name}: cannot import {module_name} ({err})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"rl.reward_function {name}: {module_name} has no function {attribute}")
    return function


def checked_rewards(name: str, function: Callable, images: list[Image.Image], requests: list) -> list[float]:
    """``function(images, requests)`` (the prompts, or for the self-reward their items) as floats, or `RewardError`
    naming ``name`` when it raises or returns anything but one finite number in [0, 1] per image."""
    stop = "the run stopped before this step's update; the last checkpoint is intact"
    try:
        values = list(function(images, requests))
    except Exception as err:  # noqa: BLE001 - any failure of user code is reported, with the function's name
        raise RewardError(f"reward function {name} raised {type(err).__name__}: {err}; {stop}") from err
    if len(values) != len(images):
        raise RewardError(f"reward function {name} returned {len(values)} values for {len(images)} images; {stop}")
    rewards = []
    for index, value in enumerate(values):
        try:
            reward = float(value)
        except (TypeError, ValueError):
            raise RewardError(
                f"reward function {name} returned {value!r} for image {index}, not a number; {stop}"
            ) from None
        if not math.isfinite(reward) or not 0.0 <= reward <= 1.0:
            raise RewardError(f"reward function {name} returned {reward} for image {index}, outside [0, 1]; {stop}")
        rewards.append(reward)
    return rewards


def self_reward(answer: Answerer) -> RewardFunction:
    """The Self-GRPO reward of ``answer`` (a model answering questions about images), as a function of
    (images, items): each item's mean `answer_credit` over its questions."""

    def score(images: list[Image.Image], items: list[RewardItem]) -> list[float]:
        asked, shown = [], []
        for index, item in enumerate(items):
            for number, (q, want) in enumerate(item.questions):
                asked.append((index, q, want))
                view = item.views[number] if item.views else None
                shown.append(images[index] if view is None else object_view(images[index], item.scene, view))
        answers = answer(shown, [q for _, q, _ in asked])
        credit = [0.0] * len(items)
        for (index, q, want), got in zip(asked, answers, strict=True):
            credit[index] += answer_credit(q, want, got)
        return [total / len(item.questions) for total, item in zip(credit, items, strict=True)]

    return score
