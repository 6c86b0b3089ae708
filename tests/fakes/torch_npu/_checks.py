"""Argument checks fail the way op-plugin's TORCH_CHECK does: with a RuntimeError carrying the message."""

from __future__ import annotations


def check(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"{message} (fake torch_npu)")
