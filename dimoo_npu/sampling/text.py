"""Understanding (text answer) sampling: LLaDA's block-wise low-confidence remasking over one padded batch.

Each step runs the B prompts (and, with CFG, their B uncond copies) in one forward and asks the head only
for the current block's positions. The uncond copy has MASK at every position that was not MASK at the
start; guidance is ``u + (g+1)*(c-u)``. A row whose answer holds EOS after a block stops there (its later
blocks stay MASK) while the other rows go on.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dimoo_npu.errors import InputError
from dimoo_npu.generation_settings import check_text_settings
from dimoo_npu.sampling.batching import (
    RowsLike,
    as_rows,
    code_starts,
    last_index_after,
    pad_rows,
    row_generators,
)
from dimoo_npu.sampling.schedule import transfer_tokens
from dimoo_npu.sampling.step import predict_text, reveal


class _TextRun:
    """Token state and one step of a `sample_text` call."""

    def __init__(self, model, x: torch.Tensor, real: torch.Tensor, cfg_scale: float, temperature: float, generators):
        tokens = model.config.special_tokens
        self.model, self.x, self.real = model, x, real
        self.mask, self.eos = tokens["mask"], tokens["eos"]
        self.cfg_scale, self.temperature, self.generators = cfg_scale, temperature, generators
        self.prompt = real & (x != self.mask)  # (B, L): what the uncond copy hides
        self.active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)

    def logits(self, positions: torch.Tensor) -> torch.Tensor:
        """Guided full-vocabulary logits (B, K, V) at positions (B, K)."""
        if self.cfg_scale == 0:
            return self.model(self.x, self.real, logits_for=positions, check_ids=False).float()
        seq = torch.cat([self.x, self.x.masked_fill(self.prompt, self.mask)])  # (2B, L)
        both = self.model(seq, self.real.repeat(2, 1), logits_for=positions.repeat(2, 1), check_ids=False).float()
        cond, uncond = both.chunk(2)
        return uncond + (self.cfg_scale + 1) * (cond - uncond)

    def step(self, positions: torch.Tensor, counts: torch.Tensor) -> None:
        """Reveal counts[b] of row b's masked block positions (B, K), the most confident first."""
        predicted, prob = predict_text(self.logits(positions), self.temperature, self.generators)
        current = self.x.gather(1, positions)
        masked = (current == self.mask) & self.active[:, None]
        chosen = reveal(prob.masked_fill(~masked, float("-inf")), counts)
        self.x.scatter_(1, positions, torch.where(chosen, predicted, current))

    def stop_finished(self, answer_so_far: torch.Tensor) -> bool:
        """Freeze rows whose answer (B, K) positions hold EOS; True when every row is frozen."""
        self.active &= ~(self.x.gather(1, answer_so_far) == self.eos).any(dim=1)
        return not bool(self.active.any())


@torch.inference_mode()
def sample_text(
    model,
    prompt_ids: RowsLike,
    *,
    code_start: int | None = None,
    gen_length: int,
    block_length: int,
    steps: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    generator=None,
    progress: bool = False,
) -> torch.Tensor | list[torch.Tensor]:
    """Fill the answer's MASK positions; returns the whole sequences in the form given (tensor or list).

    The answer is ``gen_length`` positions from ``code_start`` (None: 1 + the index of each row's last BOA).
    """
    blocks = check_text_settings(gen_length, block_length, steps, temperature, cfg_scale)
    tokens = model.config.special_tokens
    rows, was_tensor = as_rows(prompt_ids, "prompt_ids")
    starts = code_starts(rows, code_start, lambda row: last_index_after(row, tokens["boa"]), "BOA")
    for index, (row, start) in enumerate(zip(rows, starts, strict=True)):
        if start < 0 or start + gen_length > row.numel():
            raise InputError(
                f"prompt row {index} has {row.numel()} tokens, too few for a {gen_length}-token answer "
                f"from position {start}: append BOA + {gen_length} MASK + EOA"
            )
    device = next(model.parameters()).device
    x, real = pad_rows(rows, device)
    model.check_token_ids(x)  # once here: the steps' forwards skip it (it reads the device back)
    answer = torch.tensor(starts, device=device)[:, None] + torch.arange(gen_length, device=device)  # (B, G)
    masked = (x.gather(1, answer) == tokens["mask"]).view(len(rows), blocks, block_length).sum(-1).tolist()
    run = _TextRun(model, x, real, cfg_scale, temperature, row_generators(generator, len(rows)))
    per_block = steps // blocks
    for block in tqdm(range(blocks), desc="answer blocks", disable=not progress):
        positions = answer[:, block * block_length : (block + 1) * block_length]  # (B, block_length)
        counts = torch.tensor([transfer_tokens(m[block], per_block) for m in masked], device=device)  # (B, S)
        for step in range(per_block):
            run.step(positions, counts[:, step])
        if run.stop_finished(answer[:, : (block + 1) * block_length]):
            break
    if was_tensor:
        return x.to(rows[0].device)
    return [x[index, : row.numel()].to(row.device) for index, row in enumerate(rows)]
