"""Compare a model with the tiny-dimoo golden fixtures (outputs of the public reference code)."""

from __future__ import annotations

import torch

from dimoo_npu.losses import masked_diffusion_loss


def forward_errors(model: torch.nn.Module, golden: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Max abs error of every forward golden over real (unpadded) positions, and the loss error."""
    ids, lengths = golden["forward.input_ids"].to(device), golden["forward.lengths"]
    mask = torch.arange(ids.shape[1], device=device)[None] < lengths.to(device)[:, None]
    hidden: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: hidden.append(o)) for b in model.transformer.blocks.values()]
    with torch.no_grad():
        logits = model(ids, mask).float()
        loss = masked_diffusion_loss(logits, golden["loss.labels"].to(device))
    for hook in hooks:
        hook.remove()
    logits, hidden = logits.cpu(), [h.float().cpu() for h in hidden]
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
