"""``dimoo check`` and ``dimoo export-onnx`` end to end: a passing check, a perturbed checkpoint that fails at the
perturbed block, and one clear error per bad input (unknown backend, unavailable backend, mismatched ONNX)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dimoo_npu.adapters import CudaBackend, NpuBackend
from dimoo_npu.cli import main

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxscript", reason="needs the onnx extra: pip install -e '.[onnx]'")

PERTURBED = "model.transformer.blocks.1.ff_out.weight"


@pytest.fixture
def cli(capsys, caplog):
    """Run ``dimoo`` in-process; returns (exit code, printed text, logged errors)."""

    def run(*argv: str) -> tuple[int, str, str]:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="dimoo"):
            code = main(list(argv))
        return code, capsys.readouterr().out, caplog.text

    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint_dir):
    """The fixture checkpoint's transformer exported once through the CLI (with block outputs, verified)."""
    folder = tmp_path_factory.mktemp("export")
    code = main(["export-onnx", "--checkpoint", str(checkpoint_dir), "--output", str(folder), "--parts", "transformer"])
    assert code == 0
    return folder / "transformer.onnx"


@pytest.fixture
def perturbed(tmp_path, checkpoint_dir):
    """A copy of the fixture checkpoint with one weight of block 1 nudged (everything else byte-identical)."""
    folder = tmp_path / "perturbed"
    shutil.copytree(checkpoint_dir, folder, ignore=shutil.ignore_patterns("vqvae"))
    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][PERTURBED]
    shard.chmod(0o644)
    tensors = load_file(str(shard))
    noise = torch.randn(tensors[PERTURBED].shape, generator=torch.Generator().manual_seed(0))
    tensors[PERTURBED] = (tensors[PERTURBED].float() + 0.02 * noise).to(tensors[PERTURBED].dtype)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return folder


def test_check_passes_on_the_fixture_with_onnxruntime(cli, checkpoint_dir, tmp_path):
    report, plot = tmp_path / "check.json", tmp_path / "check.png"
    args = ["--checkpoint", str(checkpoint_dir), "--backends", "cpu-ref,cpu,onnxruntime"]
    code, out, _ = cli("check", *args, "--json", str(report), "--plot", str(plot))
    assert code == 0, out
    assert "cpu vs cpu-ref" in out and "onnxruntime vs cpu-ref" in out and "\nPASS\n" in out
    data = json.loads(report.read_text())
    assert data["passed"] and set(data["backends"]) == {"cpu", "onnxruntime"}
    assert [layer["layer"] for layer in data["backends"]["onnxruntime"]["layers"]] == ["block.0", "block.1", "logits"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_perturbed_checkpoint_fails_loudly_at_the_perturbed_block(cli, perturbed, exported):
    # The ONNX file was exported from the original weights; the torch backends load the perturbed copy.
    args = ["--checkpoint", str(perturbed), "--backends", "cpu-ref,cpu,onnxruntime", "--onnx", str(exported)]
    code, out, _ = cli("check", *args)
    assert code == 1
    onnx_section = out[out.index("onnxruntime vs cpu-ref") :]
    assert "block.0 " in onnx_section and "first failing layer: block.1" in onnx_section
    assert out.rstrip().endswith("FAIL: onnxruntime from block.1")
    assert "cpu vs cpu-ref" in out and "first failing layer: none" in out  # torch kernels still agree


def test_original_checkpoint_passes_against_its_exported_file(cli, checkpoint_dir, exported):
    code, out, _ = cli(
        "check", "--checkpoint", str(checkpoint_dir), "--backends", "cpu-ref,onnxruntime", "--onnx", str(exported)
    )
    assert code == 0, out


def test_unknown_backend_is_named(cli, checkpoint_dir):
    code, _, log = cli("check", "--checkpoint", str(checkpoint_dir), "--backends", "cpu-ref,tpu")
    assert code == 2 and "unknown backend 'tpu'" in log and "onnxruntime" in log


@pytest.mark.parametrize(("name", "backend"), [("cuda", CudaBackend), ("npu", NpuBackend)])
def test_unavailable_backend_gives_reason_and_fix(cli, checkpoint_dir, name, backend):
    status = backend().availability()
    if status:
        pytest.skip(f"{name} is available on this machine")
    code, _, log = cli("check", "--checkpoint", str(checkpoint_dir), "--backends", f"cpu-ref,{name}")
    assert code == 2 and f"backend '{name}' is not available here" in log
    assert status.reason in log and f"Fix: {status.fix}" in log


def test_onnx_file_of_another_model_is_refused(cli, checkpoint_dir, tmp_path, exported):
    other = tmp_path / "other"
    shutil.copytree(checkpoint_dir, other, ignore=shutil.ignore_patterns("vqvae", "*.safetensors*"))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    code, out, log = cli(
        "check", "--checkpoint", str(other), "--backends", "cpu-ref,onnxruntime", "--onnx", str(exported)
    )
    assert code == 2 and "does not match checkpoint" in log and "n_layers is 2 in the ONNX file but 3" in log
    assert "dimoo export-onnx --checkpoint" in log and out == ""  # refused before any backend ran


def test_onnxruntime_refuses_low_precision(cli, checkpoint_dir, exported):
    args = ["--checkpoint", str(checkpoint_dir), "--backends", "cpu-ref,onnxruntime", "--onnx", str(exported)]
    code, _, log = cli("check", *args, "--dtype", "bf16")
    assert code == 2 and "fp32 graph only" in log


def test_export_refuses_to_overwrite(cli, checkpoint_dir, exported):
    before = exported.stat().st_mtime_ns
    code, _, log = cli(
        "export-onnx", "--checkpoint", str(checkpoint_dir), "--output", str(exported.parent), "--parts", "transformer"
    )
    assert code == 2 and "--overwrite" in log and exported.stat().st_mtime_ns == before


def test_check_compiled_forward_matches_the_reference(cli, checkpoint_dir, monkeypatch):
    """--compile checks what sampling runs (fused layout, a whole-graph capture); aot_eager stands in for inductor,
    whose code generation takes minutes on a small CPU."""
    from dimoo_npu.sampling import graph

    compiled = []

    def capture(model, backend=None):
        compiled.append(model)
        return compile_forward(model, backend="aot_eager")

    compile_forward = graph.compile_forward
    monkeypatch.setattr(graph, "compile_forward", capture)
    code, out, errors = cli("check", "--checkpoint", str(checkpoint_dir), "--backends", "cpu-ref,cpu", "--compile")
    assert code == 0 and len(compiled) == 1 and not errors, out + errors
