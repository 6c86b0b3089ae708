"""Image sampling (text-to-image, editing, inpainting): MaskGIT-style steps over one padded batch.

Every prompt and every CFG branch of it is one row of a right-padded batch, so a step is one forward.
Rows are branch-major: the B conditional rows, then B text-uncond rows (cfg_scale > 0), then B
image-uncond rows (cfg_img > 0). An uncond row is its prefix followed by the current image part
``x[code_start-2:]`` of its prompt. Only MASK cells of the output grid are sampled; the head is asked
for the 8192 image-code logits of the still-masked cells only (all positions on ML-Cache refresh steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dimoo_npu.sampling.batching import (
    RowsLike,
    as_rows,
    code_starts,
    first_pair_end,
    matching_rows,
    pad_rows,
    row_generators,
)
from dimoo_npu.sampling.cache import MLCache
from dimoo_npu.sampling.graph import static_shapes
from dimoo_npu.sampling.record import NOT_SAMPLED, Rollout, check_recordable, mark_revealed, sampling_context
from dimoo_npu.sampling.schedule import keep_masked_table, masked_upper_bounds, recompute_widths, refresh_steps
from dimoo_npu.sampling.step import sample_codes, stay_masked
from dimoo_npu.settings.generation_settings import check_image_settings
from dimoo_npu.utils.errors import InputError


@dataclass
class ImageBatch:
    """Token state of a batch: every branch row, and the grid cells shared by a prompt's branches."""

    seq: torch.Tensor  # (R, L) ids of every row, R = branches * B
    real: torch.Tensor  # (R, L) True at real tokens
    cell_pos: torch.Tensor  # (R, N) position of each grid cell in its row
    cells: torch.Tensor  # (B, N) current ids of the grid cells
    branches: int
    lengths: list[int]  # (R,) real tokens of each row, known on the host

    def write_cells(self) -> None:
        """Copy the current grid into every branch row."""
        self.seq.scatter_(1, self.cell_pos, self.cells.repeat(self.branches, 1))

    def positions(self, slots: torch.Tensor) -> torch.Tensor:
        """Row positions (R, K) of grid cells slots (B, K), for every branch."""
        return self.cell_pos.gather(1, slots.repeat(self.branches, 1))


def _image_parts(rows: list[torch.Tensor], starts: list[int], tokens) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each row's image part ``BOA BOI rows EOI EOA`` and the offsets (N,) of its grid cells in it."""
    parts = []
    for index, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ends = row[-2:].tolist() if row.numel() >= 2 else []
        heads = row[start - 2 : start].tolist() if 2 <= start <= row.numel() - 2 else []
        if heads != [tokens["boa"], tokens["boi"]] or ends != [tokens["eoi"], tokens["eoa"]]:
            raise InputError(
                f"prompt row {index} is not laid out as prompt + BOA BOI + rows + EOI EOA with code_start={start} "
                "at the first cell: build it with dimoo_npu.tokens.sequences or pass the right code_start"
            )
        parts.append(row[start - 2 :])
    newline = tokens["newline"]
    for index, part in enumerate(parts[1:], start=1):
        if part.numel() != parts[0].numel() or not torch.equal(part == newline, parts[0] == newline):
            raise InputError(
                f"prompt rows 0 and {index} ask for different grid sizes: one call samples one image size; "
                "group prompts by size"
            )
    grid = parts[0][2:-2]
    return parts, (grid != newline).nonzero()[:, 0] + 2


def build_image_batch(
    rows: list[torch.Tensor], starts: list[int], uncond: list[list[torch.Tensor]], tokens, device: torch.device
) -> ImageBatch:
    """Rows of every branch: the prompts, then each list of uncond prefixes followed by the image parts."""
    parts, offsets = _image_parts(rows, starts, tokens)
    prefixes = [[row[: start - 2] for row, start in zip(rows, starts, strict=True)], *uncond]
    seq, real = pad_rows(
        [torch.cat([p, part]) for branch in prefixes for p, part in zip(branch, parts, strict=True)], device
    )
    part_start = torch.tensor([p.numel() for branch in prefixes for p in branch], device=device)  # (R,)
    cell_pos = part_start[:, None] + offsets.to(device)  # (R, N)
    cells = torch.stack(parts).to(device)[:, offsets.to(device)]  # (B, N)
    lengths = [p.numel() + part.numel() for branch in prefixes for p, part in zip(branch, parts, strict=True)]
    return ImageBatch(seq, real, cell_pos, cells, len(prefixes), lengths)


