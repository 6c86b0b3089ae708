"""`dimoo serve`'s server-wide policy, in-process and without a model (the model-free parts of every request are
refused before the model is needed): the token budget (429 / 400), a drain that ends within its grace period, the
API key on every route but the probes and before the body, unknown fields and non-integers refused on every
endpoint, model names, bad startup settings (exit 2 before binding), bodies over the limit however sent (413) and
slow clients (headers and body timed out). Servers listen on 127.0.0.1 only; every wait is bounded."""

from __future__ import annotations

import io
import signal
import socket
import threading
import time

import httpx2 as httpx
import pytest

from tests.integration.serve_support import API_KEY, PROMPT, free_port

pytest.importorskip("fastapi", reason="dimoo serve needs the serve extra (pip install -e '.[serve]')")

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _config(**overrides):
    from dimoo_npu.serve.app import ServeConfig
    from dimoo_npu.shapes.embedded import EMBEDDED_CHECKPOINT

    return ServeConfig(checkpoint=str(EMBEDDED_CHECKPOINT), device="cpu", **overrides)


@pytest.fixture
def no_model_client():
    """The app with a key, its lifespan not run: the model never loads (requests that pass every check get 503)."""
    from fastapi.testclient import TestClient

    from dimoo_npu.serve.app import create_app

    return TestClient(create_app(_config(api_key=API_KEY)))


# ---- the token budget and the drain (the scheduler, with groups that never finish) ----


class EndlessGroup:
    """A sampler group whose tasks never finish: each step takes 10 ms, like a long request."""

    def __init__(self, model, key, buckets=()):
        self.tasks = []

    def accepts(self, task) -> bool:
        return True

    def join(self, task) -> None:
        self.tasks.append(task)

    def rows(self) -> int:
        return sum(not t.cancelled for t in self.tasks)

    def step(self) -> list:
        time.sleep(0.01)
        return []


class Task:
    key, cancelled, finished = (), False, False


def _job(tokens: int, events: list):
    from dimoo_npu.serve.scheduler import Job

    return Job(rows=1, make=Task, finish=lambda task: None, post=lambda *event: events.append(event), tokens=tokens)


@pytest.fixture
def endless(monkeypatch):
    from dimoo_npu.serve import scheduler

    monkeypatch.setattr(scheduler, "_group_type", lambda task: EndlessGroup)


def test_tokens_of_queued_and_running_work_stay_under_the_budget(endless):
    from dimoo_npu.serve.scheduler import QueueFull, Scheduler, TooMuchWork

    sched = Scheduler(lambda: object(), max_batch=8, max_queue=8, max_tokens=100)
    sched.ready.set()  # not started: every job stays queued
    events: list = []
    first = _job(60, events)
    sched.submit(first)
    with pytest.raises(QueueFull, match="60 tokens"):
        sched.submit(_job(41, events))  # 2 requests is well under --max-queue: the tokens refuse it
    with pytest.raises(TooMuchWork, match="over this server's limit of 100"):
        sched.submit(_job(101, events))  # could never run: not worth a retry
    sched.submit(_job(40, events))
    sched.cancel(first)
    sched.submit(_job(60, events))  # a cancelled job's tokens are free again
    assert sched.tokens_in_flight() == 100


def test_drain_cancels_running_work_at_a_step_boundary_after_the_grace(endless):
    from dimoo_npu.serve.scheduler import NotAccepting, Scheduler

    sched = Scheduler(lambda: object(), max_batch=8, max_queue=8, max_tokens=100)
    sched.start()
    assert sched.ready.wait(5)
    events: list = []
    sched.submit(_job(10, events))
    deadline = time.monotonic() + 5
    while sched.busy_rows() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    sched.stop(0.2)
    assert not sched.thread.is_alive(), "the loop ended though the request never finishes"
    assert time.monotonic() - started < 1.5
    assert [kind for kind, _ in events] == ["error"] and isinstance(events[0][1], NotAccepting)
    assert sched.busy_rows() == 0 and sched.tokens_in_flight() == 0


def test_sigterm_ends_a_server_held_by_endless_work_within_its_grace(endless):
    from dimoo_npu.serve.http_server import build_server

    overdue = threading.Event()
    server = build_server(_config(grace_s=0.3), "127.0.0.1", free_port(), overdue=overdue.set)
    server.scheduler.load = lambda: object()  # no model: the work is EndlessGroup's
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert server.scheduler.ready.wait(10)
    events: list = []
    server.scheduler.submit(_job(10, events))
    started = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - started < 3, "ended within the grace period (0.3 s) + 2 s"
    assert [kind for kind, _ in events] == ["error"], "the running request was cancelled (503), not left hanging"
    assert not overdue.is_set(), "ended by the drain, not by the last-resort exit"


