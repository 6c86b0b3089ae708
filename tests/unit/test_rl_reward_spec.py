"""The shapes world's edit and caption items for Self-GRPO, and the credit a caption earns."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dimoo_npu.rl.augment import augmented
from dimoo_npu.rl.reward import (
    VIEW_QUESTIONS,
    answer_credit,
    caption_credit,
    object_view,
    self_reward,
    shapes_task_spec,
)
from dimoo_npu.shapes import world
from dimoo_npu.shapes.detect import detect_objects
from dimoo_npu.utils.errors import ConfigError

TWO = "a large red circle in the top left and a small blue square in the bottom right"


def test_caption_credit_counts_attributes_and_charges_a_missing_or_extra_object():
    assert caption_credit(TWO, TWO) == 1.0
    assert caption_credit(TWO, TWO.replace("bottom right", "top right")) == 7 / 8, "one position wrong"
    assert caption_credit(TWO, "a large red circle in the top left") == 4 / 8, "the second object missing"
    assert caption_credit("a large red circle in the top left", TWO) == 4 / 8, "an object too many"
    assert caption_credit(TWO, "") == 0.0


def test_answer_credit_is_exact_except_for_captions():
    assert answer_credit("what colour is the shape?", "red", "Red.") == 1.0
    assert answer_credit("what colour is the shape?", "red", "a red circle") == 0.0
    assert answer_credit(world.CAPTION_QUESTIONS[0], TWO, TWO.replace("large", "small")) == 7 / 8


@pytest.mark.parametrize("task", ["edit-recolour", "edit-move", "edit-add", "caption"])
def test_task_items_are_training_split_with_questions_from_the_target(task):
    items = shapes_task_spec(task, seed=0, count=6)
    assert items == shapes_task_spec(task, seed=0, count=6), "seeded"
    for item in items:
        assert item.task == task and not any(world.is_held_out(obj.canonical) for obj in item.scene.objects)
        assert (item.source is None) == (task == "caption")
        if task == "caption":
            ((question, expected),) = item.questions
            assert question in world.CAPTION_QUESTIONS and expected == world.scene_caption(item.scene)
            continue
        asked = {(view, question, want) for view, (question, want) in zip(item.views, item.questions, strict=True)}
        wanted = {
            (index, VIEW_QUESTIONS[name], world.answer(obj, name))
            for index, obj in enumerate(item.scene.objects)
            for name in world.QUESTIONS
        }
        assert asked == wanted, "every attribute of every target object, asked about that object's view"
        assert not any("{shape}" in q or obj.shape in q for q, _ in item.questions for obj in item.scene.objects)
    if task == "caption":
        assert {len(item.scene.objects) for item in items} == {1, 2}, "one and two objects in turn"
    with pytest.raises(ConfigError, match="edit-remove"):
        shapes_task_spec("edit-remove", 0, 1)


def test_an_object_view_leaves_exactly_that_object():
    rng = random.Random(3)
    for _ in range(20):
        scene = world.picture_scene(rng, 2)
        for index, obj in enumerate(scene.objects):
            (found,) = detect_objects(np.asarray(object_view(world.render(scene), scene, index)))
            assert (found.shape, found.colour, found.size, found.position) == (
                obj.shape,
                obj.colour,
                obj.size,
                obj.position,
            )


def test_self_reward_asks_each_question_about_its_view():
    (item,) = shapes_task_spec("edit-add", seed=1, count=1)
    seen = []

    def judge(images, questions):
        seen.extend(detect_objects(np.asarray(image))[0].shape for image in images)
        return [want for _, want in item.questions[:-1]] + ["nonsense"]

    (reward,) = self_reward(judge)([world.render(item.scene)], [item])
    assert seen == [item.scene.objects[view].shape for view in item.views]
    assert reward == 1 - 1 / len(item.questions)


def test_augmentation_is_seeded_and_mild():
    picture = world.render(world.Scene((world.random_object(random.Random(0)),)))
    once, again, other = (np.asarray(augmented(picture, seed)) for seed in (5, 5, 6))
    assert np.array_equal(once, again) and not np.array_equal(once, other)
    change = np.abs(once.astype(int) - np.asarray(picture, dtype=int))
    assert 0 < change.mean() < 16 and once.shape == np.asarray(picture).shape
