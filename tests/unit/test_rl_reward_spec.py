"""The shapes world's edit and caption items for Self-GRPO, and the credit a caption earns."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dimoo_npu.errors import ConfigError
from dimoo_npu.rl.augment import augmented
from dimoo_npu.rl.reward import answer_credit, caption_credit, self_reward, shapes_task_spec
from dimoo_npu.shapes import world

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
def test_task_items_are_training_split_and_ask_for_a_caption_of_the_target(task):
    items = shapes_task_spec(task, seed=0, count=6)
    assert items == shapes_task_spec(task, seed=0, count=6), "seeded"
    for item in items:
        assert item.task == task and not any(world.is_held_out(obj.canonical) for obj in item.scene.objects)
        ((question, expected),) = item.questions
        assert question in world.CAPTION_QUESTIONS and expected == world.scene_caption(item.scene)
        assert (item.source is None) == (task == "caption")
    if task == "caption":
        assert {len(item.scene.objects) for item in items} == {1, 2}, "one and two objects in turn"
    with pytest.raises(ConfigError, match="edit-remove"):
        shapes_task_spec("edit-remove", 0, 1)


def test_self_reward_of_an_edit_is_the_credit_of_the_policy_caption():
    (item,) = shapes_task_spec("edit-add", seed=1, count=1)
    wrong = item.questions[0][1].replace("large", "small", 1).replace("small", "large", 1)
    score = self_reward(lambda images, questions: [item.questions[0][1], wrong])
    right, partly = score([None, None], [item, item])
    assert right == 1.0 and partly == caption_credit(item.questions[0][1], wrong)


def test_augmentation_is_seeded_and_mild():
    picture = world.render(world.Scene((world.random_object(random.Random(0)),)))
    once, again, other = (np.asarray(augmented(picture, seed)) for seed in (5, 5, 6))
    assert np.array_equal(once, again) and not np.array_equal(once, other)
    change = np.abs(once.astype(int) - np.asarray(picture, dtype=int))
    assert 0 < change.mean() < 16 and once.shape == np.asarray(picture).shape
