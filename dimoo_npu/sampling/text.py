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
    """Token state and one step of a `sample_text` call."""

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
        self.reveal_step: torch.Tensor | None = None  # (B, L) when recording a rollout (`sample_text(record=True)`)
        self.step_index = 0

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

    def stop_finished(self, answer_so_far: torch.Tensor) -> bool:
        """Freeze rows whose answer (B, K) positions hold EOS; True when every row is frozen."""
        self.active &= ~(self.x.gather(1, answer_so_far) == self.eos).any(dim=1)
        return not bool(self.active.any())

    def settle(self, positions: torch.Tensor, answer_so_far: torch.Tensor) -> tuple[bool, bool]:
        """With a threshold, after each step: (the block is revealed in every live row, every row is frozen), in
        one host read; when the block is done, rows whose answer holds EOS are frozen as at a block's end."""
        done = ~((self.x.gather(1, positions) == self.mask) & self.active[:, None]).any()
        stopped = (self.x.gather(1, answer_so_far) == self.eos).any(dim=1)
        self.active &= ~(stopped & done)
        flags = torch.stack([done, ~self.active.any()]).tolist()
        return flags[0], flags[1]


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


@dataclass
class TextCall:
    """The settings of an understanding sampling call, checked, and its rows laid out (nothing sampled yet)."""

    rows: list[torch.Tensor]
    was_tensor: bool
    x: torch.Tensor  # (B, L) padded ids
    real: torch.Tensor  # (B, L) True at real tokens
    answer: torch.Tensor  # (B, G) answer positions
    masked: list[list[int]]  # MASK positions per block at the start, [row][block]
    starts: list[int]  # where each answer starts (host)
    generators: list
    steps: int
    per_block: int
    key: tuple  # block length, temperature, cfg_scale, kv_cache, threshold: what one batch's forwards share


