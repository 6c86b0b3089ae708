"""The request types are the one description of a generation request: defaults in one table (public, then the
checkpoint's, then the user's), flags and batch fields derived from the fields, help without torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from dimoo_npu.cli import COMMANDS
from dimoo_npu.pipeline import plan_batches
from dimoo_npu.settings import requests
from dimoo_npu.utils.errors import InputError


def test_defaults_layer_public_then_checkpoint_then_user():
    given = requests.TextToImageRequest(prompt="a cat", timesteps=3)
    resolved = requests.resolve(given, {"width": 128, "timesteps": 8, "cfg_img": 9.0})
    assert (resolved.width, resolved.height, resolved.timesteps, resolved.cfg_scale) == (128, 1024, 3, 4.0)
    assert resolved.seed is None and resolved.output is None  # no default: the batch assigns them
    edit = requests.resolve(requests.EditRequest(image="x.png"))
    assert (edit.cfg_scale, edit.cfg_img, edit.image_budget, edit.edit_type) == (2.5, 4.0, 512, "edit")
    assert requests.resolve(requests.OutpaintRequest()).mask_w_ratio == 0.2
    answer = requests.resolve(requests.UnderstandRequest()).text_settings()
    assert (answer.gen_length, answer.block_length, answer.steps, answer.temperature) == (1024, 256, 128, 0.0)


def test_fast_understanding_lies_under_the_users_values_and_over_the_checkpoints():
    def settings(checkpoint=None, **given):
        return requests.resolve(requests.UnderstandRequest(**given), checkpoint).text_settings()

    exact = settings()
    assert (exact.kv_cache, exact.parallel_threshold) == ("none", None)
    fast = settings({"kv_cache": "prefix"}, fast=True)
    assert (fast.kv_cache, fast.parallel_threshold) == ("dual", 0.95)
    mine = settings(fast=True, parallel_threshold=0.7)
    assert (mine.kv_cache, mine.parallel_threshold) == ("dual", 0.7)
    carried = settings({"fast": True, "gen_length": 8})
    assert (carried.kv_cache, carried.gen_length) == ("dual", 8)
    assert settings({"fast": True}, fast=False).kv_cache == "none"
    line = requests.from_mapping("understand", {"kv_cache": "dual", "parallel_threshold": 1}, "line 1")
    assert (line.kv_cache, line.parallel_threshold) == ("dual", 1)


def test_every_field_has_help_and_every_default_a_field():
    for task, cls in requests.TASKS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        assert all(f.metadata["help"] for f in dataclasses.fields(cls))
        assert set(requests.DEFAULTS[task]) <= names, task


@pytest.mark.parametrize(
    ("task", "fields", "message"),
    [
        ("t2i", {"prompt": "x", "width": 1000}, "width 1000 is not a multiple of 16"),
        ("t2i", {"prompt": "x", "timesteps": 0}, "at least 1 step"),
        ("understand", {"question": "q", "image": "x", "gen_length": 10}, "not a multiple of block_length"),
        ("edit", {"image": "x", "edit_type": "sketch"}, "unknown edit type"),
        ("inpaint", {"image": "x"}, "has no prompt: pass --prompt"),
        ("edit", {"image": "x", "image_budget": 100}, "must be a multiple of 32"),
        ("understand", {"question": "q", "image": "x", "kv_cache": "yes"}, "use one of none, prefix, dual"),
        ("understand", {"question": "q", "image": "x", "parallel_threshold": -0.5}, r"within \(0, 1\]"),
    ],
)
def test_check_refuses_before_any_model(task, fields, message):
    with pytest.raises(InputError, match=message):
        requests.check(requests.resolve(requests.TASKS[task](**fields)))


def test_batch_fields_are_typed_by_the_annotations():
    with pytest.raises(InputError, match="use_cache must be true or false"):
        requests.from_mapping("t2i", {"use_cache": 1}, "line 1")
    with pytest.raises(InputError, match="timesteps must be an integer"):
        requests.from_mapping("t2i", {"timesteps": 2.5}, "line 1")
    assert requests.from_mapping("t2i", {"cfg_scale": 2}, "line 1").cfg_scale == 2


def test_batches_group_by_key_then_fill_batch_size():
    keys = ["a", "b", "a", "b", "a", "b"]
    assert plan_batches(keys, 2) == [[0, 2], [4], [1, 3], [5]]
    assert plan_batches(keys, 3) == [[0, 2, 4], [1, 3, 5]]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_imports_no_torch(command):
    code = (
        "import sys\nfrom dimoo_npu.cli import main\ntry:\n    main([sys.argv[1], '--help'])\nexcept SystemExit:\n"
        "    pass\nheavy = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
