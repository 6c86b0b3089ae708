"""Shared fixtures: the copied tiny-dimoo goldens and small random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "tiny-dimoo"
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tiny-dimoo"
CHECKPOINT = FIXTURES / "checkpoint"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def checkpoint_dir() -> Path:
    return CHECKPOINT


@pytest.fixture(scope="session")
def golden() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / "golden.safetensors"))


@pytest.fixture(scope="session")
def cases() -> dict:
    return json.loads((FIXTURES / "cases.json").read_text())


@pytest.fixture(scope="session")
def tiny_model():
    """The fixture checkpoint in fp32 on CPU (read-only: tests must not modify it)."""
    import dimoo_npu

    return dimoo_npu.load_model(CHECKPOINT)
