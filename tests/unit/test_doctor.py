"""``dimoo doctor``: availability with reason and fix per backend, ops, versions (CANN from its install files)."""

from __future__ import annotations

import json
import logging

import pytest

from dimoo_npu.adapters import CudaBackend, NpuBackend
from dimoo_npu.adapters.npu import CANN_FIX, DEVICE_FIX
from dimoo_npu.cli import main
from dimoo_npu.commands.doctor import cann_version, collect, format_findings


@pytest.fixture
def no_cann_env(monkeypatch, tmp_path):
    """No CANN install visible: the env vars point at an empty folder, the default roots are replaced."""
    monkeypatch.setenv("ASCEND_HOME_PATH", str(tmp_path / "none"))
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME", raising=False)
    monkeypatch.setattr("dimoo_npu.commands.doctor.CANN_ROOTS", ())


def test_cpu_is_available_with_its_ops_and_collectives():
    cpu = collect()["backends"]["cpu"]
    assert cpu["available"] and cpu["devices"] == 1 and cpu["distributed"] == "gloo"
    assert cpu["ops"] == dict.fromkeys(
        ("attention", "rms_norm", "rotary", "swiglu", "swiglu_packed", "add_rms_norm", "quantized_matmul"), "torch"
    )


def test_dimoo_ops_override_is_reported(monkeypatch):
    monkeypatch.setenv("DIMOO_OPS", "attention=reference")
    findings = collect()
    assert findings["backends"]["cpu"]["ops"]["attention"] == "reference"
    assert findings["environment"]["DIMOO_OPS"] == "attention=reference"


def test_unavailable_backends_carry_the_adapters_reason_and_fix():
    findings = collect()
    for name, backend in (("cuda", CudaBackend()), ("npu", NpuBackend())):
        status = backend.availability()
        if status:
            pytest.skip(f"{name} is available here")
        found = findings["backends"][name]
        assert (found["available"], found["reason"], found["fix"]) == (False, status.reason, status.fix)
        assert "ops" not in found and found["distributed_available"] is False
    text = format_findings(findings)
    assert f"fix: {CudaBackend().availability().fix}" in text and "auto backend: cpu" in text


@pytest.mark.parametrize(
    ("mode", "reason", "fix"), [("no_cann", "cannot load CANN", CANN_FIX), ("no_device", "no NPU", DEVICE_FIX)]
)
def test_npu_failures_from_the_fake_torch_npu(fake_torch_npu_path, monkeypatch, mode, reason, fix):
    monkeypatch.setenv("FAKE_TORCH_NPU_MODE", mode)
    npu = collect()["backends"]["npu"]
    assert not npu["available"] and reason in npu["reason"] and npu["fix"] == fix


def test_cann_version_is_read_from_its_install_info(monkeypatch, tmp_path, no_cann_env):
    assert cann_version() is None
    home = tmp_path / "cann"
    (home / "x86_64-linux").mkdir(parents=True)
    (home / "x86_64-linux" / "ascend_toolkit_install.info").write_text(
        "package_name=Ascend-cann-toolkit\nversion=9.1.0\n"
    )
    monkeypatch.setenv("ASCEND_HOME_PATH", str(home))
    assert cann_version().startswith("9.1.0 (")


def test_versions_name_what_is_missing(no_cann_env):
    versions = collect()["versions"]
    assert versions["torch"].startswith("2.13.0") and versions["onnxruntime"]
    text = format_findings(collect())
    assert "cann not found (set ASCEND_HOME_PATH" in text
    if versions["torch_npu"] is None:
        assert "torch_npu not installed" in text


def test_cli_json_and_require(tmp_path, capsys, caplog):
    out = tmp_path / "doctor.json"
    assert main(["doctor", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["backends"]) == {"npu", "cuda", "cpu", "onnxruntime"} and "backend" in capsys.readouterr().out
    assert main(["doctor", "--require", "cpu"]) == 0
    if not CudaBackend().availability():
        assert main(["doctor", "--require", "cuda"]) == 1
    with caplog.at_level(logging.ERROR, logger="dimoo"):
        assert main(["doctor", "--require", "tpu"]) == 2
    assert "--require 'tpu'" in caplog.text


def test_npu_available_through_the_fake_reports_devices_and_fused_ops(fake_torch_npu_path, monkeypatch):
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "0,1")
    npu = collect()["backends"]["npu"]
    assert npu["available"] and npu["devices"] == 2 and npu["distributed"] == "hccl"
    assert set(npu["ops"].values()) == {"npu"}  # quantized_matmul too: torch_npu's int8 kernels
