"""Understanding (text answer) sampling: LLaDA's block-wise low-confidence remasking over one padded batch.

Each step runs the B prompts (and, with CFG, their B uncond copies) in one forward and asks the head only
for the current block's positions. The uncond copy has MASK at every position that was not MASK at the
start; guidance is ``u + (g+1)*(c-u)``. A row whose answer holds EOS after a block stops there (its later
blocks stay MASK) while the other rows go on.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from dimoo_npu.sampling.record import NOT_SAMPLED, Rollout, check_recordable, mark_revealed, sampling_context
from dimoo_npu.sampling.schedule import transfer_tokens
from dimoo_npu.sampling.step import predict_text, reveal


class _TextRun:
    """Token state and one step of a `sample_text` call."""

    def __init__(
        self, model, x: torch.Tensor, real: torch.Tensor, cfg_scale: float, temperature: float, generators, prompt=None
    ):
        tokens = model.config.special_tokens
        self.model, self.x, self.real = model, x, real
        self.mask, self.eos = tokens["mask"], tokens["eos"]
        self.cfg_scale, self.temperature, self.generators = cfg_scale, temperature, generators
        # (B, L): what the uncond copy hides, the non-MASK tokens at the start (given when x is already partly sampled)
        self.prompt = real & (x != self.mask) if prompt is None else prompt
        self.active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        self.reveal_step: torch.Tensor | None = None  # (B, L) when recording a rollout (`sample_text(record=True)`)
        self.step_index = 0

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
        if self.reveal_step is not None:
            mark_revealed(self.reveal_step, positions, chosen, self.step_index)
        self.x.scatter_(1, positions, torch.where(chosen, predicted, current))

    def stop_finished(self, answer_so_far: torch.Tensor) -> bool:
        """Freeze rows whose answer (B, K) positions hold EOS; True when every row is frozen."""
        self.active &= ~(self.x.gather(1, answer_so_far) == self.eos).any(dim=1)
        return not bool(self.active.any())


def _prepare(model, rows: list[torch.Tensor], code_start: int | None, gen_length: int, block_length: int):
    """Padded ids and real mask (B, L) of checked rows, their answer positions (B, G), MASKs per block [row][block]."""
    tokens = model.config.special_tokens
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
    blocks = gen_length // block_length
    masked = (x.gather(1, answer) == tokens["mask"]).view(len(rows), blocks, block_length).sum(-1).tolist()
    return x, real, answer, masked


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
    record: bool = False,
) -> torch.Tensor | list[torch.Tensor] | Rollout:
    """Fill the answer's MASK positions; returns the whole sequences in the form given (tensor or list).

    The answer is ``gen_length`` positions from ``code_start`` (None: 1 + the index of each row's last BOA).
    ``record``: return a `Rollout` (answer ids, their positions and the step that revealed each) for a policy
    log-likelihood, sampled outside inference mode on the unfused model (`dimoo_npu.sampling.record`).
    """
    blocks = check_text_settings(gen_length, block_length, steps, temperature, cfg_scale)
    if record:
        check_recordable(model)
    with sampling_context(record):
        rows, was_tensor = as_rows(prompt_ids, "prompt_ids")
        x, real, answer, masked = _prepare(model, rows, code_start, gen_length, block_length)
        device = x.device
        run = _TextRun(model, x, real, cfg_scale, temperature, row_generators(generator, len(rows)))
        if record:
            run.reveal_step = torch.full_like(x, NOT_SAMPLED)
        per_block = steps // blocks
        for block in tqdm(range(blocks), desc="answer blocks", disable=not progress):
            positions = answer[:, block * block_length : (block + 1) * block_length]  # (B, block_length)
            counts = torch.tensor([transfer_tokens(m[block], per_block) for m in masked], device=device)  # (B, S)
            for step in range(per_block):
                run.step_index = block * per_block + step
                run.step(positions, counts[:, step])
            if run.stop_finished(answer[:, : (block + 1) * block_length]):
                break
        if record:
            return Rollout(x.gather(1, answer), answer, x, real, run.reveal_step.gather(1, answer), steps)
        if was_tensor:
            return x.to(rows[0].device)
        return [x[index, : row.numel()].to(row.device) for index, row in enumerate(rows)]


# ---- step-level sampling: requests join and leave a running batch at step boundaries (`dimoo serve`) ----


@dataclass(eq=False)
class TextTask:
    """One prompt of `sample_text`, sampled step by step inside a `TextGroup` with its own step index."""

    row: torch.Tensor  # (L,) current ids, refreshed from the group at each block end and when the group is rebuilt
    prompt: torch.Tensor  # (L,) bool: what the uncond copy hides
    answer: torch.Tensor  # (G,) answer positions
    generator: torch.Generator | None
    masked: list[int]  # MASK positions per block at the start
    per_block: int
    key: tuple  # block length, temperature, cfg_scale: what the group's one forward and guidance share
    step: int = 0
    finished: bool = False
    cancelled: bool = False

    @property
    def block(self) -> int:
        return self.step // self.per_block


@torch.inference_mode()
def text_task(
    model,
    prompt_ids: torch.Tensor,
    *,
    code_start: int | None = None,
    gen_length: int,
    block_length: int,
    steps: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> TextTask:
    """One prompt row and `sample_text`'s settings, checked and laid out for `TextGroup` (nothing sampled yet)."""
    blocks = check_text_settings(gen_length, block_length, steps, temperature, cfg_scale)
    rows, _ = as_rows([prompt_ids], "prompt_ids")
    x, real, answer, masked = _prepare(model, rows, code_start, gen_length, block_length)
    prompt = real[0] & (x[0] != model.config.special_tokens["mask"])
    key = (block_length, temperature, cfg_scale)
    return TextTask(x[0], prompt, answer[0], generator, masked[0], steps // blocks, key)


class TextGroup:
    """Understanding tasks with one `TextTask.key`, advanced together: one forward per `step`.

    Each row reveals its own block by its own schedule; the uncond copy of each row hides what was not MASK at
    its start. Tasks join and leave at any step boundary (no cache state): the batch is rebuilt then.
    """

    def __init__(self, model, key: tuple, buckets: tuple[int, ...] = ()):
        self.model, self.key, self.buckets = model, key, buckets
        self.tasks: list[TextTask] = []
        self.joining: list[TextTask] = []
        self.run: _TextRun | None = None

    @property
    def live(self) -> list[TextTask]:
        return [t for t in [*self.tasks, *self.joining] if not (t.finished or t.cancelled)]

    def rows(self) -> int:
        return len(self.live)

    def accepts(self, task: TextTask) -> bool:
        return task.key == self.key

    def join(self, task: TextTask) -> None:
        self.joining.append(task)

    @torch.inference_mode()
    def step(self) -> list[TextTask]:
        """One forward for every live task; returns the tasks whose block ended on it (``finished`` when done)."""
        if self.run is None or self.joining or len(self.live) != len(self.tasks):
            self._rebuild()
        if not self.tasks:
            return []
        block_length = self.key[0]
        positions = torch.stack([t.answer[t.block * block_length : (t.block + 1) * block_length] for t in self.tasks])
        counts = [transfer_tokens(t.masked[t.block], t.per_block)[t.step % t.per_block] for t in self.tasks]
        filler = self.run.x.shape[0] - len(self.tasks)
        positions = torch.cat([positions, positions[:1].expand(filler, -1)])
        self.run.step(positions, torch.tensor(counts + [0] * filler, device=positions.device))
        ended = []
        for index, task in enumerate(self.tasks):
            task.step += 1
            if task.step % task.per_block == 0:
                ended.append(task)
                task.row = self.run.x[index, : task.row.numel()].clone()
                so_far = task.answer[: task.block * block_length]
                blocks_left = task.block < len(task.masked)
                task.finished = not blocks_left or bool((task.row[so_far] == self.run.eos).any())
        return ended

    def _rebuild(self) -> None:
        if self.run is not None:
            for index, task in enumerate(self.tasks):
                task.row = self.run.x[index, : task.row.numel()].clone()
        self.tasks, self.joining, self.run = self.live, [], None
        if not self.tasks:
            return
        size = next((b for b in self.buckets if b >= len(self.tasks)), len(self.tasks))
        members = self.tasks + [self.tasks[0]] * (size - len(self.tasks))  # inert filler: reveals nothing
        device = next(self.model.parameters()).device
        x, real = pad_rows([t.row for t in members], device)
        prompt, _ = pad_rows([t.prompt for t in members], device, pad_id=False)
        generators = [t.generator for t in self.tasks] + [None] * (size - len(self.tasks))
        block_length, temperature, cfg_scale = self.key
        self.run = _TextRun(self.model, x, real, cfg_scale, temperature, generators, prompt=prompt.bool() & real)
