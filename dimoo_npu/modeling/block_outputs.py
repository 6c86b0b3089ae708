"""The model's named outputs (``block.<i>``, ``logits``) and the one forward hook that collects them.

Every block of ``model.transformer.blocks`` reports its output under ``block.<i>``; the model's final
output is stored under ``logits``. The same names are the extra outputs of an ONNX file exported with
layer outputs, so torch and onnxruntime results line up by name. Used by every comparison in
`dimoo_npu.numerics` (`dimoo check`, goldens) and by the ONNX exporter, which sits below them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

LOGITS = "logits"


def block_name(index: int | str) -> str:
    return f"block.{index}"


def layer_names(n_layers: int) -> list[str]:
    """Names in forward order: every block, then the logits."""
    return [block_name(i) for i in range(n_layers)] + [LOGITS]


@contextmanager
def capture_blocks(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every transformer block's output lands in the yielded dict (hooks removed after)."""
    outputs: dict[str, torch.Tensor] = {}
    blocks = model.transformer.blocks

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            outputs[name] = output

        return hook

    handles = [block.register_forward_hook(hook_for(block_name(key))) for key, block in blocks.items()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run_with_capture(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Run ``model`` once and return every block output and the logits, as fp32 CPU tensors."""
    with capture_blocks(model) as outputs:
        logits = model(input_ids, attention_mask)
    outputs[LOGITS] = logits
    return {name: tensor.detach().float().cpu() for name, tensor in outputs.items()}
