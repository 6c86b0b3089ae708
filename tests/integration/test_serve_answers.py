"""Chat answers in-process: OpenAI's usage counts, and an answer that decodes to nothing is an error, never an
empty 200 (the CLI's rule from issue 18, streamed or not). Also on the loaded model: a bad upload's 400 names the
form field, never the server's temporary file, the edits form checks the inpainting box, and the token budget
answers 429 beside other work and 400 to a request that alone is over it."""

from __future__ import annotations

import io
import json
import tempfile
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

    with TestClient(create_app(ServeConfig(checkpoint=str(EMBEDDED_CHECKPOINT), device="cpu"))) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the bundled model did not load within 120 s"
            time.sleep(0.2)
        yield client


def _circle() -> list[dict]:
    picture = np.asarray(world.render(world.Scene((world.ShapeObject("circle", "red", "large", 0, 0),))))
    return question(picture, "what colour is the circle?")


def test_usage_counts_the_prompt_and_the_answer_tokens(client):
    body = client.post("/v1/chat/completions", json={"model": "dimoo", "messages": _circle(), "seed": 0}).json()
    answer = body["choices"][0]["message"]["content"]
    usage = body["usage"]
    assert answer and usage["completion_tokens"] == len(answer.split())  # the bundled tokenizer: one id a word
    assert usage["prompt_tokens"] > 64  # the question and the picture's 8 x 8 codes
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["model"] == "shapes-dimoo"


def test_an_empty_answer_is_an_error_streamed_or_not(client, monkeypatch):
    from dimoo_npu.tasks import understand

    monkeypatch.setattr(understand, "decode_answer", lambda *args: "")
    response = client.post("/v1/chat/completions", json={"model": "dimoo", "messages": _circle()})
    assert response.status_code == 500 and "decoded to nothing" in response.json()["error"]["message"]
    streamed = client.post("/v1/chat/completions", json={"model": "dimoo", "messages": _circle(), "stream": True})
    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert "decoded to nothing" in json.loads(events[-1])["error"]["message"]
    assert "[DONE]" not in events
    failures = 'dimoo_requests_total{endpoint="/v1/chat/completions",status="500"} 2.0'
    assert failures in client.get("/metrics").text, "both failures, streamed or not, are counted as 500s"


def test_upload_errors_name_the_field_and_the_edits_form_checks_the_box(client):
    picture = io.BytesIO()
    world.render(world.Scene((world.ShapeObject("circle", "red", "large", 0, 0),))).save(picture, format="PNG")
    cases = [
        ({"prompt": "a red circle"}, {"image": b"not a picture"}, "uploaded image"),
        ({"prompt": "a red circle", "edit_type": "inpaint"}, {"image": picture.getvalue(), "mask": b"?"}, "mask"),
        ({"prompt": "a red circle", "edit_type": "inpaint", "mask_h_ratio": "5"}, {"image": picture.getvalue()}, "5"),
    ]
    for form, files, named in cases:
        response = client.post("/v1/images/edits", data=form, files=files)
        message = response.json()["error"]["message"]
        assert response.status_code == 400 and named in message, (form, response.text)
        assert tempfile.gettempdir() not in message and "dimoo-serve-" not in message, message


def test_the_token_budget_answers_429_beside_work_and_400_alone(client, monkeypatch):
    from dimoo_npu.serve.scheduler import Job

    sched = client.app.state.scheduler
    body = {"prompt": "a red circle", "timesteps": 2, "seed": 0}
    monkeypatch.setattr(sched, "max_tokens", 10)
    alone = client.post("/v1/images/generations", json=body)
    assert alone.status_code == 400 and "--max-concurrent-tokens" in alone.json()["error"]["message"]
    monkeypatch.setattr(sched, "max_tokens", 1000)
    held = Job(rows=sched.max_batch + 1, make=None, finish=None, post=lambda *event: None, tokens=950)
    sched.submit(held)  # more rows than the batch: it waits at the head of the queue, holding its tokens
    try:
        busy = client.post("/v1/images/generations", json=body)
    finally:
        sched.cancel(held)
    assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1, busy.text
    assert "950 tokens" in busy.json()["error"]["message"]
    assert client.post("/v1/images/generations", json=body).status_code == 200, "the tokens are free again"
