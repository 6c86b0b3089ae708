"""Compare a model with the tiny-dimoo golden fixtures (outputs of the public reference code)."""

from __future__ import annotations

import torch

from dimoo_npu.modeling.block_outputs import block_name, capture_blocks
from dimoo_npu.modeling.losses import masked_diffusion_loss
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


def greedy_sampling_case(
    model: torch.nn.Module, golden: dict[str, torch.Tensor], name: str, case: dict
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Sample one golden case greedily on the model's device: (output ids, the golden's), or None when the case
    is not a sampling case (t2i, inpaint and i2i run `sample_image`, mmu runs `sample_text`)."""
    from dimoo_npu.sampling import sample_image, sample_text

    device = next(model.parameters()).device
    kind = case.get("kind")
    if kind == "mmu":
        out = sample_text(
            model,
            golden[f"{name}.prompt"].to(device),
            gen_length=case["gen_length"],
            block_length=case["block_length"],
            steps=case["steps"],
            cfg_scale=case.get("cfg_scale", 0.0),
        )
        return out, golden[f"{name}.output"]
    if kind not in ("t2i", "inpaint", "i2i"):
        return None
    uncond = golden.get(f"{name}.uncond", golden.get(f"{name}.uncond_text"))
    out = sample_image(
        model,
        golden[f"{name}.prompt"].to(device),
        uncond_ids=None if uncond is None else uncond.to(device),
        uncond_image_ids=golden[f"{name}.uncond_image"].to(device) if kind == "i2i" else None,
        timesteps=case["timesteps"],
        temperature=0.0,
        cfg_scale=case["cfg_scale"],
        cfg_img=case.get("cfg_img", 0.0),
        use_cache=case.get("use_cache", False),
        cache_ratio=case.get("cache_ratio", 0.9),
        warmup_ratio=case.get("warmup_ratio", 0.3),
        refresh_interval=case.get("refresh_interval", 5),
    )
    return out, golden[f"{name}.vq_ids"]
