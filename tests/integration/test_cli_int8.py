"""Int8 checkpoints through the commands: `dimoo quantize`, then sampling, understanding and serving an int8
folder, and `--quantize` on a float one (issue 26). Random tiny weights: files, shapes and answers are checked."""

from __future__ import annotations

import json
import logging
import time

import pytest
from PIL import Image

from dimoo_npu.cli import main
from dimoo_npu.pipeline import DiMOOPipeline
from dimoo_npu.quantization import QuantizedLinear, is_quantized
from dimoo_npu.shapes.embedded import EMBEDDED_CHECKPOINT

FAST = ["--device", "cpu", "--timesteps", "2"]


@pytest.fixture(scope="module")
def int8_checkpoint(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8") / "tiny-w8a8"
    assert main(["quantize", "--checkpoint", str(checkpoint), "--scheme", "w8a8", "--output", str(folder)]) == 0
    return folder


def test_pipeline_of_an_int8_folder_is_int8_and_fused(int8_checkpoint):
    pipeline = DiMOOPipeline.from_pretrained(int8_checkpoint)
    assert is_quantized(pipeline.model)
    assert isinstance(pipeline.model.transformer.blocks["0"].gate_up_weight, QuantizedLinear)


@pytest.mark.parametrize("how", ["int8 folder", "--quantize"])
def test_t2i_and_understand_run_int8(how, int8_checkpoint, checkpoint, fixture_dir, tmp_path, caplog):
    source = ["--checkpoint", str(int8_checkpoint)] if how == "int8 folder" else ["--checkpoint", str(checkpoint)]
    flags = [*source, *(["--quantize", "w8a16"] if how == "--quantize" else [])]
    out = tmp_path / "out"
    argv = ["t2i", *FAST, *flags, "--prompt", "a red cat", "--width", "32", "--height", "16", "--output-dir", str(out)]
    assert main(argv) == 0
    assert Image.open(next(out.glob("*.png"))).size == (32, 16)
    answers = tmp_path / "answers.jsonl"
    image = str(fixture_dir / "image_96x64.png")
    small = ["--gen-length", "8", "--block-length", "4", "--steps", "4", "--image-budget", "64"]
    argv = ["understand", *flags, *small, "--device", "cpu", "--image", image, "--question", "what is in the picture ?"]
    code = main([*argv, "--output", str(answers)])
    row = json.loads(answers.read_text().splitlines()[0])
    assert isinstance(row["answer"], str)
    assert code == (0 if row["answer"] else 1)  # a random model's answer may decode to nothing: exit 1, as in fp32


def test_int8_twice_is_refused(int8_checkpoint, tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="dimoo"):
        argv = ["t2i", *FAST, "--checkpoint", str(int8_checkpoint), "--prompt", "a cat", "--output-dir", str(tmp_path)]
        assert main([*argv, "--quantize", "w8a8"]) == 2
        assert "already quantized (w8a8): load it without --quantize" in caplog.text
    assert not list(tmp_path.glob("*.png"))


def test_int8_with_graph_mode_runs_compiled(int8_checkpoint, tmp_path, monkeypatch):
    """--compile hands the int8 model to graph mode (tests/unit/test_int8_graph_mode.py compiles it)."""
    from dimoo_npu.sampling import graph

    compiled = []
    monkeypatch.setattr(graph, "compile_forward", lambda model, backend=None: compiled.append(model) or model)
    argv = ["t2i", *FAST, "--checkpoint", str(int8_checkpoint), "--prompt", "a cat", "--output-dir", str(tmp_path)]
    assert main([*argv, "--width", "32", "--height", "16", "--compile"]) == 0
    assert len(compiled) == 1 and is_quantized(compiled[0])
    assert list(tmp_path.glob("*.png"))


def test_serve_quantizes_while_it_loads(monkeypatch):
    pytest.importorskip("fastapi", reason="dimoo serve needs the serve extra (pip install -e '.[serve]')")
    from fastapi.testclient import TestClient

    from dimoo_npu.serve.app import ServeConfig, create_app

    loaded = []
    real = DiMOOPipeline.from_pretrained.__func__
    monkeypatch.setattr(
        DiMOOPipeline,
        "from_pretrained",
        classmethod(lambda cls, *a, **kw: loaded.append(real(cls, *a, **kw)) or loaded[-1]),
    )
    config = ServeConfig(checkpoint=str(EMBEDDED_CHECKPOINT), device="cpu", quantize="w8a8")
    app = create_app(config)
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the bundled model did not load within 120 s"
            time.sleep(0.2)
        body = {"model": "dimoo", "prompt": "a large red circle in the top left", "size": "64x64", "n": 1, "seed": 0}
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["data"][0]["b64_json"]
    assert is_quantized(loaded[0].model)


def test_export_onnx_refuses_an_int8_folder(int8_checkpoint, checkpoint, tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="dimoo"):
        assert main(["export-onnx", "--checkpoint", str(int8_checkpoint), "--output", str(tmp_path / "onnx")]) == 2
    assert f"export-onnx (no int8 graph yet) needs its unquantized source {checkpoint.resolve()}" in caplog.text
    assert not (tmp_path / "onnx").exists()


def test_plan_sample_of_an_int8_folder_counts_int8_bytes(int8_checkpoint, capsys):
    main(["plan", "sample", "--checkpoint", str(int8_checkpoint), "--width", "64", "--height", "64"])
    assert "weights (w8a8: int8 block matmuls + scales)" in capsys.readouterr().out