def test_a_server_still_held_after_the_grace_is_ended_by_the_watchdog(endless, monkeypatch):
    from dimoo_npu.serve import http_server

    monkeypatch.setattr(http_server, "HARD_STOP_S", 0.2)
    overdue = threading.Event()
    server = http_server.build_server(_config(grace_s=0.1), "127.0.0.1", free_port(), overdue=overdue.set)
    server.handle_exit(signal.SIGTERM, None)  # never run: as if something held the process after the drain
    assert overdue.wait(3), "the last-resort exit fired after the grace + HARD_STOP_S"


# ---- the API key, unknown fields, strict integers, model names (over HTTP, no model loaded) ----


def test_every_route_but_the_probes_needs_the_key_before_the_body(no_model_client):
    client = no_model_client
    for path in ("/metrics", "/openapi.json", "/docs", "/redoc", "/v1/models", "/no-such-route"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "authentication_error"
    assert 'endpoint="other",status="401"} 1.0' in client.get("/metrics", headers=AUTH).text, "made-up paths: one label"
    malformed = {"content-type": "application/json"}
    for path in ("/v1/images/generations", "/v1/chat/completions", "/v1/images/edits"):
        assert client.post(path, content=b"{not json", headers=malformed).status_code == 401, path
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 503  # answered (not loaded), without the key
    assert client.get("/metrics", headers=AUTH).status_code == 200
    assert client.get("/openapi.json", headers=AUTH).status_code == 200


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_unknown_fields_and_non_integers_are_422_on_every_endpoint(no_model_client):
    client = no_model_client
    chat = [{"role": "user", "content": "hi"}]
    cases = [
        ("/v1/images/generations", {"json": {"prompt": PROMPT, "colour": "red"}}, "colour"),
        ("/v1/chat/completions", {"json": {"messages": chat, "temprature": 0}}, "temprature"),
        ("/v1/images/edits", {"data": {"prompt": PROMPT, "colour": "red"}, "files": {"image": _png()}}, "colour"),
        ("/v1/images/edits", {"data": {"prompt": PROMPT}, "files": {"image": _png(), "extra": _png()}}, "extra"),
        ("/v1/images/generations", {"json": {"prompt": PROMPT, "n": True}}, "n"),
        ("/v1/images/generations", {"json": {"prompt": PROMPT, "n": "2"}}, "n"),
        ("/v1/images/generations", {"json": {"prompt": PROMPT, "timesteps": "16"}}, "timesteps"),
        ("/v1/chat/completions", {"json": {"messages": chat, "max_tokens": True}}, "max_tokens"),
    ]
    for path, body, field in cases:
        response = client.post(path, headers=AUTH, **body)
        assert response.status_code == 422, (path, body, response.text)
        error = response.json()["error"]
        assert error["param"] == field and field in error["message"], (path, error)


def test_edits_form_fields_of_another_task_are_refused_not_ignored(no_model_client):
    cases = [
        ({"prompt": PROMPT, "edit_type": "edit", "mask_h_ratio": "0.5"}, {"image": _png()}, "mask_h_ratio"),
        ({"prompt": PROMPT, "edit_type": "inpaint", "cfg_img": "1.5"}, {"image": _png()}, "cfg_img"),
        ({"prompt": PROMPT, "edit_type": "edit"}, {"image": _png(), "mask": _png()}, "mask"),
    ]
    for form, files, field in cases:
        response = no_model_client.post("/v1/images/edits", data=form, files=files, headers=AUTH)
        assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


def test_models_listed_and_aliases_are_served_any_other_is_404(no_model_client):
    client = no_model_client
    listed = [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
    for name in (*listed, "dimoo"):
        response = client.post("/v1/images/generations", json={"prompt": PROMPT, "model": name}, headers=AUTH)
        assert response.status_code == 503, (name, response.text)  # past every check: only the model is missing
    chat = [{"role": "user", "content": "hi"}]
    for path, body in [
        ("/v1/images/generations", {"json": {"prompt": PROMPT, "model": "gpt-image-1"}}),
        ("/v1/chat/completions", {"json": {"messages": chat, "model": "gpt-4o"}}),
        ("/v1/images/edits", {"data": {"prompt": PROMPT, "model": "dall-e-2"}, "files": {"image": _png()}}),
    ]:
        response = client.post(path, headers=AUTH, **body)
        assert response.status_code == 404, (path, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == "model"
        assert listed[0] in error["message"] and "dimoo" in error["message"]


# ---- bad startup settings: exit 2 before binding ----


@pytest.mark.parametrize(
    ("env", "flags", "named"),
    [
        ({"DIMOO_MAX_LENGTH": "abc"}, [], "DIMOO_MAX_LENGTH"),
        ({"DIMOO_MAX_CONCURRENT_TOKENS": "-5"}, [], "DIMOO_MAX_CONCURRENT_TOKENS"),
        ({}, ["--checkpoint", "/nonexistent/dimoo"], "config.json"),
        ({}, ["--max-concurrent-tokens", "0"], "--max-concurrent-tokens"),
        ({}, ["--header-timeout", "0"], "--header-timeout"),
        ({"DIMOO_MAX_LENGTH": "abc"}, ["--max-concurrent-tokens", "1000"], "DIMOO_MAX_LENGTH"),
    ],
)
def test_a_bad_startup_setting_exits_2_before_binding(monkeypatch, caplog, env, flags, named):
    import uvicorn

    from dimoo_npu.cli import main

    bound = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: bound.append(self))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--port", str(free_port()), "--device", "cpu", *flags]) == 2
    assert not bound, "refused before the server bound its port"
    assert named in caplog.text


def test_a_model_that_fails_to_load_ends_the_server_with_exit_2(tmp_path, caplog):
    import shutil

    from dimoo_npu.cli import main
    from dimoo_npu.shapes.embedded import EMBEDDED_CHECKPOINT

    shutil.copy(EMBEDDED_CHECKPOINT / "config.json", tmp_path)  # passes the startup check; no weights to load
    argv = ["serve", "--checkpoint", str(tmp_path), "--port", str(free_port()), "--device", "cpu"]
    finished = []
    thread = threading.Thread(target=lambda: finished.append(main(argv)), daemon=True)  # no signals off the main thread
    thread.start()
    thread.join(15)
    assert finished == [2], "the server stopped with the load error instead of answering 503"
    assert str(tmp_path) in caplog.text


# ---- bodies over the limit and slow clients, against uvicorn on 127.0.0.1 ----


@pytest.fixture(scope="module")
def edge_server():
    """The real server stack (uvicorn, the header-timeout protocol, the app's middleware), no lifespan: no model."""
    from dimoo_npu.serve.http_server import build_server

    config = _config(api_key=API_KEY, max_body_bytes=1024, header_timeout_s=0.3, body_timeout_s=0.3)
    server = build_server(config, "127.0.0.1", free_port())
    server.config.lifespan = "off"
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield server.config.host, server.config.port
    server.should_exit = True
    thread.join(5)


def _exchange(address, data: bytes, wait: float = 3.0) -> tuple[bytes, float]:
    """Send raw bytes, read until the server closes the connection (bounded): the reply and the seconds taken."""
    started = time.monotonic()
    with socket.create_connection(address, timeout=wait) as sock:
        sock.sendall(data)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return reply, time.monotonic() - started


def test_a_body_over_the_limit_is_413_however_it_is_sent(edge_server):
    host, port = edge_server
    url = f"http://{host}:{port}/v1/images/generations"
    headers = {**AUTH, "content-type": "application/json"}

    def chunks():
        for _ in range(8):
            yield b" " * 512

    declared = httpx.post(url, content=b" " * 4096, headers=headers, timeout=5)
    chunked = httpx.post(url, content=chunks(), headers=headers, timeout=5)
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["type"] == "too_large"
    assert chunked.request.headers["transfer-encoding"] == "chunked" and "content-length" not in chunked.request.headers


def test_slow_headers_and_slow_bodies_are_cut_off(edge_server):
    reply, seconds = _exchange(edge_server, b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    assert reply == b"" and seconds < 2, "closed after the header timeout (0.3 s)"
    head = (
        f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    reply, seconds = _exchange(edge_server, head.encode() + b'{"prompt": ')  # 11 of 100 bytes, then nothing
    assert reply.startswith(b"HTTP/1.1 408") and seconds < 2, reply[:200]
    assert b"not received within" in reply
    reply, _ = _exchange(edge_server, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200"), "a prompt client is served"
