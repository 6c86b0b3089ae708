"""A `dimoo serve` subprocess on 127.0.0.1 for the server tests (bundled model, one CPU thread), and small clients."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx2 as httpx
import numpy as np
from PIL import Image

API_KEY = "test-key"
PROMPT = "a large red circle in the top left"


@dataclass
class Server:
    url: str
    process: subprocess.Popen

    def metric(self, name: str) -> float:
        """The sum of a Prometheus metric's samples whose line starts with ``name`` (labels included)."""
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(*flags: str, ready_within: float = 240) -> Server:
    """Start `dimoo serve` and wait (bounded) for /ready; the caller stops it."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIMOO_LOG_LEVEL": "WARNING"}
    command = [sys.executable, "-m", "dimoo_npu.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *flags]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server = Server(f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + ready_within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dimoo serve exited {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"dimoo serve was not ready within {ready_within} s")


def png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def question(image: np.ndarray, text: str) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": data_uri(image)}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]
