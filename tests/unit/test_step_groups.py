"""Step-level sampling (`ImageGroup`, `TextGroup`, what `dimoo serve` runs): a task that joins a running group at a
step boundary, with its own step index and schedule, gives exactly what `sample_image` / `sample_text` give it
alone, greedy and seeded (its rows draw from their own generators). Fixture checkpoint, CPU."""

from __future__ import annotations

import pytest
import torch

from dimoo_npu.sampling import sample_image, sample_text
from dimoo_npu.sampling.image import ImageGroup, image_task
from dimoo_npu.sampling.text import TextGroup, text_task
from tests.unit.test_sampling_batch import LENGTHS, mmu_prompt, t2i_prompt, text

pytestmark = pytest.mark.usefixtures("one_thread")


def seeded(seed: int | None):
    return None if seed is None else [torch.Generator().manual_seed(seed)]


def run_image_group(model, jobs, buckets=()):
    """jobs: (join at group step, kwargs of image_task); returns each task's cells and the largest batch seen."""
    tasks = [None] * len(jobs)
    group, results, step, widest = None, {}, 0, 0
    while len(results) < len(jobs):
        for index, (at, kwargs) in enumerate(jobs):
            if at == step and tasks[index] is None:
                tasks[index] = image_task(model, **kwargs)
                group = group or ImageGroup(model, tasks[index].key, buckets)
                assert group.accepts(tasks[index])
                group.join(tasks[index])
        for task in group.step():
            results[tasks.index(task)] = task.cells[0]
        widest = max(widest, group.run.batch.cells.shape[0])
        step += 1
        assert step < 200
    return [results[i] for i in range(len(jobs))], widest


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_joining_tasks_equal_each_alone(tiny_model, tok, temperature):
    jobs = []
    for i, (n, m) in enumerate(LENGTHS):
        kwargs = dict(
            prompt_ids=[t2i_prompt(tok, text(n, i))],
            uncond_ids=[text(m, 10 + i)],
            timesteps=[8, 5, 6][i],  # own schedules, joining mid-way: rows leave at different steps
            temperature=temperature,
            cfg_scale=2.0,
            generator=seeded(100 + i),
        )
        jobs.append(([0, 2, 3][i], kwargs))
    grouped, widest = run_image_group(tiny_model, jobs)
    assert widest == 3, "the tasks ran in one batch"
    for (_, kwargs), cells in zip(jobs, grouped, strict=True):
        kwargs = {**kwargs, "generator": seeded(kwargs["generator"][0].initial_seed())}
        assert torch.equal(cells, sample_image(tiny_model, **kwargs)[0])


def test_cache_group_takes_joiners_only_where_schedules_align(tiny_model, tok):
    kwargs = dict(timesteps=8, temperature=0.0, cfg_scale=2.0, use_cache=True, warmup_ratio=0.25, refresh_interval=2)
    first = image_task(tiny_model, [t2i_prompt(tok, text(5, 0))], uncond_ids=[text(9, 1)], **kwargs)
    group = ImageGroup(tiny_model, first.key)
    group.join(first)
    late = image_task(tiny_model, [t2i_prompt(tok, text(7, 2))], uncond_ids=[text(4, 3)], **kwargs)
    assert group.accepts(late), "before the first step every schedule aligns"
    group.step()
    assert not group.accepts(late), "a joiner would need full steps where the group takes cached ones"
    cells = None
    while cells is None:
        cells = next((t.cells[0] for t in group.step() if t is first), None)
    alone = sample_image(tiny_model, [t2i_prompt(tok, text(5, 0))], uncond_ids=[text(9, 1)], **kwargs)
    assert torch.equal(cells, alone[0])


def test_cancelled_task_frees_its_rows_and_padding_to_buckets(tiny_model, tok):
    kwargs = dict(timesteps=6, temperature=0.0, cfg_scale=0.0)
    tasks = [image_task(tiny_model, [t2i_prompt(tok, text(5 + i, i))], **kwargs) for i in range(3)]
    group = ImageGroup(tiny_model, tasks[0].key, buckets=(4, 8))
    for task in tasks:
        group.join(task)
    group.step()
    assert group.run.batch.cells.shape[0] == 4, "3 rows padded to the bucket of 4"
    tasks[1].cancelled = True
    assert group.rows() == 2
    finished = []
    while len(finished) < 2:
        finished += group.step()
    assert tasks[1] not in finished and tasks[1] not in group.tasks
    alone = sample_image(tiny_model, [t2i_prompt(tok, text(7, 2))], **kwargs)
    assert torch.equal(tasks[2].cells[0], alone[0])


