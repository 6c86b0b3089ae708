"""Understanding (text answer) sampling: LLaDA's block-wise low-confidence remasking over one padded batch.

Each step runs the B prompts (and, with CFG, their B uncond copies) in one forward and asks the head only
for the current block's positions. The uncond copy has MASK at every position that was not MASK at the
start; guidance is ``u + (g+1)*(c-u)``. A row whose answer holds EOS after a block stops there (its later
blocks stay MASK) while the other rows go on.

With a K/V cache (``kv_cache="prefix"|"dual"``) a block's first step runs every position and keeps its K/V in an
`MLCache`; the block's later steps run only the block (dual) or the block onward (prefix) against them, asking the
head only for the positions still masked. ``parallel_threshold`` reveals, beyond the schedule's count, every masked
position at least that confident, and ends a block once it is revealed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dimoo_npu.sampling.batching import (
    RowsLike,
    as_rows,
    code_starts,
    last_index_after,
    pad_rows,
    row_generators,
)
from dimoo_npu.sampling.cache import MLCache
from dimoo_npu.sampling.graph import static_shapes
from dimoo_npu.sampling.record import NOT_SAMPLED, Rollout, check_recordable, mark_revealed, sampling_context
from dimoo_npu.sampling.schedule import transfer_tokens
from dimoo_npu.sampling.step import predict_text, reveal
from dimoo_npu.settings.generation_settings import check_text_settings
from dimoo_npu.utils.errors import InputError


def step_kinds(kv_cache: str, per_block: int) -> list[str]:
    """What each step of a block runs: "plain" (every position, nothing kept: exact), "store" (every position, its
    K/V kept: a block's first step with a cache) or "cached" (the recomputed positions against the kept K/V)."""
    if kv_cache == "none":
        return ["plain"] * per_block
    return ["store"] + ["cached"] * (per_block - 1)


def masked_bounds(masked: list[int], per_block: int) -> list[int]:
    """Most MASK positions a block of each row (``masked[b]`` at its start) can hold at each step: the head's
    width on a cached step, known on the host (a threshold only reveals more, never less)."""
    schedules = [transfer_tokens(m, per_block) for m in masked]
    return [max(1, *(m - sum(s[:step]) for m, s in zip(masked, schedules, strict=True))) for step in range(per_block)]


class _TextRun:
    """Token state of a `TextGroup`'s batch and one step over it."""

    def __init__(
        self,
        model,
        x: torch.Tensor,
        real: torch.Tensor,
        cfg_scale: float,
        temperature: float,
        generators,
        prompt=None,
        kv_cache: str = "none",
        threshold: float | None = None,
    ):
        tokens = model.config.special_tokens
        self.model, self.x, self.real = model, x, real
        self.mask, self.eos = tokens["mask"], tokens["eos"]
        self.cfg_scale, self.temperature, self.generators = cfg_scale, temperature, generators
        # (B, L): what the uncond copy hides, the non-MASK tokens at the start (given when x is already partly sampled)
        self.prompt = real & (x != self.mask) if prompt is None else prompt
        self.active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        self.kv_cache, self.threshold = kv_cache, threshold
        self.cache = MLCache() if kv_cache != "none" else None
        self.static = static_shapes(model)  # graph mode: the head sees the whole block on every cached step
        self.first_block_start = 0  # the rows' lowest current block start (host): sizes a "prefix" cached step
        self.reveal_step: torch.Tensor | None = None  # (B, L) when recording a rollout (`text_task(record=True)`)
        self.step_index: torch.Tensor | None = None  # (B, 1) each row's step, when recording

    def logits(self, positions: torch.Tensor, slots: torch.Tensor | None = None, kind: str = "plain") -> torch.Tensor:
        """Guided full-vocabulary logits (B, K, V) at block positions (B, K), or at ``slots`` (B, k) of them.

        "store" runs every position and keeps its K/V; "cached" runs only the current block ("dual") or the block
        and everything after it ("prefix") against the kept K/V, at their true rotary positions.
        """
        branches = 1 if self.cfg_scale == 0 else 2
        seq = self.x if branches == 1 else torch.cat([self.x, self.x.masked_fill(self.prompt, self.mask)])  # (2B, L)
        real = self.real if branches == 1 else self.real.repeat(2, 1)
        if kind == "plain":
            out = self.model(seq, real, logits_for=positions.repeat(branches, 1), check_ids=False).float()
        elif kind == "store":
            self.cache.begin_step(full=True)
            heads = positions.gather(1, slots).repeat(branches, 1)
            out = self.model(seq, real, cache=self.cache, logits_for=heads, check_ids=False).float()
        else:
            self.cache.begin_step(full=False)
            recompute = self._recomputed(positions).repeat(branches, 1)  # (2B, W), the block first
            ids = seq.gather(1, recompute)
            heads = slots.repeat(branches, 1)  # the block's slots are the first K of the recomputed positions
            out = self.model(
                ids, real, positions=recompute, cache=self.cache, logits_for=heads, check_ids=False
            ).float()
        if branches == 1:
            return out
        cond, uncond = out.chunk(2)
        return uncond + (self.cfg_scale + 1) * (cond - uncond)

    def _recomputed(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions (B, W) a cached step runs: the block ("dual"), or the block to the end of the batch ("prefix";
        positions past it repeat the block's first, rewriting the same K/V)."""
        if self.kv_cache == "dual":
            return positions
        length = self.x.shape[1]
        width = length - self.first_block_start
        ahead = positions[:, :1] + torch.arange(width, device=positions.device)  # (B, W)
        return torch.where(ahead < length, ahead, positions[:, :1])

    def step(self, positions: torch.Tensor, counts: torch.Tensor, kind: str = "plain", width: int = 0) -> None:
        """Reveal counts[b] of row b's masked block positions (B, K), the most confident first (and, with a
        threshold, every one at least that confident). ``width``: most masked positions a row has (cached kinds)."""
        current = self.x.gather(1, positions)
        masked = (current == self.mask) & self.active[:, None]
        if kind == "plain":
            predicted, prob = predict_text(self.logits(positions), self.temperature, self.generators)
            chosen = reveal(prob.masked_fill(~masked, float("-inf")), counts, self.threshold)
            self._record(positions, chosen)
            self.x.scatter_(1, positions, torch.where(chosen, predicted, current))
            return
        block = positions.shape[1]
        width = block if self.static else min(width, block)
        slots = torch.sort((~masked).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # masked ones first
        logits = self.logits(positions, slots, kind)
        predicted, prob = predict_text(logits, self.temperature, self.generators, slots, block, torch.float32)
        chosen = reveal(prob.masked_fill(~masked.gather(1, slots), float("-inf")), counts, self.threshold)
        where = positions.gather(1, slots)
        self._record(where, chosen)
        self.x.scatter_(1, where, torch.where(chosen, predicted, current.gather(1, slots)))

    def _record(self, positions: torch.Tensor, chosen: torch.Tensor) -> None:
        if self.reveal_step is not None:
            mark_revealed(self.reveal_step, positions, chosen, self.step_index)


def _prepare(model, rows: list[torch.Tensor], code_start: int | None, gen_length: int, block_length: int):
    """Padded ids and real mask (B, L) of checked rows, their answer positions (B, G), MASKs per block [row][block]
    and where each answer starts (B,), on the host."""
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
    return x, real, answer, masked, starts


# ---- the one step loop: `sample_text` runs a group of one task; `dimoo serve` joins requests at step boundaries ----


@dataclass(eq=False)
class TextTask:
    """Prompt rows of one understanding call, sampled step by step inside a `TextGroup` with their own step index.

    The rows of a task move through their blocks together: with a threshold, to the next block once every live row
    of the task has revealed the current one. At a block's end a row whose answer holds EOS is frozen (its later
    blocks stay MASK); the task is finished when all its rows are frozen or its last block ended.
    """

    rows: list[torch.Tensor]  # the prompt rows as given (checked): their lengths and devices
    was_tensor: bool  # they came as one (B, L) tensor
    x: torch.Tensor  # (b, L) current ids, refreshed from the group at each block end and when the group is rebuilt
    real: torch.Tensor  # (b, L) True at real tokens
    prompt: torch.Tensor  # (b, L) what the uncond copy hides: the non-MASK tokens at the start
    answer: torch.Tensor  # (b, G) answer positions
    generators: list
    counts: torch.Tensor  # (blocks, b, per_block) positions each row reveals per step: on the device, one copy
    widths: list[list[int]]  # [block][step] most MASK positions a row can hold (the head's width on a cached step)
    kinds: list[str]  # what each step of a block runs (`step_kinds`)
    start: int  # where the earliest answer starts (host)
    key: tuple  # block length, temperature, cfg_scale, kv_cache, threshold, record: what a group's forwards share
    active: torch.Tensor  # (b,) rows not frozen, refreshed like ``x``
    reveal_step: torch.Tensor | None = None  # (b, L) when recording (see `text_task`), refreshed like ``x``
    step: int = 0
    finished: bool = False
    cancelled: bool = False

    @property
    def per_block(self) -> int:
        return len(self.kinds)

    @property
    def blocks(self) -> int:
        return len(self.widths)

    @property
    def block(self) -> int:
        return self.step // self.per_block


def text_task(
    model,
    prompt_ids: RowsLike,
    *,
    code_start: int | None = None,
    gen_length: int,
    block_length: int,
    steps: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    kv_cache: str = "none",
    parallel_threshold: float | None = None,
    generator=None,
    record: bool = False,
) -> TextTask:
    """The settings of an understanding sampling call, checked and laid out as a task for `TextGroup` (nothing
    sampled yet).

    The answer is ``gen_length`` positions from ``code_start`` (None: 1 + the index of each row's last BOA).
    ``kv_cache``: "none" (exact), "prefix" or "dual" (see `step_kinds`); ``parallel_threshold`` t in (0, 1]: each
    step also reveals every masked block position of confidence >= t, and a block ends once revealed.
    ``generator``: None, one torch.Generator (drawn in row order), or one per prompt. ``record``: keep the step
    that revealed each answer position, for a policy log-likelihood: sampled outside inference mode on the unfused
    model (`dimoo_npu.sampling.record`), in a group of recording tasks only.
    """
    blocks = check_text_settings(gen_length, block_length, steps, temperature, cfg_scale, kv_cache, parallel_threshold)
    if record:
        check_recordable(model)
    per_block = steps // blocks
    with sampling_context(record):
        rows, was_tensor = as_rows(prompt_ids, "prompt_ids")
        x, real, answer, masked, starts = _prepare(model, rows, code_start, gen_length, block_length)
        schedules = [[transfer_tokens(m[block], per_block) for m in masked] for block in range(blocks)]
        counts = torch.tensor(schedules, device=x.device)
        prompt = real & (x != model.config.special_tokens["mask"])
        active = torch.ones(len(rows), dtype=torch.bool, device=x.device)
        reveal_step = torch.full_like(x, NOT_SAMPLED) if record else None
    widths = [masked_bounds([m[block] for m in masked], per_block) for block in range(blocks)]
    key = (block_length, temperature, cfg_scale, kv_cache, parallel_threshold, record)
    generators = row_generators(generator, len(rows))
    kinds = step_kinds(kv_cache, per_block)
    return TextTask(
        rows, was_tensor, x, real, prompt, answer, generators, counts, widths, kinds, min(starts), key, active,
        reveal_step,
    )  # fmt: skip


class TextGroup:
    """Understanding tasks with one `TextTask.key`, advanced together: one forward per `step`.

    Each task reveals its own block by its own schedule; the uncond copy of each row hides what was not MASK at
    its start. Tasks join and leave at any step boundary: the batch is rebuilt then. With a K/V cache, a step is a
    full one that refreshes the cache for every row when the batch was rebuilt or a task starts a block, else a
    cached one; so a task that joins mid-way forces a refresh (its tokens then may differ from its run alone).
    The host is read once on a step where a task ends a block (its EOS check), and with a threshold once on every
    step (has each task revealed its block?); ``buckets`` pads the rows to fixed sizes with inert copies.
    """

    def __init__(self, model, key: tuple, buckets: tuple[int, ...] = ()):
        self.model, self.key, self.buckets = model, key, buckets
        self.tasks: list[TextTask] = []  # in batch order
        self.joining: list[TextTask] = []
        self.run: _TextRun | None = None
        self.padding = 0
        self.rebuilt = False  # the next step must refresh a K/V cache

    @property
    def live(self) -> list[TextTask]:
        return [t for t in [*self.tasks, *self.joining] if not (t.finished or t.cancelled)]

    def rows(self) -> int:
        """Prompt rows of the live tasks (what a server's batch limit counts)."""
        return sum(len(t.rows) for t in self.live)

    def accepts(self, task: TextTask) -> bool:
        return task.key == self.key

    def join(self, task: TextTask) -> None:
        self.joining.append(task)

    def step(self) -> list[TextTask]:
        """One forward for every live task; returns the tasks whose block ended on it (``finished`` when done)."""
        with sampling_context(self.key[-1]):
            return self._step()

    def _step(self) -> list[TextTask]:
        if self.run is None or self.joining or len(self.live) != len(self.tasks):
            self._rebuild()
        if not self.tasks:
            return []
        block_length = self.key[0]
        positions = self._per_row(
            lambda t: t.answer[:, t.block * block_length : (t.block + 1) * block_length],
            lambda first: first[:1].expand(self.padding, -1),  # inert filler: reveals nothing
        )  # (B, block_length)
        counts = self._per_row(lambda t: t.counts[t.block, :, t.step % t.per_block])
        kinds = {t.kinds[t.step % t.per_block] for t in self.tasks}
        kind = "plain" if kinds == {"plain"} else "store" if self.rebuilt or "store" in kinds else "cached"
        self.rebuilt = False
        width = max(t.widths[t.block][t.step % t.per_block] for t in self.tasks)
        self.run.first_block_start = min(t.start + t.block * block_length for t in self.tasks)
        if self.run.reveal_step is not None:
            self.run.step_index = self._per_row(lambda t: t.answer.new_full((len(t.rows),), t.step))[:, None]
        self.run.step(positions, counts, kind, width)
        return self._advance(positions)

    def _advance(self, positions: torch.Tensor) -> list[TextTask]:
        """Each task's next step, its block's end (with a threshold, also once its live rows revealed the block),
        and there its rows whose answer holds EOS frozen (with a threshold, only if the block is revealed)."""
        block_length, threshold, run = self.key[0], self.key[4], self.run
        spans = self._spans()
        # what is read: with a threshold, every task on every step; else a task ending a block that is not its last
        reading = [
            threshold is not None or ((t.step + 1) % t.per_block == 0 and t.block < t.blocks - 1) for t, _ in spans
        ]
        flags = []
        for (task, rows), read in zip(spans, reading, strict=True):
            if not read:
                continue
            x, active = run.x[rows], run.active[rows]
            stopped = (x.gather(1, task.answer[:, : (task.block + 1) * block_length]) == run.eos).any(dim=1)
            if threshold is not None:
                done = ~((x.gather(1, positions[rows]) == run.mask) & active[:, None]).any()
                stopped &= done
                flags.append(done[None])
            active &= ~stopped
            flags.append(active.any()[None])
        values = iter(torch.cat(flags).tolist() if flags else [])  # the step's one host read, if any
        ended = []
        for (task, _), read in zip(spans, reading, strict=True):
            revealed = threshold is not None and next(values)
            any_live = next(values) if read else True
            task.step += 1
            if revealed and task.step % task.per_block:
                task.step += task.per_block - task.step % task.per_block  # the block's later steps are not needed
            if task.step % task.per_block == 0:
                task.finished = task.block >= task.blocks or not any_live
                ended.append(task)
        self._save(ended)
        return ended

    def _spans(self) -> list[tuple[TextTask, slice]]:
        """Each task and its rows in the batch."""
        spans, start = [], 0
        for task in self.tasks:
            spans.append((task, slice(start, start + len(task.rows))))
            start += len(task.rows)
        return spans

    def _per_row(self, values, padding=None) -> torch.Tensor:
        """``values(task)`` of every task in batch order, then the filler's rows: ``padding(first task's)``, or
        zeros; on the device, so no step waits on a copy from the host."""
        parts = [values(t) for t in self.tasks]
        if self.padding:
            first = parts[0]
            parts.append(padding(first) if padding else first.new_zeros((self.padding, *first.shape[1:])))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _save(self, tasks: list[TextTask]) -> None:
        """Copy the batch's state of ``tasks`` into them."""
        for task, rows in self._spans():
            if task in tasks:
                width = task.x.shape[1]
                task.x = self.run.x[rows, :width].clone()
                task.active = self.run.active[rows].clone()
                if task.reveal_step is not None:
                    task.reveal_step = self.run.reveal_step[rows, :width].clone()

    def _rebuild(self) -> None:
        """A new batch of the live tasks (a full forward follows when cached: no cached state carries over)."""
        if self.run is not None:
            self._save(self.tasks)
        self.tasks, self.joining, self.run = self.live, [], None
        if not self.tasks:
            return
        rows = sum(len(t.rows) for t in self.tasks)
        self.padding = next((size for size in self.buckets if size >= rows), rows) - rows
        _, temperature, cfg_scale, kv_cache, threshold, record = self.key
        if len(self.tasks) == 1 and not self.padding:  # one task, unpadded: its own laid-out rows
            task = self.tasks[0]
            x, real, prompt, reveal_step = task.x, task.real, task.prompt, task.reveal_step
        else:
            members = [(t, i) for t in self.tasks for i in range(len(t.rows))] + [(self.tasks[0], 0)] * self.padding
            device = next(self.model.parameters()).device
            x, real = pad_rows([t.x[i, : t.rows[i].numel()] for t, i in members], device)
            prompt = pad_rows([t.prompt[i, : t.rows[i].numel()] for t, i in members], device, pad_id=False)[0] & real
            reveal_step = None
            if record:
                own = [t.reveal_step[i, : t.rows[i].numel()] for t, i in members]
                reveal_step = pad_rows(own, device, pad_id=NOT_SAMPLED)[0]
        generators = [g for t in self.tasks for g in t.generators] + [None] * self.padding
        self.run = _TextRun(self.model, x, real, cfg_scale, temperature, generators, prompt, kv_cache, threshold)
        self.run.active = self._per_row(lambda t: t.active)  # the filler's rows: False, they reveal nothing
        self.run.reveal_step = reveal_step
        self.rebuilt = True


def sample_text(
    model, prompt_ids: RowsLike, *, progress: bool = False, **settings
) -> torch.Tensor | list[torch.Tensor] | Rollout:
    """Fill the answer's MASK positions; returns the whole sequences in the form given (tensor or list).

    ``settings``: `text_task`'s keywords (answer length and place, blocks, steps, guidance, K/V cache, threshold,
    generator, record), where they are documented; the call is one such task run to its end in a `TextGroup` of its
    own. ``progress`` shows a tqdm bar over the blocks. With ``record=True`` it returns a `Rollout` (answer ids,
    their positions and the step that revealed each) for a policy log-likelihood.
    """
    task = text_task(model, prompt_ids, **settings)
    group = TextGroup(model, task.key)
    group.join(task)
    with tqdm(total=task.blocks, desc="answer blocks", disable=not progress) as bar:
        while not task.finished:
            if group.step():
                bar.update()
    x, answer = task.x, task.answer
    if task.reveal_step is not None:
        steps = task.blocks * task.per_block
        return Rollout(x.gather(1, answer), answer, x, task.real, task.reveal_step.gather(1, answer), steps)
    if task.was_tensor:
        return x.to(task.rows[0].device)
    return [x[index, : row.numel()].to(row.device) for index, row in enumerate(task.rows)]
