"""Issue 24: every size-like request field has a maximum derived from the length cap, refused in well under a
second on every surface (request types, batch files, the server's request handling) before an image is opened;
the worst request that is accepted stays within a stated memory bound."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dimoo_npu.batch.batch_requests import build_requests
from dimoo_npu.settings import requests
from dimoo_npu.utils.errors import InputError
from dimoo_npu.utils.validate import MAX_LENGTH_LIMIT

# What each task needs besides the field under test, every size at its smallest so that only that field can be
# past its maximum (paths are never opened by these checks).
_IMAGE = {"timesteps": 1, "refresh_interval": 1}
BASE = {
    "t2i": {"prompt": "a red circle", "width": 16, "height": 16, **_IMAGE},
    "edit": {"prompt": "make it blue", "image": "missing.png", "image_budget": 0, **_IMAGE},
    "inpaint": {"prompt": "a red circle", "image": "missing.png", "image_budget": 0, **_IMAGE},
    "outpaint": {"prompt": "a red circle", "image": "missing.png", "image_budget": 0, **_IMAGE},
    "understand": {
        "question": "what?",
        "image": "missing.png",
        "image_budget": 0,
        "gen_length": 2,
        "block_length": 1,
        "steps": 2,
    },
}
# The next value a field may take after its maximum (sides are multiples of 16, budgets of 32).
STEP = {"width": 16, "height": 16, "image_budget": 32}
CASES = [
    (task, name)
    for task, cls in requests.TASKS.items()
    for name in requests.field_maxima(8192)
    if name in {f.name for f in dataclasses.fields(cls)}
]


@pytest.mark.parametrize(("task", "name"), CASES)
@settings(max_examples=15, deadline=None)
@given(cap=st.integers(64, MAX_LENGTH_LIMIT))
def test_every_field_past_its_maximum_is_refused_at_once(task, name, cap, tmp_path_factory):
    over = requests.field_maxima(cap)[name] + STEP.get(name, 1)
    request = requests.resolve(requests.from_mapping(task, {**BASE[task], name: over}, "r"))
    start = time.process_time()  # CPU seconds: the machine may be busy, the work may not be
    with pytest.raises(InputError, match=rf"^{name} of r={over} is over the maximum of {over - STEP.get(name, 1)}"):
        requests.check(request, "r", cap)
    batch = tmp_path_factory.mktemp("batch") / "lines.jsonl"
    batch.write_text(json.dumps({**BASE[task], name: over}) + "\n")
    with pytest.raises(InputError, match=rf"^{name} of request 1={over} is over the maximum"):
        build_requests(task, {}, str(batch), cap=cap)
    assert time.process_time() - start < 1.0


@pytest.mark.parametrize(("task", "name"), CASES)
def test_every_maximum_itself_passes_the_field_bounds(task, name):
    """The maxima are real limits, not a refusal of everything: each one passes its own field's check."""
    cap = 8192
    top = requests.field_maxima(cap)[name]
    request = requests.resolve(requests.from_mapping(task, {**BASE[task], name: top}, "r"))
    try:
        requests.check_budget(request, cap)
    except InputError as err:  # only the whole request's length may refuse it (a huge side with the default other)
        assert "needs at least" in str(err)


def test_the_public_defaults_fit_the_default_cap():
    for task, values in BASE.items():
        given = {k: v for k, v in values.items() if k in ("prompt", "question", "image")}
        requests.check(requests.resolve(requests.from_mapping(task, given, "r")), "r", 8192)


def test_the_seed_of_every_image_is_checked_with_n():
    request = requests.resolve(requests.TextToImageRequest(prompt="x", seed=2**64 - 1))
    requests.check(request, "r", 8192, count=1)
    with pytest.raises(InputError, match=r"2\^64 - 2\] for 2 request"):
        requests.check(request, "r", 8192, count=2)


@pytest.fixture(scope="module")
def pipe():
    """The bundled model's tokenizers and VQ; the transformer is never loaded (lazy)."""
    from dimoo_npu.pipeline import DiMOOPipeline, default_checkpoint

    return DiMOOPipeline.from_pretrained(default_checkpoint(), "cpu", lazy=True)