def _guidance(cfg_scale: float, cfg_img: float, editing: bool):
    """Combine branch logits (branches, B, K, C) -> (B, K, C), in the public code's order of operations.

    May overwrite ``logits``: the samplers hand over a fresh tensor."""

    def guide(logits: torch.Tensor) -> torch.Tensor:
        cond = logits[0]
        if not editing:  # (1+g)*cond - g*uncond, in place: the branch logits are a fresh tensor
            return cond if cfg_scale == 0 else cond.mul_(1 + cfg_scale).sub_(logits[1].mul_(cfg_scale))
        out, branch = cond, 1
        if cfg_scale > 0:
            out, branch = out + cfg_scale * (cond - logits[1]), 2
        if cfg_img > 0:
            out = out + cfg_img * (cond - logits[branch])
        return out

    return guide


def _step_modes(schedule: list[bool]) -> list[str]:
    """Per step: "cached" (ML-Cache step), "store" (full step that fills the cache for the cached step after it)
    or "plain" (full step, nothing to keep: only the masked cells' logits are needed)."""
    after = [*schedule[1:], True]
    return ["cached" if not now else "plain" if later else "store" for now, later in zip(schedule, after, strict=True)]


def _forward(model, batch: ImageBatch, positions, cache: MLCache, mode: str, recompute, codes):
    """Image-code logits (R, K, C) at positions (R, K): directly, or through the ML-Cache."""
    if mode == "plain":
        return model(batch.seq, batch.real, logits_for=positions, vocab_range=codes, check_ids=False).float()
    cache.begin_step(full=mode == "store")
    if mode == "store":  # every position: the next cached step ranks all of them by max logit
        cache.store_logits(model(batch.seq, batch.real, cache=cache, vocab_range=codes, check_ids=False))
    else:
        ids = batch.seq.gather(1, recompute)  # (R, Kc)
        logits = model(ids, batch.real, positions=recompute, cache=cache, vocab_range=codes, check_ids=False)
        cache.merge_logits(recompute, logits)
    return cache.logits_at(positions).float()


def _uncond_branches(rows, uncond_ids, uncond_image_ids, cfg_scale, cfg_img) -> list[list[torch.Tensor]]:
    branches = []
    if cfg_scale > 0:
        branches.append(matching_rows(uncond_ids, len(rows), "uncond_ids", "cfg_scale > 0"))
    if cfg_img > 0:
        branches.append(matching_rows(uncond_image_ids, len(rows), "uncond_image_ids", "cfg_img > 0"))
    return branches


def _prepare(model, prompt_ids, uncond_ids, uncond_image_ids, code_start, cfg_scale: float, cfg_img: float):
    """Rows, code starts and uncond branches of `sample_image`'s arguments, and their checked batch."""
    tokens = model.config.special_tokens
    rows, _ = as_rows(prompt_ids, "prompt_ids")
    uncond = _uncond_branches(rows, uncond_ids, uncond_image_ids, cfg_scale, cfg_img)
    find = lambda row: first_pair_end(row, tokens["boa"], tokens["boi"])  # noqa: E731
    starts = code_starts(rows, code_start, find, "BOA immediately followed by BOI")
    batch = build_image_batch(rows, starts, uncond, tokens, next(model.parameters()).device)
    model.check_token_ids(batch.seq)  # once here: the steps' forwards skip it (it reads the device back)
    return rows, starts, uncond, batch


