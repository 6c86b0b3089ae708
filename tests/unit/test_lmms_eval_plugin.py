"""The lmms-eval plugin without lmms-eval: model_args, the generation-kwargs mapping, stop strings, crop budgets,
the refusals, the entry point, and generate_until's grouping (the class imported over a one-class stand-in of
``lmms_eval.api.model``, the only piece of lmms-eval it needs)."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest
import tomllib
from PIL import Image

from dimoo_npu.integrations import lmms_eval_settings as plugin
from dimoo_npu.settings.generation_settings import DEFAULTS, TextSettings
from dimoo_npu.utils.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
PUBLIC: dict = {}  # a checkpoint without generation_defaults: the public scripts' 1024 / 256 / 128
BUNDLED = {"gen_length": 24, "block_length": 24, "steps": 24, "temperature": 0.0, "image_budget": 128}


def settings(gen_kwargs: dict, defaults: dict = PUBLIC, **model_args) -> TextSettings:
    return plugin.request_settings(gen_kwargs, plugin.parse_model_args(model_args), defaults)[0]


def shape(chosen: TextSettings) -> tuple[int, int, int]:
    return chosen.gen_length, chosen.block_length, chosen.steps


# ---- the mapping ----


def test_without_max_new_tokens_the_checkpoints_defaults_apply():
    assert shape(settings({})) == (1024, 256, 128)
    assert shape(settings({}, BUNDLED)) == (24, 24, 24)


@pytest.mark.parametrize(
    ("max_new_tokens", "expected"),
    [(16, (16, 16, 2)), (128, (128, 128, 16)), (512, (512, 256, 64)), (1024, (1024, 256, 128)), (1, (1, 1, 1))],
)
def test_max_new_tokens_sets_the_answer_length_at_the_defaults_tokens_per_step(max_new_tokens, expected):
    """Public defaults reveal 8 tokens a step in 256-token blocks; a block that does not divide the answer becomes
    the whole answer; at least one step per block."""
    assert shape(settings({"max_new_tokens": max_new_tokens})) == expected


@pytest.mark.parametrize("defaults", [PUBLIC, BUNDLED, {"gen_length": 96, "block_length": 32, "steps": 48}])
def test_every_answer_length_maps_to_settings_the_sampler_accepts(defaults):
    base = TextSettings(
        **{k: v for k, v in {**DEFAULTS["understand"], **defaults}.items() if k in TextSettings.__annotations__}
    )
    for length in range(1, 1100, 7):
        chosen = settings({"max_new_tokens": length}, defaults)  # check() inside raises on a bad combination
        assert chosen.gen_length == length
        blocks = length // chosen.block_length
        assert chosen.steps % blocks == 0
        # never fewer steps per token than the defaults take (rounding goes up)
        assert chosen.steps * base.gen_length >= length * base.steps


def test_model_args_win_over_the_task():
    chosen = settings({"max_new_tokens": 128, "temperature": 0.7}, gen_length=1, block_length=1, steps=1, temperature=0)
    assert shape(chosen) == (1, 1, 1) and chosen.temperature == 0.0


def test_temperature_follows_the_task_and_do_sample_false_means_greedy():
    assert settings({"temperature": 0.5, "do_sample": True}).temperature == 0.5
    assert settings({"temperature": 0.5, "do_sample": False}).temperature == 0.0
    assert settings({}, {**BUNDLED, "temperature": 0.25}).temperature == 0.25


def test_fast_decoding_model_args_reach_the_sampler():
    fast = settings({"max_new_tokens": 64}, fast=True)
    assert (fast.kv_cache, fast.parallel_threshold) == ("dual", 0.95)
    own = settings({"max_new_tokens": 64}, fast=True, kv_cache="prefix", parallel_threshold=0.9)
    assert (own.kv_cache, own.parallel_threshold) == ("prefix", 0.9)
    assert settings({}).kv_cache == "none" and settings({}).parallel_threshold is None


def test_settings_the_sampler_refuses_are_refused_before_any_model_work():
    with pytest.raises(InputError, match="steps=3 cannot be split equally over 2 blocks"):
        settings({"max_new_tokens": 64}, block_length=32, steps=3)
    with pytest.raises(InputError, match="kv_cache='fastest' is not a cache mode"):
        settings({}, kv_cache="fastest")


def test_stop_strings_cut_the_answer_at_the_first_one():
    until = plugin.stop_strings(["ASSISTANT:", "\n\n"])
    assert plugin.cut_at_stop("B\n\nASSISTANT: more", until) == "B"
    assert plugin.cut_at_stop("yes", plugin.stop_strings("Q:")) == "yes"
    assert plugin.cut_at_stop("a Q: b", plugin.stop_strings(None)) == "a Q: b"
    assert plugin.cut_at_stop("a", ("",)) == "a"  # an empty stop string cuts nothing


def test_crop_budget_follows_the_public_vlmevalkit_rule_by_area():
    rule = plugin.VLMEVALKIT_BUDGET
    assert plugin.image_budget_for((511, 512), rule, 1024) == 512
    assert plugin.image_budget_for((512, 512), rule, 1024) is None  # between: the picture's own size
    assert plugin.image_budget_for((1024, 1024), rule, 1024) is None
    assert plugin.image_budget_for((1025, 1024), rule, 1024) == 1024
    assert plugin.image_budget_for((64, 64), None, 128) == 128
    assert plugin.image_budget_for((64, 64), "none", 128) is None
    assert plugin.image_budget_for((64, 64), 512, 128) == 512


# ---- model_args and refusals ----


def test_model_args_are_checked_with_a_one_line_error():
    with pytest.raises(InputError, match="unknown dimoo model_args answer_len, gen_len: use "):
        plugin.parse_model_args({"gen_len": 4, "answer_len": 2})
    with pytest.raises(InputError, match="steps='many' must be int"):
        plugin.parse_model_args({"steps": "many"})
    with pytest.raises(InputError, match="fast=1 must be bool"):
        plugin.parse_model_args({"fast": 1})
    with pytest.raises(InputError, match="gen_length=True must be int"):
        plugin.parse_model_args({"gen_length": True})
    with pytest.raises(InputError, match="image_budget='huge'"):
        plugin.parse_model_args({"image_budget": "huge"})
    with pytest.raises(InputError, match="multi_image='all'"):
        plugin.parse_model_args({"multi_image": "all"})
    options = plugin.parse_model_args({"batch_size": "auto:4", "device": None, "max_batch_size": None})
    assert options.batch_size == plugin.ModelOptions().batch_size
    assert plugin.parse_model_args({"batch_size": "8"}).batch_size == 8  # lmms-eval's --batch_size is text
    with pytest.raises(InputError, match="batch_size=0 must be at least 1"):
        plugin.parse_model_args({"batch_size": "0"})


def test_a_request_needs_exactly_one_picture_unless_told_to_take_the_first():
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("L", (8, 8))
    with pytest.raises(InputError, match="mmmu_val validation doc 7 has no image"):
        plugin.single_image([], "mmmu_val validation doc 7", "refuse")
    with pytest.raises(InputError, match="doc 7 has 2 images: .* multi_image=first"):
        plugin.single_image([red, blue], "doc 7", "refuse")
    assert plugin.single_image([red, blue], "doc 7", "first").getpixel((0, 0)) == (255, 0, 0)
    assert plugin.single_image(blue, "doc 7", "refuse").mode == "RGB"
    with pytest.raises(InputError, match="a str visual is not a picture"):
        plugin.single_image(["clip.mp4"], "doc 7", "refuse")


@pytest.mark.parametrize("request_type", ["loglikelihood", "generate_until_multi_round"])
def test_unsupported_request_types_are_named(request_type):
    assert f"cannot serve {request_type} requests" in str(plugin.unsupported(request_type))


# ---- the class, over a stand-in of lmms_eval.api.model ----


@pytest.fixture
def model_module(monkeypatch):
    """lmms_eval_model imported with ``lmms_eval.api.model.lmms`` replaced by a bare base class."""

    class StandIn:
        def __init__(self):
            self._rank, self.task_dict = 0, {}

        @property
        def rank(self):
            return self._rank

    for name in ("lmms_eval", "lmms_eval.api"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "lmms_eval.api.model", types.SimpleNamespace(lmms=StandIn))
    monkeypatch.delitem(sys.modules, "dimoo_npu.integrations.lmms_eval_model", raising=False)
    module = importlib.import_module("dimoo_npu.integrations.lmms_eval_model")
    yield module
    sys.modules.pop("dimoo_npu.integrations.lmms_eval_model", None)


class RecordingPipeline:
    """Answers "<question> @ <gen_length>" and records each call."""

    def __init__(self):
        self.calls = []

    def understand(self, images, questions, *, settings, image_budget, seed, batch_size):
        self.calls.append((len(images), settings.gen_length, image_budget, seed, batch_size))
        return [f"{q} @ {settings.gen_length}\n\nASSISTANT: chatter" for q in questions]


def make_model(module, **model_args):
    model = module.DiMOOLmms.__new__(module.DiMOOLmms)
    super(module.DiMOOLmms, model).__init__()
    model.options = plugin.parse_model_args(model_args)
    model.pipeline, model.defaults = RecordingPipeline(), dict(BUNDLED)
    return model


def test_generate_until_groups_by_settings_keeps_order_and_cuts_at_until(model_module):
    model = make_model(model_module, batch_size=3, seed=5)
    docs = [{"size": 64}, {"size": 600}, {"size": 64}]
    model.task_dict = {"t": {"test": docs}}
    visual = lambda doc: [Image.new("RGB", (doc["size"], doc["size"]))]  # noqa: E731
    requests = [
        types.SimpleNamespace(args=(f"q{i}", {"max_new_tokens": n, "until": ["\n\n"]}, visual, i, "t", "test"))
        for i, n in enumerate([8, 16, 8])
    ]
    assert model.generate_until(requests) == ["q0 @ 8", "q1 @ 16", "q2 @ 8"]
    assert model.pipeline.calls == [(2, 8, 128, 5, 3), (1, 16, 128, 5, 3)]


def test_generate_until_groups_by_crop_budget_too(model_module):
    model = make_model(model_module, image_budget="vlmevalkit")
    model.task_dict = {"t": {"test": [{"size": 64}, {"size": 600}]}}
    visual = lambda doc: [Image.new("RGB", (doc["size"], doc["size"]))]  # noqa: E731
    requests = [types.SimpleNamespace(args=("q", {}, visual, i, "t", "test")) for i in range(2)]
    model.generate_until(requests)
    assert [call[2] for call in model.pipeline.calls] == [512, None]


@pytest.mark.parametrize("method", ["loglikelihood", "generate_until_multi_round"])
def test_the_model_refuses_request_types_it_cannot_serve(model_module, method):
    with pytest.raises(InputError, match=f"cannot serve {method} requests"):
        getattr(make_model(model_module), method)([])


def test_the_entry_point_registers_dimoo_with_the_model_class(model_module):
    """pyproject's lmms_eval.models entry point names `manifest`, whose class path is this class."""
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    module_name, function = entry[plugin.MODEL_NAME].split(":")
    assert getattr(importlib.import_module(module_name), function) is plugin.manifest
    class_module, class_name = plugin.MODEL_CLASS.rsplit(".", 1)
    assert class_module == model_module.__name__ and getattr(model_module, class_name).is_simple