def test_the_server_refuses_an_oversized_request_before_decoding_its_upload(pipe, monkeypatch):
    """`dimoo serve`'s request handling: bytes that are no image at all prove nothing was decoded."""
    app = pytest.importorskip("dimoo_npu.serve.app")
    monkeypatch.setattr("dimoo_npu.tasks.load_image", _never)
    cases = [
        ("understand", {"question": "x", "image_budget": 8192}, "image_budget"),
        ("understand", {"question": "x", "gen_length": 10**6}, "gen_length"),
        ("edit", {"prompt": "x", "image_budget": 2048}, "image_budget"),
        ("inpaint", {"prompt": "x", "image_budget": 4096}, "image_budget"),
    ]
    for task, values, field in cases:
        with pytest.raises(app.ApiError, match=field) as caught:
            app._prepared(pipe, task, values, {"image": b"not an image"}, 1024)
        assert caught.value.status == 400
    with pytest.raises(app.ApiError, match="seed"):
        app._prepared(pipe, "t2i", {"prompt": "x", "seed": 2**64 - 1}, {}, 1024, 2)


def test_json_bodies_take_numbers_as_numbers():
    app = pytest.importorskip("dimoo_npu.serve.app")
    from pydantic import ValidationError

    for bad in ({"n": True}, {"n": "2"}, {"timesteps": "8"}, {"seed": 1.5}):
        with pytest.raises(ValidationError):
            app.ImageGenerationBody.model_validate({"prompt": "x", **bad})
    assert app.ImageGenerationBody.model_validate({"prompt": "x", "n": 2, "cfg_scale": 2}).n == 2


def test_the_python_api_refuses_a_budget_past_the_cap_before_resizing(pipe, monkeypatch):
    from PIL import Image

    monkeypatch.setattr("dimoo_npu.tasks.encoder.fit_image", _never)
    with pytest.raises(InputError, match="image budget 8192"):
        pipe.encoder.fit(Image.new("RGB", (64, 64)), 8192)


def _never(*args, **kwargs):
    raise AssertionError("an image was decoded or resized before the request's sizes were checked")


# Peak RSS growth (bytes) of checking and preparing the worst accepted request: a fixed part (first-call allocations
# of the tokenizers and the VQ encoder) and a part per token of the length cap (the largest budget's picture is about
# 256 pixels a token). Measured with the bundled VQ on a shared machine: 213 MB at cap 2048, 567 MB at cap 8192
# (58 KB a token between them); the bound (README "Long sequences") leaves room for allocator noise.
RSS_FIXED, RSS_PER_TOKEN = 256 << 20, 64 << 10
MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from PIL import Image
    from dimoo_npu.settings import requests
    from dimoo_npu.pipeline import DiMOOPipeline, default_checkpoint

    cap, source = int(sys.argv[1]), sys.argv[2]
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(source)  # a small picture, enlarged to the budget
    pipe = DiMOOPipeline.from_pretrained(default_checkpoint(), "cpu", lazy=True, max_length=cap)
    budget = requests.field_maxima(cap)["image_budget"]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    request = pipe.resolve(requests.InpaintRequest(image=source, prompt="a red circle", image_budget=budget))
    pipe.prepare(request)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(json.dumps({"budget": budget, "grown": grown}))
    """
)


def test_the_worst_accepted_request_stays_within_its_memory_bound(tmp_path):
    cap = 2048
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(cap), str(tmp_path / "small.png")],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["budget"] == requests.field_maxima(cap)["image_budget"] > 0
    assert measured["grown"] <= RSS_FIXED + RSS_PER_TOKEN * cap, measured


def test_pretokenize_rejects_an_image_past_max_length_before_encoding_it(tmp_path, monkeypatch):
    """`dimoo pretokenize` with image_budget 0 keeps an image's size: one whose grid alone is past max_length is a
    rejected record, and the VQ encoder never sees it."""
    import numpy as np
    from PIL import Image

    from dimoo_npu.shapes.embedded import EMBEDDED_CHECKPOINT
    from dimoo_npu.train.encode import EncoderSettings, RecordEncoder

    Image.fromarray(np.zeros((512, 512, 3), np.uint8)).save(tmp_path / "big.png")
    encoder = RecordEncoder(EncoderSettings(str(EMBEDDED_CHECKPOINT), max_length=256, image_budget=None))
    monkeypatch.setattr(encoder.images, "encode_image", _never)
    record = {"id": "big", "task": "t2i", "prompt": "a red circle", "target_image": str(tmp_path / "big.png")}
    with pytest.raises(InputError, match=r"512x512 image big.png alone needs 1056 tokens > max_length 256"):
        encoder.encode(record)
