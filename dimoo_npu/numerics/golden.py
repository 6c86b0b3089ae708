"""Compare a model with the tiny-dimoo golden fixtures (outputs of the public reference code)."""

from __future__ import annotations

import torch

from dimoo_npu.block_outputs import block_name, capture_blocks
from dimoo_npu.losses import masked_diffusion_loss
from dimoo_npu.numerics.compare import LayerDiff, compare_layer
from dimoo_npu.numerics.tolerances import tolerance


def golden_batch(golden: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The goldens' padded forward batch: input ids (B, L), real lengths (B,), attention mask (B, L)."""
    ids, lengths = golden["forward.input_ids"], golden["forward.lengths"]
    return ids, lengths, torch.arange(ids.shape[1])[None] < lengths[:, None]


def forward_errors(model: torch.nn.Module, golden: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Max abs error of every forward golden over real (unpadded) positions, and the loss error."""
    ids, lengths, mask = golden_batch(golden)
    with torch.no_grad(), capture_blocks(model) as blocks:
        logits = model(ids.to(device), mask.to(device)).float()
        loss = masked_diffusion_loss(logits, golden["loss.labels"].to(device))
    logits = logits.cpu()
    hidden = [blocks[block_name(i)].float().cpu() for i in range(len(blocks))]
    errors = {"logits_image": 0.0, "logits_text_top": 0.0, "logits_full_pos0": 0.0}
    errors.update({f"hidden.{i}": 0.0 for i in range(len(hidden))})
    for row, n in enumerate(lengths.tolist()):
        got = {
            "logits_image": logits[row, :n, -8192:],
            "logits_text_top": logits[row, :n, :2048],
            "logits_full_pos0": logits[row, 0],
            **{f"hidden.{i}": h[row, :n] for i, h in enumerate(hidden)},
        }
        for key, value in got.items():
            expected = golden[f"forward.{key}"][row]
            reference = expected if key == "logits_full_pos0" else expected[:n]
            errors[key] = max(errors[key], float((value - reference).abs().max()))
    errors["loss"] = abs(float(loss.cpu()) - float(golden["loss.value"][0]))
    return errors


def image_logits_within(
    model: torch.nn.Module, golden: dict[str, torch.Tensor], device: torch.device
) -> list[LayerDiff]:
    """Per row, the image logits of ``model`` (any dtype) against the golden's by the ``golden`` tolerance."""
    ids, lengths, mask = golden_batch(golden)
    with torch.no_grad():
        logits = model(ids.to(device), mask.to(device)).float().cpu()
    tol = tolerance("golden", next(model.parameters()).dtype)
    return [
        compare_layer(f"logits_image[{row}]", golden["forward.logits_image"][row, :n], logits[row, :n, -8192:], tol)
        for row, n in enumerate(lengths.tolist())
    ]
