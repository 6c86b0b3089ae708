"""`dimoo serve` chat answers with K/V caches and threshold decoding: the server's default, a request's own fields,
and bad values refused with a 400 naming the value and the choices."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dimoo_npu.shapes import world
from tests.integration.serve_support import question

pytest.importorskip("fastapi", reason="dimoo serve needs the serve extra (pip install -e '.[serve]')")


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from dimoo_npu.serve.app import ServeConfig, create_app
    from dimoo_npu.shapes.embedded import EMBEDDED_CHECKPOINT

    config = ServeConfig(checkpoint=str(EMBEDDED_CHECKPOINT), device="cpu", understand_defaults={"fast": True})
    with TestClient(create_app(config)) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the bundled model did not load within 120 s"
            time.sleep(0.2)
        yield client


@pytest.fixture
def made(monkeypatch) -> list[dict]:
    """The settings each chat answer's task was made with."""
    from dimoo_npu.sampling import text

    seen = []
    make = text.text_task
    monkeypatch.setattr(text, "text_task", lambda *args, **kwargs: seen.append(kwargs) or make(*args, **kwargs))
    return seen


def _ask(client, **fields):
    picture = np.asarray(world.render(world.Scene((world.ShapeObject("circle", "red", "large", 0, 0),))))
    body = {"model": "dimoo", "messages": question(picture, "what colour is the circle?"), "seed": 0, **fields}
    return client.post("/v1/chat/completions", json=body)


def test_the_server_default_and_a_requests_own_fields(client, made):
    first = _ask(client)
    assert first.status_code == 200 and first.json()["choices"][0]["message"]["content"]
    own = _ask(client, kv_cache="prefix", parallel_threshold=0.5)
    exact = _ask(client, fast=False)
    assert own.status_code == exact.status_code == 200
    settings = [(kwargs["kv_cache"], kwargs["parallel_threshold"]) for kwargs in made]
    assert settings == [("dual", 0.95), ("prefix", 0.5), ("none", None)]


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"kv_cache": "full"}, "kv_cache='full' is not a cache mode: use one of none, prefix, dual"),
        ({"parallel_threshold": 0}, "parallel_threshold=0.0 must be within (0, 1]"),
    ],
)
def test_bad_cache_fields_are_a_400(client, fields, message):
    response = _ask(client, **fields)
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_a_bad_server_default_is_refused_before_the_model_loads(caplog, monkeypatch):
    from dimoo_npu.cli import main
    from dimoo_npu.serve import http_server  # imported unpatched, so later tests get the real server

    monkeypatch.setattr(http_server, "build_server", None)  # never reached: it would fail with a type error
    assert main(["serve", "--fast", "--kv-cache", "half"]) == 2
    assert "kv_cache='half' is not a cache mode: use one of none, prefix, dual" in caplog.text