def text_call(
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
) -> TextCall:
    """The keywords of `sample_text` and `text_task`, checked, with the rows laid out.

    The answer is ``gen_length`` positions from ``code_start`` (None: 1 + the index of each row's last BOA).
    ``kv_cache``: "none" (exact), "prefix" or "dual" (see `step_kinds`); ``parallel_threshold`` t in (0, 1]: each
    step also reveals every masked block position of confidence >= t, and a block ends once revealed.
    ``generator``: None, one torch.Generator (drawn in row order), or one per prompt.
    """
    blocks = check_text_settings(gen_length, block_length, steps, temperature, cfg_scale, kv_cache, parallel_threshold)
    rows, was_tensor = as_rows(prompt_ids, "prompt_ids")
    x, real, answer, masked, starts = _prepare(model, rows, code_start, gen_length, block_length)
    generators = row_generators(generator, len(rows))
    key = (block_length, temperature, cfg_scale, kv_cache, parallel_threshold)
    return TextCall(rows, was_tensor, x, real, answer, masked, starts, generators, steps, steps // blocks, key)


def sample_text(
    model, prompt_ids: RowsLike, *, progress: bool = False, record: bool = False, **settings
) -> torch.Tensor | list[torch.Tensor] | Rollout:
    """Fill the answer's MASK positions; returns the whole sequences in the form given (tensor or list).

    ``settings``: `text_call`'s keywords (answer length and place, blocks, steps, guidance, K/V cache, threshold,
    generator), where they are documented. ``progress`` shows a tqdm bar over the blocks. ``record``: return a
    `Rollout` (answer ids, their positions and the step that revealed each) for a policy log-likelihood, sampled
    outside inference mode on the unfused model (`dimoo_npu.sampling.record`).
    """
    if record:
        check_recordable(model)
    with sampling_context(record):
        call = text_call(model, prompt_ids, **settings)
        x, answer, per_block, starts, masked = call.x, call.answer, call.per_block, call.starts, call.masked
        block_length, temperature, cfg_scale, kv_cache, parallel_threshold = call.key
        run = _TextRun(model, x, call.real, cfg_scale, temperature, call.generators, None, kv_cache, parallel_threshold)
        if record:
            run.reveal_step = torch.full_like(x, NOT_SAMPLED)
        kinds = step_kinds(kv_cache, per_block)
        for block in tqdm(range(len(masked[0])), desc="answer blocks", disable=not progress):
            positions = answer[:, block * block_length : (block + 1) * block_length]  # (B, block_length)
            so_far = answer[:, : (block + 1) * block_length]
            counts = torch.tensor([transfer_tokens(m[block], per_block) for m in masked], device=x.device)  # (B, S)
            widths = masked_bounds([m[block] for m in masked], per_block)
            run.first_block_start = min(starts) + block * block_length
            for step in range(per_block):
                run.step_index = block * per_block + step
                run.step(positions, counts[:, step], kinds[step], widths[step])
                if parallel_threshold is not None:
                    done, stopped = run.settle(positions, so_far)
                    if done:
                        break
            if stopped if parallel_threshold is not None else run.stop_finished(so_far):
                break
        if record:
            return Rollout(x.gather(1, answer), answer, x, call.real, run.reveal_step.gather(1, answer), call.steps)
        if call.was_tensor:
            return x.to(call.rows[0].device)
        return [x[index, : row.numel()].to(row.device) for index, row in enumerate(call.rows)]


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
    key: tuple  # block length, temperature, cfg_scale, kv_cache, threshold: what the group's forwards share
    start: int  # where the answer starts (host)
    step: int = 0
    finished: bool = False
    cancelled: bool = False

    @property
    def block(self) -> int:
        return self.step // self.per_block


@torch.inference_mode()
def text_task(model, prompt_ids: torch.Tensor, **settings) -> TextTask:
    """One prompt row and `text_call`'s keywords, checked and laid out for `TextGroup` (nothing sampled yet)."""
    call = text_call(model, [prompt_ids], **settings)
    prompt = call.real[0] & (call.x[0] != model.config.special_tokens["mask"])
    return TextTask(
        call.x[0], prompt, call.answer[0], call.generators[0], call.masked[0], call.per_block, call.key, call.starts[0]
    )


class TextGroup:
    """Understanding tasks with one `TextTask.key`, advanced together: one forward per `step`.

    Each row reveals its own block by its own schedule; the uncond copy of each row hides what was not MASK at
    its start. Tasks join and leave at any step boundary: the batch is rebuilt then. With a K/V cache, a step is a
    full one that refreshes the cache for every row when the batch was rebuilt or a task starts a block, else a
    cached one; so a task that joins mid-way forces a refresh (its tokens then may differ from its run alone).
    With a threshold, a task whose block is revealed moves to its next block (one host read per step).
    """

    def __init__(self, model, key: tuple, buckets: tuple[int, ...] = ()):
        self.model, self.key, self.buckets = model, key, buckets
        self.tasks: list[TextTask] = []
        self.joining: list[TextTask] = []
        self.run: _TextRun | None = None
        self.rebuilt = False  # the next step must refresh a K/V cache

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
        block_length, kv_cache, threshold = self.key[0], self.key[3], self.key[4]
        positions = torch.stack([t.answer[t.block * block_length : (t.block + 1) * block_length] for t in self.tasks])
        counts = [transfer_tokens(t.masked[t.block], t.per_block)[t.step % t.per_block] for t in self.tasks]
        kind = "plain" if kv_cache == "none" else "cached"
        if kind == "cached" and (self.rebuilt or any(t.step % t.per_block == 0 for t in self.tasks)):
            kind = "store"
        self.rebuilt = False
        width = max(masked_bounds([t.masked[t.block]], t.per_block)[t.step % t.per_block] for t in self.tasks)
        self.run.first_block_start = min(t.start + t.block * block_length for t in self.tasks)
        filler = self.run.x.shape[0] - len(self.tasks)
        positions = torch.cat([positions, positions[:1].expand(filler, -1)])
        self.run.step(positions, torch.tensor(counts + [0] * filler, device=positions.device), kind, width)
        revealed = [False] * len(self.tasks)
        if threshold is not None:  # whose block is revealed: one read
            revealed = (~(self.run.x.gather(1, positions) == self.run.mask).any(dim=1)).tolist()
        ended = []
        for index, task in enumerate(self.tasks):
            task.step += 1
            if revealed[index] and task.step % task.per_block:
                task.step += task.per_block - task.step % task.per_block  # the block's later steps are not needed
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
        block_length, temperature, cfg_scale, kv_cache, threshold = self.key
        self.run = _TextRun(
            self.model, x, real, cfg_scale, temperature, generators, prompt.bool() & real, kv_cache, threshold
        )
        self.run.active[len(self.tasks) :] = False  # filler rows reveal nothing, threshold or not
        self.rebuilt = True
