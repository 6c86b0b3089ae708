"""The local lmms-eval task: the items of ``dimoo eval shapes --task qa`` written offline, and its scoring rule."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import yaml

from dimoo_npu.integrations import shapes_task
from dimoo_npu.shapes import evaluate, world
from dimoo_npu.utils.errors import InputError


class FunctionTag(yaml.SafeLoader):
    """Reads lmms-eval's ``!function name`` tags as their text."""


FunctionTag.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def test_the_task_holds_the_eval_shapes_qa_items_in_order(tmp_path):
    folder = shapes_task.write_task(tmp_path / "task", limit=3, seed=1)
    objects = world.split_objects("heldout")[:3]
    expected = evaluate.understanding_items(objects, seed=1)
    docs = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    assert [(d["attribute"], d["question"], d["answer"]) for d in docs] == [(a, q, e) for _, a, q, e in expected]
    doc_to_visual, doc_to_text, _ = shapes_task.task_functions(folder)
    for doc, (obj, *_rest) in zip(docs, expected, strict=True):
        (picture,) = doc_to_visual(doc)
        assert np.array_equal(np.asarray(picture), world.render_array(world.Scene((obj,))))  # lossless PNG
        assert doc_to_text(doc, {"pre_prompt": ""}) == doc["question"]


def test_the_yaml_points_at_the_written_data_and_the_written_utils(tmp_path):
    folder = shapes_task.write_task(tmp_path / "task", limit=1)
    config = yaml.load((folder / f"{shapes_task.TASK_NAME}.yaml").read_text(), Loader=FunctionTag)
    assert config["task"] == shapes_task.TASK_NAME and config["output_type"] == "generate_until"
    assert config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(folder / "test.jsonl")
    assert config["metadata"]["items"] == 4
    spec = importlib.util.spec_from_file_location("written_utils", folder / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    for name in ("doc_to_visual", "doc_to_text", "process_results"):
        assert config[name] == f"utils.{name}" and callable(getattr(utils, name))
    doc = json.loads((folder / "test.jsonl").read_text().splitlines()[0])
    assert utils.process_results(doc, [f" {doc['answer'].upper()}. "]) == {"accuracy": 1.0}
    assert utils.process_results(doc, ["no idea"]) == {"accuracy": 0.0}


def test_scoring_agrees_with_eval_shapes_on_every_answer(tmp_path):
    folder = shapes_task.write_task(tmp_path / "task", limit=2)
    *_, process_results = shapes_task.task_functions(folder)
    docs = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    answers = ["Red.", "circle", "colour", docs[3]["answer"], "", "small ", "top", "LARGE"]
    ours = np.mean([process_results(doc, [a])["accuracy"] for doc, a in zip(docs, answers, strict=True)])
    theirs = evaluate.score_answers([d["attribute"] for d in docs], [d["answer"] for d in docs], answers).overall
    assert ours == pytest.approx(theirs)


def test_a_folder_that_holds_anything_is_refused_and_left_alone(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="exists and is not an empty folder"):
        shapes_task.write_task(tmp_path, limit=1)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
    assert shapes_task.main(["--output-dir", str(tmp_path), "--limit", "1"]) == 2
    assert shapes_task.main(["--output-dir", str(tmp_path / "new"), "--limit", "1"]) == 0
    assert len(list((tmp_path / "new" / "images").iterdir())) == 4