@pytest.mark.parametrize("temperature,cfg_scale", [(0.0, 0.0), (0.7, 1.5)])
def test_text_tasks_joining_equal_each_alone(tiny_model, tok, temperature, cfg_scale):
    prompts = [mmu_prompt(tok, n, i) for i, (n, _) in enumerate(LENGTHS)]
    settings = [dict(gen_length=12, block_length=4, steps=6), dict(gen_length=8, block_length=4, steps=4)] * 2
    made = [
        dict(prompt_ids=[p], temperature=temperature, cfg_scale=cfg_scale, **settings[i]) for i, p in enumerate(prompts)
    ]
    tasks = {}
    group = TextGroup(tiny_model, (4, temperature, cfg_scale, "none", None, False))
    step, done = 0, {}
    while len(done) < len(made):
        if step < len(made):  # one joins at each step
            tasks[step] = text_task(tiny_model, generator=torch.Generator().manual_seed(step), **made[step])
            group.join(tasks[step])
        for task in group.step():
            if task.finished:
                done[next(i for i, t in tasks.items() if t is task)] = task.x[0]
        step += 1
        assert step < 100
    for i, kwargs in enumerate(made):
        ids = kwargs.pop("prompt_ids")
        alone = sample_text(tiny_model, ids, generator=[torch.Generator().manual_seed(i)], **kwargs)[0]
        assert torch.equal(done[i], alone)


def stopped_at_eos(tok, n: int, seed: int) -> torch.Tensor:
    """An understanding prompt whose first answer block is given and holds EOS: the row stops after it."""
    row = mmu_prompt(tok, n, seed)
    answer = row.numel() - 13
    row[answer : answer + 4] = torch.tensor([11, tok["eos"], 12, 13])
    return row


@pytest.mark.parametrize("record", [False, True])
@pytest.mark.parametrize("threshold", [None, 0.02])
def test_text_task_of_several_rows_in_a_group_equals_its_call_alone(tiny_model, tok, threshold, record):
    """A task of padded rows, one frozen at EOS after its first block, keeps its rows in step while tasks join and
    leave around it (the batch rebuilt with its frozen row inert): the same tokens (and reveal steps) as
    `sample_text` on its rows alone."""
    kwargs = dict(block_length=4, temperature=0.7, parallel_threshold=threshold, record=record)
    calls = [
        dict(prompt_ids=[stopped_at_eos(tok, 5, 0), mmu_prompt(tok, 9, 1)], gen_length=12, steps=6, seeds=[1, 2]),
        dict(prompt_ids=[mmu_prompt(tok, 21, 2)], gen_length=8, steps=4, seeds=[3]),
        dict(prompt_ids=[mmu_prompt(tok, 34, 3), mmu_prompt(tok, 5, 4)], gen_length=12, steps=12, seeds=[4, 5]),
    ]

    def made(call):
        seeds = [torch.Generator().manual_seed(s) for s in call["seeds"]]
        return {**kwargs, **{k: v for k, v in call.items() if k != "seeds"}, "generator": seeds}

    tasks, step = [], 0
    group = None
    while len(tasks) < len(calls) or not all(t.finished for t in tasks):
        if step in (0, 2, 5) and len(tasks) < len(calls):  # the last joins after the first task froze its row 0
            tasks.append(text_task(tiny_model, **made(calls[len(tasks)])))
            group = group or TextGroup(tiny_model, tasks[0].key)
            group.join(tasks[-1])
        group.step()
        step += 1
        assert step < 100
    for task, call in zip(tasks, calls, strict=True):
        alone = sample_text(tiny_model, **made(call))
        if record:
            assert torch.equal(task.x, alone.sequence)
            assert torch.equal(task.reveal_step.gather(1, task.answer), alone.reveal_step)
        else:
            assert all(torch.equal(task.x[i, : row.numel()], row) for i, row in enumerate(alone))
    end = calls[0]["prompt_ids"][0].numel() - 1  # row 0's EOA
    assert (tasks[0].x[0, end - 8 : end] == tok["mask"]).all(), "the frozen row's later blocks stay MASK"
