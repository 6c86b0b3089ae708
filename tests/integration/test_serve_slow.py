"""`dimoo serve` under load (slow: ``python -m pytest tests/integration/test_serve_slow.py -m slow``, a few minutes on
2 cores): 32 concurrent mixed requests all complete, none lost or duplicated, each equal to its single-request twin;
a seeded request equals `dimoo t2i` with that seed at temperature 0 and 1; schemathesis against the server's own
OpenAPI schema for a bounded number of cases per operation finds no 5xx."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from PIL import Image

from dimoo_npu.shapes import world
from dimoo_npu.shapes.detect import detect_object
from tests.integration.serve_support import API_KEY, PROMPT, png, question, start_server

pytestmark = pytest.mark.slow
pytest.importorskip("fastapi", reason="dimoo serve needs the serve extra (pip install -e '.[serve]')")
schemathesis = pytest.importorskip("schemathesis", reason="the schema test needs schemathesis (dev extra)")
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server():
    server = start_server("--max-batch", "8", "--max-queue", "64", "--api-key", API_KEY, "--max-steps", "64")
    yield server
    assert server.stop() == 0


def _mask_png() -> bytes:
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (0, 0, 64, 128))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def _requests() -> list[tuple[str, dict]]:
    """32 mixed requests: text-to-image greedy and seeded at temperature 1, questions, inpainting."""
    rng = random.Random(0)
    objects = world.split_objects("train")
    made = []
    for index in range(16):
        obj = rng.choice(objects)
        body = {"prompt": world.canonical_caption(obj), "seed": index, "timesteps": 16}
        made.append(("t2i", {**body, "temperature": 0.0 if index % 2 else 1.0}))
    for index in range(8):
        obj = rng.choice(objects)
        picture = world.render_array(world.Scene((obj,)))
        made.append(("chat", {"messages": question(picture, world.question(obj, "colour", rng)), "seed": index}))
    for index in range(8):
        picture = world.render_array(world.Scene((rng.choice(objects),)))
        made.append(
            (
                "inpaint",
                {
                    "prompt": world.canonical_caption(rng.choice(objects)),
                    "seed": index,
                    "timesteps": 12,
                    "image": picture,
                },
            )
        )
    return made


def _send(server, kind: str, body: dict) -> str:
    """The request's output: the PNG's base64 or the answer's text."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=600) as client:
        if kind == "t2i":
            response = client.post("/v1/images/generations", json=body)
        elif kind == "chat":
            response = client.post("/v1/chat/completions", json=body)
        else:
            buffer = io.BytesIO()
            Image.fromarray(body["image"]).save(buffer, format="PNG")
            fields = {k: str(v) for k, v in body.items() if k != "image"}
            files = {"image": ("image.png", buffer.getvalue()), "mask": ("mask.png", _mask_png())}
            response = client.post("/v1/images/edits", data=fields, files=files)
        assert response.status_code == 200, response.text
        payload = response.json()
    return payload["choices"][0]["message"]["content"] if kind == "chat" else payload["data"][0]["b64_json"]


def test_32_concurrent_mixed_requests_equal_their_single_twins(server):
    made = _requests()
    with ThreadPoolExecutor(len(made)) as pool:
        together = list(pool.map(lambda item: _send(server, *item), made))
    assert server.metric("dimoo_batch_rows") == 0 and server.metric("dimoo_queue_depth") == 0
    alone = [_send(server, kind, body) for kind, body in made]
    assert together == alone, "every output equals its single-request twin (none lost, swapped or duplicated)"
    images = [png(out) for (kind, _), out in zip(made, together, strict=True) if kind == "t2i"]
    assert sum(detect_object(image) is not None for image in images) >= 12
    assert len({out for (kind, _), out in zip(made, together, strict=True) if kind != "chat"}) == 24
    assert server.metric("dimoo_step_seconds_count") > 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_seeded_request_equals_dimoo_t2i(server, tmp_path, temperature):
    body = {"prompt": PROMPT, "seed": 7, "timesteps": 16, "temperature": temperature}
    served = png(_send(server, "t2i", body))
    out = tmp_path / "t2i.png"
    command = [
        sys.executable,
        "-m",
        "dimoo_npu.cli",
        "t2i",
        "--prompt",
        PROMPT,
        "--seed",
        "7",
        "--timesteps",
        "16",
        "--temperature",
        str(temperature),
        "--output",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=600)
    assert np.array_equal(served, np.asarray(Image.open(out).convert("RGB")))


def test_schema_fuzzing_finds_no_server_error(server):
    """Each operation of /openapi.json, up to 25 generated cases (schemathesis' strategies driven by hypothesis here:
    its pytest plugin does not load under this pytest)."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    answered = server.metric("dimoo_requests_total")
    for operation in operations:

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def fuzz(case):
            response = case.call(headers=AUTH, timeout=120)
            where = f"{case.method} {case.path}"
            assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
            if response.status_code >= 400:
                assert "error" in response.json(), f"{where}: {response.text[:300]}"

        fuzz()
    assert server.metric("dimoo_requests_total") > answered + 50, "the generated cases reached the server"
