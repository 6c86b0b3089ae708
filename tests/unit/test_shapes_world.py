"""The shapes world: deterministic, one palette, held-out split disjoint, detector exact on ground truth."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from dimoo_npu.shapes import world
from dimoo_npu.shapes.detect import detect_object, detect_objects, nearest_colour
from dimoo_npu.shapes.evaluate import (
    evaluate_t2i,
    evaluate_understanding,
    normalise_answer,
    score_answers,
    score_images,
)
from dimoo_npu.shapes.world import PALETTE, Scene, ShapeObject, render_array


def test_generator_is_deterministic_per_seed():
    first = list(world.sample_scenes(seed=3, count=50, two_object_share=0.3))
    again = list(world.sample_scenes(seed=3, count=50, two_object_share=0.3))
    other = list(world.sample_scenes(seed=4, count=50, two_object_share=0.3))
    assert first == again
    assert first != other
    assert np.array_equal(render_array(first[0]), render_array(again[0]))


def test_palette_colours_are_painted_exactly_and_far_apart():
    for name, rgb in PALETTE.items():
        image = render_array(Scene((ShapeObject("square", name, "large", 1, 1),)))
        assert tuple(image[64, 64]) == rgb
        assert tuple(image[2, 2]) == world.BACKGROUND
        assert nearest_colour(np.array(rgb, dtype=float)) == name
    for a, b in itertools.combinations(PALETTE.values(), 2):
        assert np.linalg.norm(np.subtract(a, b)) > 60


def test_captions_name_every_attribute_in_several_phrasings():
    obj = ShapeObject("circle", "red", "large", 0, 0)
    rng = random.Random(0)
    captions = {world.caption(Scene((obj,)), rng) for _ in range(60)}
    assert len(captions) >= 4
    for text in captions:
        assert "large red circle" in text and "top left" in text
    assert world.canonical_caption(obj) == "a large red circle in the top left"
    partial = {world.partial_caption(obj, rng) for _ in range(200)}
    assert {
        "a red circle in the top left",
        "a large circle in the top left",
        "a large red shape in the top left",
    } < partial
    assert "a large red circle" in partial and not any(
        "top left" in text and "large red circle" in text for text in partial
    )
    pair = world.two_object_scene(random.Random(1), "left of")
    assert pair.objects[0].col < pair.objects[1].col and pair.objects[0].row == pair.objects[1].row
    above = world.two_object_scene(random.Random(1), "above")
    assert above.objects[0].row < above.objects[1].row and above.objects[0].col == above.objects[1].col


def test_vocabulary_covers_every_caption_question_and_answer():
    vocab = set(world.vocabulary_words())
    rng = random.Random(0)
    for scene in world.sample_scenes(seed=0, count=200, two_object_share=0.5):
        assert set(world._words(world.caption(scene, rng))) <= vocab
        assert set(world._words(world.partial_caption(scene.objects[0], rng))) <= vocab
    for obj in world.split_objects("heldout"):
        for name in world.QUESTIONS:
            assert set(world._words(world.question(obj, name, rng))) <= vocab
            assert set(world._words(world.answer(obj, name))) <= vocab


def test_placements_are_whole_code_cells_inside_the_third_and_all_get_used():
    obj = ShapeObject("circle", "red", "large", 0, 1)
    assert {o.centre for o in world.placements(obj)} == {(y, x) for y in (16, 32) for x in (48, 64, 80)}
    assert all(o.canonical == obj and o.position == "top middle" for o in world.placements(obj))
    assert list(ShapeObject("square", "red", "large", 2, 2, (16, 16)).cell_span(0)) == [6, 7]
    assert list(ShapeObject("square", "red", "small", 0, 0).cell_span(1)) == [1, 2]
    seen = {s.objects[0].centre for s in world.sample_scenes(seed=0, count=2000)}
    assert seen == {(y, x) for y in range(16, 128, 16) for x in range(16, 128, 16)}
    rng = random.Random(0)
    for _ in range(300):
        scene = world.two_object_scene(rng, rng.choice(sorted(world.RELATION_TEMPLATES)))
        axis = 1 if scene.relation == "left of" else 0
        first, second = scene.objects
        assert first.cell_span(axis)[-1] < second.cell_span(axis)[0]  # no code cell shows both


def test_held_out_split_is_disjoint_and_leaves_every_attribute_pair_trained():
    train, heldout = world.split_objects("train"), world.split_objects("heldout")
    assert not set(train) & set(heldout)
    assert len(train) + len(heldout) == 324 and 30 <= len(heldout) <= 60
    for scene in world.sample_scenes(seed=0, count=300, split="train", two_object_share=0.5):
        assert not any(world.is_held_out(obj) for obj in scene.objects)  # two-object scenes too
    for scene in world.sample_scenes(seed=0, count=100, split="heldout", two_object_share=0.5):
        assert any(world.is_held_out(obj) for obj in scene.objects)
    for first, second in itertools.combinations(("shape", "colour", "size", "position"), 2):
        trained_pairs = {(getattr(o, first), getattr(o, second)) for o in train}
        assert {(getattr(o, first), getattr(o, second)) for o in heldout} <= trained_pairs
    with pytest.raises(ValueError, match="unknown split"):
        world.split_objects("test")


def test_detector_reads_every_ground_truth_render_exactly():
    objects = [placed for obj in world.all_single_objects() for placed in world.placements(obj)]
    assert len(objects) == 324 * 49 // 9  # every combination at every placement of its third
    images = [render_array(Scene((obj,))) for obj in objects]
    score = score_images(objects, images)
    assert score.overall == 1.0 and set(score.per_attribute.values()) == {1.0}
    scene = world.two_object_scene(random.Random(5), "above")
    found = {(d.shape, d.colour, d.position) for d in detect_objects(render_array(scene))}
    assert found == {(o.shape, o.colour, o.position) for o in scene.objects}


def test_detector_sees_nothing_on_blank_and_scores_a_wrong_image_wrong():
    blank = np.full((128, 128, 3), 255, dtype=np.uint8)
    assert detect_object(blank) is None
    want = ShapeObject("circle", "red", "large", 0, 0)
    wrong = render_array(Scene((ShapeObject("triangle", "red", "small", 2, 2),)))
    score = score_images([want, want], [wrong, blank])
    assert score.overall == 0.0
    assert score.per_attribute == {"shape": 0.0, "colour": 0.5, "size": 0.0, "position": 0.0}


def test_evaluator_math_with_known_answers():
    score = score_answers(
        ["colour", "colour", "shape", "position"],
        ["red", "red", "circle", "top left"],
        ["Red.", "blue", " circle ", "top right"],
    )
    assert score.per_attribute == {"colour": 0.5, "shape": 1.0, "position": 0.0}
    assert score.overall == 0.5 and score.count == 4 and len(score.failures) == 2
    assert normalise_answer("Colour: RED!") == "colour red"


def test_evaluate_runs_callables_in_batches():
    heldout = world.split_objects("heldout")[:5]
    seen_batches = []

    def perfect_generator(prompts):
        seen_batches.append(len(prompts))
        lookup = {world.canonical_caption(o): o for o in heldout}
        return [render_array(Scene((lookup[p],))) for p in prompts]

    assert evaluate_t2i(perfect_generator, heldout, batch_size=2).overall == 1.0
    assert seen_batches == [2, 2, 1]

    def always_red(images, questions):
        return ["red"] * len(questions)

    score = evaluate_understanding(always_red, heldout)
    assert score.count == 5 * len(world.QUESTIONS)
    assert score.per_attribute["colour"] == sum(o.colour == "red" for o in heldout) / 5
    assert score.per_attribute["shape"] == 0.0


def test_edits_follow_the_grammar_and_the_world_fixes_one_target():
    rng = random.Random(0)
    expected_types = {"recolour": "edit", "move": "edit", "turn": "edit_replace", "resize": "edit"}
    expected_types.update(remove="edit_remove", add="edit_add")
    for kind in world.EDITS:
        for _ in range(40):
            edit = world.sample_edit(kind, rng)
            assert edit.edit_type == expected_types[kind] and world.fits(edit.source.objects)
            assert not any(world.is_held_out(o) for o in (*edit.source.objects, *edit.target.objects))
            assert set(world._words(edit.instruction)) <= set(world.vocabulary_words())
            changed = set(edit.target.objects) - set(edit.source.objects)
            if kind == "remove":
                assert not changed and edit.instruction == f"remove the {edit.edited.shape}"
                assert len(edit.target.objects) == len(edit.source.objects) - 1
                continue
            (made,) = changed
            assert made == edit.edited and world.fits(edit.target.objects)
            if kind in ("move", "add"):
                assert made.offset == (0, 0)  # at its third's canonical centre
            else:
                (before,) = set(edit.source.objects) - set(edit.target.objects)
                assert before.centre == made.centre  # recoloured, turned and resized objects stay put
    move = world.sample_edit("move", random.Random(3))
    assert move.instruction == f"move the {move.edited.shape} to the {move.edited.position}"
    with pytest.raises(ValueError, match="unknown edit kind"):
        world.sample_edit("paint", rng)


def test_held_out_edits_make_held_out_combinations():
    for kind in world.EDITS:
        edits = world.heldout_edits(kind)
        assert [e.edited.canonical for e in edits] == world.split_objects("heldout")
        assert all(e.kind == kind and world.fits(e.source.objects) for e in edits)
        assert any(len(e.source.objects) == 2 for e in edits) or kind == "add"  # add: one object becomes two
        if kind == "remove":
            assert all(e.edited in e.source.objects and e.edited not in e.target.objects for e in edits)
        else:
            assert all(e.edited in e.target.objects and e.edited not in e.source.objects for e in edits)


def test_scene_captions_read_in_order_and_parse_back():
    a, b = ShapeObject("square", "blue", "small", 2, 0), ShapeObject("circle", "red", "large", 0, 2)
    text = world.scene_caption(Scene((a, b)))
    assert text == "a large red circle in the top right and a small blue square in the bottom left"
    assert world.parse_caption(text) == [
        {"size": "large", "colour": "red", "shape": "circle", "position": "top right"},
        {"size": "small", "colour": "blue", "shape": "square", "position": "bottom left"},
    ]
    assert world.parse_caption("a red shape")[0] == {"size": "", "colour": "red", "shape": "", "position": ""}


def test_painting_regions_cut_through_the_object():
    rng = random.Random(0)
    for obj in world.split_objects("heldout")[:12]:
        shown = world.placed(obj, rng)
        for kind in ("inpaint", "outpaint"):
            top, left, bottom, right = world.paint_region(shown, kind, rng)
            inside = {(r, c) for r in range(top, bottom) for c in range(left, right)}
            assert len(inside & world.cells(shown)) == 2  # half the object's 2 x 2 cells
            mask = np.asarray(world.region_mask((top, left, bottom, right), kind)) > 127
            assert mask[top * 16, left * 16] == (kind == "inpaint")


def test_edit_caption_and_paint_scores_with_known_answers():
    from dimoo_npu.shapes import evaluate

    edits = world.heldout_edits("recolour")[:6] + world.heldout_edits("remove")[:6]
    truth = [render_array(e.target) for e in edits]
    assert evaluate.score_edits(edits, truth).overall == 1.0
    unchanged = evaluate.score_edits(edits, [render_array(e.source) for e in edits])
    assert unchanged.overall == 0.0 and len(unchanged.failures) == 12
    scenes = evaluate.heldout_caption_scenes()
    assert any(len(s.objects) == 2 for s in scenes)
    captions = [world.scene_caption(s) for s in scenes]
    assert evaluate.score_captions(scenes, captions).overall == 1.0
    swapped = evaluate.score_captions(scenes[:2], captions[1::-1])
    assert swapped.overall == 0.0 and swapped.per_attribute["colour"] < 1.0
    items = evaluate.paint_items("inpaint")[:8]
    pictures = [render_array(Scene((obj,))) for obj, _ in items]
    assert evaluate.evaluate_paint(lambda images, masks, prompts: images, items).overall == 1.0
    halves = [
        np.where(mask[..., None] > 127, 255, p).astype(np.uint8) for p, (_, mask) in zip(pictures, items, strict=True)
    ]
    assert evaluate.evaluate_paint(lambda images, masks, prompts: halves, items).overall < 0.5