def _masked_schedule(batch: ImageBatch, mask: int, timesteps: int) -> tuple[list[list[int]], list[list[int]]]:
    """Cells kept masked after each step and the most masked at its start, ``[step][row]`` (one host read)."""
    masked = (batch.cells == mask).sum(dim=1).tolist()
    if min(masked) == 0:
        raise InputError(
            f"prompt row {masked.index(0)} has no MASK cell in its image grid, so there is nothing to sample: "
            "mask the cells to generate"
        )
    keep = keep_masked_table(masked, timesteps)
    return keep, masked_upper_bounds(masked, keep)


class _Run:
    """Token state of an `ImageGroup`'s batch and one step over it."""

    def __init__(self, model, batch: ImageBatch, tokens, guide, temperature: float, generators):
        self.model, self.batch, self.guide = model, batch, guide
        self.static = static_shapes(model)  # graph mode: the head sees every cell on every plain step
        self.temperature, self.generators = temperature, generators
        self.mask = tokens["mask"]
        self.offset = tokens["image_offset"]
        self.codes = (self.offset, self.offset + tokens["codebook_size"])
        # Greedy ML-Cache: each cell's code and score from the guided logits last computed for it (B, N), and the
        # cell at each row position (R, L), -1 off the grid; a cached step redoes only the cells it recomputed.
        cells = batch.cells.shape[1]
        self.cell_code = torch.zeros_like(batch.cells)
        self.cell_score = torch.zeros(batch.cells.shape, device=batch.cells.device)
        index = torch.arange(cells, device=batch.cells.device).expand_as(batch.cell_pos)
        self.cell_at = torch.full_like(batch.seq, -1).scatter_(1, batch.cell_pos, index)
        self.reveal_step: torch.Tensor | None = None  # (B, N) when recording a rollout (`sample_image(record=True)`)
        self.step_index: torch.Tensor | None = None  # (B, 1) each row's step, when recording

    def step(self, bounds: list[int], keep: torch.Tensor, cache: MLCache, mode: str, recompute) -> None:
        """Sample every masked cell, then re-mask the least confident ones (keep[b] stay masked)."""
        batch = self.batch
        width = batch.cells.shape[1] if self.static else max(bounds)
        masked = batch.cells == self.mask  # (B, N)
        slots = torch.sort((~masked).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # masked cells first
        live = torch.arange(width, device=masked.device) < masked.sum(dim=1, keepdim=True)  # (B, K)
        batch.write_cells()
        greedy = self.temperature == 0
        if mode == "cached" and greedy:
            sampled, score = self._cached_greedy(cache, recompute, slots)
        else:
            logits = _forward(self.model, batch, batch.positions(slots), cache, mode, recompute, self.codes)
            guided = self.guide(logits.view(batch.branches, -1, *logits.shape[1:]))  # (B, K, C)
            sampled, score = sample_codes(guided, self.temperature, self.generators, bounds)
            if mode == "store" and greedy:  # what the cached steps after it start from
                self.cell_code.scatter_(1, slots, sampled)
                self.cell_score.scatter_(1, slots, score)
        stay = stay_masked(score, live, keep)
        if self.reveal_step is not None:
            mark_revealed(self.reveal_step, slots, live & ~stay, self.step_index)
        fresh = torch.where(stay, self.mask, sampled + self.offset)
        batch.cells.scatter_(1, slots, torch.where(live, fresh, batch.cells.gather(1, slots)))

    def _cached_greedy(self, cache: MLCache, recompute: torch.Tensor, slots: torch.Tensor):
        """Code and score (B, K) of slots on a greedy cached step, guiding only the cells whose logits changed.

        A cell's greedy code and score depend only on its logits in every branch, and a cached step changes the
        logits at its recomputed positions only: so the step guides, samples and scores the cells at those
        positions (width branches * Kc, fixed per call) instead of every masked cell (width up to N). Positions
        off the grid stand for cell 0, redone from its current logits: the same values again.
        """
        batch = self.batch
        cache.begin_step(full=False)
        ids = batch.seq.gather(1, recompute)  # (R, Kc)
        logits = self.model(ids, batch.real, positions=recompute, cache=cache, vocab_range=self.codes, check_ids=False)
        cache.merge_logits(recompute, logits)
        cells = self.cell_at.gather(1, recompute).clamp_min(0)  # (R, Kc)
        cells = cells.view(batch.branches, -1, cells.shape[1]).transpose(0, 1).flatten(1)  # (B, branches * Kc)
        redone = cache.logits_at(batch.positions(cells)).float()  # (R, W, C)
        guided = self.guide(redone.view(batch.branches, -1, *redone.shape[1:]))  # (B, W, C)
        code, score = sample_codes(guided, 0.0, self.generators, [cells.shape[1]] * cells.shape[0])
        self.cell_code.scatter_(1, cells, code)
        self.cell_score.scatter_(1, cells, score)
        return self.cell_code.gather(1, slots), self.cell_score.gather(1, slots)


# ---- the one step loop: `sample_image` runs a group of one task; `dimoo serve` joins requests at step boundaries ----


@dataclass(eq=False)
class ImageTask:
    """One `sample_image` call's rows, sampled step by step inside an `ImageGroup` with its own step index.

    Its rows draw noise from their own generators with per-row shapes (`dimoo_npu.sampling.step`), so its
    output equals `sample_image` with the same arguments whatever else shares the group.
    """

    rows: list[torch.Tensor]
    starts: list[int]
    uncond: list[list[torch.Tensor]]
    generators: list
    modes: list[str]  # per step: plain / store / cached (see _step_modes)
    keep: list[list[int]]  # [step][row]
    keep_table: torch.Tensor  # (T, b) the same on the device: one copy per task, none per step
    bounds: list[list[int]]  # [step][row]
    batch: ImageBatch  # its rows alone, checked; a group of this task only runs on it
    cells: torch.Tensor  # (b, N) current grid, refreshed from the group when it leaves or the group is rebuilt
    key: tuple  # grid and every setting the group's one forward and guidance share
    reveal_step: torch.Tensor | None = None  # (b, N) when recording (see `image_task`), refreshed like ``cells``
    step: int = 0
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.step >= len(self.modes) or max(self.bounds[self.step]) == 0


def image_task(
    model,
    prompt_ids: RowsLike,
    *,
    uncond_ids: RowsLike | None = None,
    uncond_image_ids: RowsLike | None = None,
    code_start: int | None = None,
    timesteps: int,
    temperature: float = 1.0,
    cfg_scale: float = 0.0,
    cfg_img: float = 0.0,
    use_cache: bool = False,
    cache_ratio: float = 0.9,
    warmup_ratio: float = 0.3,
    refresh_interval: int = 5,
    generator=None,
    record: bool = False,
) -> ImageTask:
    """The settings of an image sampling call, checked and laid out as a task for `ImageGroup` (nothing sampled yet).

    Guidance: ``(1+g)*cond - g*uncond`` (cfg_scale only), or when ``uncond_image_ids`` is given (editing)
    ``cond + g*(cond - u_text) + g_img*(cond - u_img)``. ``generator``: None, one torch.Generator, or one per
    prompt (then a sample does not depend on its batch). ``record``: keep the step that revealed each cell, for a
    policy log-likelihood: sampled outside inference mode on the unfused model (`dimoo_npu.sampling.record`), in a
    group of recording tasks only.
    """
    check_image_settings(timesteps, temperature, cfg_scale, cfg_img, cache_ratio, warmup_ratio, refresh_interval)
    if record:
        check_recordable(model)
    with sampling_context(record):
        rows, starts, uncond, batch = _prepare(
            model, prompt_ids, uncond_ids, uncond_image_ids, code_start, cfg_scale, cfg_img
        )
        keep, bounds = _masked_schedule(batch, model.config.special_tokens["mask"], timesteps)
        keep_table = torch.tensor(keep, device=batch.cells.device)
        reveal_step = torch.full_like(batch.cells, NOT_SAMPLED) if record else None
    grid = (rows[0].numel() - starts[0] + 2, batch.cells.shape[1])  # image part length and cells fix the grid
    cache = (cache_ratio, warmup_ratio, refresh_interval) if use_cache else None
    key = (grid, temperature, cfg_scale, cfg_img, uncond_image_ids is not None, cache, record)
    modes = _step_modes(refresh_steps(timesteps, use_cache, warmup_ratio, refresh_interval))
    generators = row_generators(generator, len(rows))
    return ImageTask(
        rows, starts, uncond, generators, modes, keep, keep_table, bounds, batch, batch.cells, key, reveal_step
    )


class ImageGroup:
    """Image tasks of one grid and one setting (`ImageTask.key`), advanced together: one forward per `step`.

    Every task takes its own step (its own keep count); the batch is rebuilt only before a full forward (a plain
    or store step), never before a cached one, whose K/V must be every row's current ones. So a task joins when
    the group's next step is full and every running task's remaining kinds of step equal the joiner's (always
    without ML-Cache; with it, in practice only before the group's first step). A finished or cancelled task's
    rows stay, inert (nothing live), until that rebuild. ``bucket`` pads the rows to a multiple of
    fixed sizes (graph mode: one compiled graph per size) with inert copies.
    """

    def __init__(self, model, key: tuple, buckets: tuple[int, ...] = ()):
        self.model, self.key, self.buckets = model, key, buckets
        self.tokens = model.config.special_tokens
        self.tasks: list[ImageTask] = []  # in batch order, inert ones included
        self.joining: list[ImageTask] = []
        self.run: _Run | None = None
        self.cache = MLCache()
        self.recompute = None
        self.padding = 0

    @property
    def live(self) -> list[ImageTask]:
        return [t for t in [*self.tasks, *self.joining] if not (t.done or t.cancelled)]

    def rows(self) -> int:
        """Prompt rows of the live tasks (what a server's batch limit counts)."""
        return sum(len(t.rows) for t in self.live)

    def _next_mode(self) -> str | None:
        running = [t for t in self.tasks if not (t.done or t.cancelled)]
        return running[0].modes[running[0].step] if running else None

    def accepts(self, task: ImageTask) -> bool:
        """Whether ``task`` can join at the next step boundary (see the class docstring)."""
        if task.key != self.key or self._next_mode() == "cached":
            return False
        running = [t for t in [*self.tasks, *self.joining] if not (t.done or t.cancelled)]
        return all(t.modes[t.step :][: len(task.modes)] == task.modes[: len(t.modes) - t.step] for t in running)

    def join(self, task: ImageTask) -> None:
        self.joining.append(task)

    def step(self) -> list[ImageTask]:
        """One forward for every live task; returns the tasks that finished on it (their ``cells`` are final)."""
        with sampling_context(self.key[-1]):
            return self._step()

    def _step(self) -> list[ImageTask]:
        mode = self._next_mode()
        if mode is None or (mode != "cached" and (self.joining or any(t.done or t.cancelled for t in self.tasks))):
            self._rebuild()
            mode = self._next_mode()
        if mode is None:
            return []
        live = [not (t.done or t.cancelled) for t in self.tasks]
        bounds = [
            b for t, on in zip(self.tasks, live, strict=True) for b in (t.bounds[t.step] if on else [0] * len(t.rows))
        ]
        if self.run.reveal_step is not None:
            self.run.step_index = self._per_row(lambda t: t.keep_table.new_full((len(t.rows),), t.step))[:, None]
        keep = self._per_row(lambda t: t.keep_table[t.step] if not (t.done or t.cancelled) else None)
        self.run.step(bounds + [0] * self.padding, keep, self.cache, mode, self.recompute)
        finished = []
        for task, on in zip(self.tasks, live, strict=True):
            if on:
                task.step += 1
                if task.done:
                    finished.append(task)
        self._save_cells(finished)
        next_mode = self._next_mode()
        if next_mode == "cached":
            self.recompute = self.cache.recompute_positions(self.run.batch.real, self.widths, max(self.width_list))
        return finished

    def _per_row(self, values) -> torch.Tensor:
        """``values(task)`` (b,) of every task (None: zeros), and zeros for the padding, on the device: no copy from
        the host, so no step waits on one."""
        table = self.tasks[0].keep_table
        parts = [values(t) for t in self.tasks]
        parts = [p if p is not None else table.new_zeros(len(t.rows)) for p, t in zip(parts, self.tasks, strict=True)]
        if self.padding:
            parts.append(table.new_zeros(self.padding))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _save_cells(self, tasks: list[ImageTask]) -> None:
        start = 0
        for task in self.tasks:
            if task in tasks:
                task.cells = self.run.batch.cells[start : start + len(task.rows)].clone()
                if task.reveal_step is not None:
                    task.reveal_step = self.run.reveal_step[start : start + len(task.rows)].clone()
            start += len(task.rows)

    def _rebuild(self) -> None:
        """A new batch of the live tasks (a full forward follows, so no cached state carries over)."""
        if self.run is not None:
            self._save_cells([t for t in self.tasks if not (t.done or t.cancelled)])
        self.tasks, self.joining = self.live, []
        self.run, self.cache, self.recompute = None, MLCache(), None
        if not self.tasks:
            return
        rows = sum(len(t.rows) for t in self.tasks)
        self.padding = next((size for size in self.buckets if size >= rows), rows) - rows
        filler = [self.tasks[0]] * self.padding  # inert rows: bounds 0, no draws
        members = [(t, i) for t in self.tasks for i in range(len(t.rows))] + [(t, 0) for t in filler]
        device = next(self.model.parameters()).device
        if len(members) == len(self.tasks[0].rows):  # one task, unpadded: its own batch, already checked
            batch = self.tasks[0].batch
            batch.cells = self.tasks[0].cells.to(device)
        else:
            uncond = [[t.uncond[b][i] for t, i in members] for b in range(len(self.tasks[0].uncond))]
            batch = build_image_batch(
                [t.rows[i] for t, i in members], [t.starts[i] for t, i in members], uncond, self.tokens, device
            )
            batch.cells = torch.stack([t.cells[i] for t, i in members]).to(device)
        _, temperature, cfg_scale, cfg_img, editing, cache, record = self.key
        generators = [t.generators[i] for t, i in members[:rows]] + [None] * self.padding
        self.run = _Run(self.model, batch, self.tokens, _guidance(cfg_scale, cfg_img, editing), temperature, generators)
        if record:
            self.run.reveal_step = torch.cat([t.reveal_step[i : i + 1] for t, i in members]).to(device)
        self.width_list = recompute_widths(batch.lengths, 1 - cache[0]) if cache else [1]
        self.widths = torch.tensor(self.width_list, device=device)


def sample_image(model, prompt_ids: RowsLike, *, progress: bool = False, **settings) -> torch.Tensor | Rollout:
    """Sample the MASK cells of B image grids; returns every cell (B, N) as absolute ids, end-of-lines removed.

    ``settings``: `image_task`'s keywords (timesteps, guidance, ML-Cache, generator, record), where they are
    documented; the call is one such task run to its end in an `ImageGroup` of its own. ``progress`` shows a tqdm
    bar over the steps. With ``record=True`` it returns a `Rollout` (cells, their positions in the cond rows and
    the step that revealed each) for a policy log-likelihood.
    """
    task = image_task(model, prompt_ids, **settings)
    group = ImageGroup(model, task.key)
    group.join(task)
    with tqdm(total=len(task.modes), desc="image steps", disable=not progress) as bar:
        while not task.done:
            group.step()
            bar.update()
    if task.reveal_step is None:
        return task.cells.to(task.rows[0].device)
    batch, count = group.run.batch, len(task.rows)  # the task's own batch: a group of one is never rebuilt
    batch.write_cells()
    return Rollout(
        batch.cells, batch.cell_pos[:count], batch.seq[:count], batch.real[:count], task.reveal_step, len(task.modes)
    )
