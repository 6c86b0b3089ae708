"""`dimoo serve` smoke (default suite): the official openai client on the bundled model (images and chat checked on
the shapes world), JSON errors, a queue overflow (429 + Retry-After), a client that goes away (cancelled, rows
freed) and a SIGTERM drain (the running request finishes, exit 0). One server on 127.0.0.1, bounded waits.
The slow part (32 concurrent mixed requests, equality with `dimoo t2i`, schemathesis) is test_serve_slow.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import openai
import pytest

from dimoo_npu.shapes.detect import detect_object
from tests.integration.serve_support import API_KEY, PROMPT, png, question, start_server

pytest.importorskip("fastapi", reason="dimoo serve needs the serve extra (pip install -e '.[serve]')")


@pytest.fixture(scope="module")
def server():
    server = start_server("--max-batch", "2", "--max-queue", "2", "--api-key", API_KEY, "--max-body-mb", "1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def picture(client):
    result = client.images.generate(prompt=PROMPT, response_format="b64_json", extra_body={"seed": 0})
    return png(result.data[0].b64_json)


def test_openai_client_image_and_chat(client, picture):
    found = detect_object(picture)
    assert picture.shape == (128, 128, 3)
    assert found is not None and (found.shape, found.colour, found.position) == ("circle", "red", "top left")
    answer = client.chat.completions.create(model="dimoo", messages=question(picture, "where is the circle?"))
    assert answer.choices[0].message.content == "top left"
    stream = client.chat.completions.create(
        model="dimoo", messages=question(picture, "what colour is the circle?"), stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == "red"
    assert [m.id for m in client.models.list().data] == ["shapes-dimoo"]  # the bundled folder's name, not its path


def test_errors_are_json_never_500(server):
    url = f"{server.url}/v1/images/generations"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    cases = [
        (httpx.post(url, json={"prompt": PROMPT}), 401),
        (httpx.post(url, json={"prompt": PROMPT}, headers={"Authorization": "Bearer wrong"}), 401),
        (httpx.post(url, content=b"{not json", headers={**auth, "content-type": "application/json"}), 422),
        (httpx.post(url, json={"prompt": PROMPT, "size": "100x100"}, headers=auth), 400),
        (httpx.post(url, json={"prompt": PROMPT, "timesteps": 0}, headers=auth), 400),
        (httpx.post(url, json={"prompt": PROMPT, "n": 3}, headers=auth), 400),  # over --max-batch 2
        (httpx.post(url, json={"prompt": PROMPT, "colour": "red"}, headers=auth), 422),
        (httpx.post(url, content=b"x" * (2 << 20), headers={**auth, "content-type": "application/json"}), 413),
        (httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []}, headers=auth), 422),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def _post_many(server, count: int, body: dict) -> list[httpx.Response]:
    responses: list = [None] * count

    def post(index: int) -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        responses[index] = httpx.post(f"{server.url}/v1/images/generations", json=body, headers=headers, timeout=300)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return responses


def test_full_queue_answers_429_with_retry_after(server):
    responses = _post_many(server, 8, {"prompt": PROMPT, "timesteps": 16, "seed": 1})  # 2 wait, up to 2 run
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["type"] == "rate_limit_error"
    images = {r.json()["data"][0]["b64_json"] for r in responses if r.status_code == 200}
    assert len(images) == 1, "same seed and settings: the same image however the requests were batched"


def test_client_that_goes_away_is_cancelled_and_its_rows_freed(server):
    cancelled = server.metric('dimoo_requests_total{endpoint="/v1/images/generations",status="cancelled"}')
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/images/generations",
            json={"prompt": PROMPT, "timesteps": 1000, "size": "256x256"},  # 256 cells: up to 256 steps
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=3,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.metric("dimoo_batch_rows") > 0:
        time.sleep(0.2)
    assert server.metric("dimoo_batch_rows") == 0, "the rows of the cancelled request were freed"
    assert server.metric('dimoo_requests_total{endpoint="/v1/images/generations",status="cancelled"}') == cancelled + 1


def test_sigterm_finishes_the_running_request_then_exits_0(server, client):
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(r=client.images.generate(prompt=PROMPT, extra_body={"timesteps": 48}))
    )
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.metric("dimoo_batch_rows") == 0:
        time.sleep(0.05)
    server.process.send_signal(signal.SIGTERM)
    thread.join(120)
    assert detect_object(png(result["r"].data[0].b64_json)) is not None, "the running request finished"
    assert server.process.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=2)


def test_help_imports_neither_fastapi_nor_torch():
    code = (
        "import sys\nfrom dimoo_npu.cli import main\ntry:\n    main(['serve', '--help'])\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn', 'prometheus_client') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr[-2000:]
