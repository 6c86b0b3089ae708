"""Understanding with K/V caches (``kv_cache="prefix"|"dual"``) and confidence-threshold decoding.

Exact mode is the goldens' algorithm; a cache refreshed at every step gives its tokens; a cached step against an
unchanged state gives the full forward's logits; batches equal their rows alone; frozen rows stay frozen.
"""

from __future__ import annotations

import pytest
import torch

import dimoo_npu
from dimoo_npu.numerics.compare import compare_layer
from dimoo_npu.numerics.tolerances import tolerance
from dimoo_npu.ops import resolve_ops
from dimoo_npu.sampling import sample_text
from dimoo_npu.sampling import text as text_sampling
from dimoo_npu.sampling.text import TextGroup, text_task
from dimoo_npu.utils.errors import InputError
from tests.unit.test_sampling_batch import LENGTHS, mmu_prompt

CACHED = ["prefix", "dual"]
GOLDEN_CASES = ["mmu", "mmu_cfg"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _settings(case: dict) -> dict:
    names = ("gen_length", "block_length", "steps", "temperature", "cfg_scale")
    return {name: case[name] for name in names}


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_exact_mode_named_keeps_the_golden_tokens(tiny_model, golden, cases, name):
    out = sample_text(
        tiny_model,
        golden[f"{name}.prompt"],
        kv_cache="none",
        parallel_threshold=None,
        **_settings(cases["cases"][name]),
    )
    assert torch.equal(out, golden[f"{name}.output"])


@pytest.mark.parametrize("kv_cache", CACHED)
@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_cache_refreshed_at_every_step_gives_the_golden_tokens(tiny_model, golden, cases, monkeypatch, kv_cache, name):
    """Every step a full forward that stores K/V: only the head's slots and the float32 confidence differ."""
    monkeypatch.setattr(text_sampling, "step_kinds", lambda mode, per_block: ["store"] * per_block)
    out = sample_text(tiny_model, golden[f"{name}.prompt"], kv_cache=kv_cache, **_settings(cases["cases"][name]))
    assert torch.equal(out, golden[f"{name}.output"])


def _run(model, prompts, kv_cache: str, cfg_scale: float):
    rows = [p.clone() for p in prompts]
    x, real, answer, _, starts = text_sampling._prepare(model, rows, None, 12, 4)
    run = text_sampling._TextRun(model, x, real, cfg_scale, 0.0, [None] * len(rows), None, kv_cache)
    run.first_block_start = min(starts) + 4
    positions = answer[:, 4:8]
    slots = torch.tensor([[0, 2, 3], [1, 2, 3]])  # the head for some block positions only
    return run, positions, slots


@pytest.mark.parametrize("ops", ["reference", "npu"])
@pytest.mark.parametrize("kv_cache", CACHED)
def test_cached_step_gives_the_full_forward_logits(tok, kv_cache, ops, request):
    """Padded rows of two lengths, CFG: a cached step against its own state is the full forward (fp32 tolerance)."""
    if ops == "npu":
        request.getfixturevalue("fake_torch_npu")
    model = dimoo_npu.load_model(request.getfixturevalue("checkpoint_dir"), ops=resolve_ops("cpu", ops))
    run, positions, slots = _run(model, [mmu_prompt(tok, 5, 0), mmu_prompt(tok, 9, 1)], kv_cache, 1.5)
    full = run.logits(positions, slots, "store")
    cached = run.logits(positions, slots, "cached")
    diff = compare_layer("logits", full, cached, tolerance("layer", torch.float32))
    assert diff.passed, diff
    assert cached.shape == (2, 3, model.config.embedding_size)


def test_dual_cached_step_reuses_the_later_blocks(tiny_model, tok):
    """A token changed after the store, outside the block, is not seen by a dual step (its stale K/V are kept),
    and is by a prefix step (it recomputes the block and everything after it)."""
    stale = {}
    for kv_cache in CACHED:
        run, positions, slots = _run(tiny_model, [mmu_prompt(tok, 5, 0), mmu_prompt(tok, 9, 1)], kv_cache, 0.0)
        stored = run.logits(positions, slots, "store")
        later = positions[:, -1:] + 2  # a position of the next block
        run.x.scatter_(1, later, 7)
        stale[kv_cache] = torch.equal(stored, run.logits(positions, slots, "cached"))
    assert stale == {"dual": True, "prefix": False}


@pytest.mark.parametrize("threshold", [None, 0.02])
@pytest.mark.parametrize("kv_cache", ["none", *CACHED])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_batch_equals_each_row_alone(tiny_model, tok, kv_cache, threshold, cfg_scale):
    prompts = [mmu_prompt(tok, n, i) for i, (n, _) in enumerate(LENGTHS)]
    kwargs = dict(gen_length=12, block_length=4, steps=6, cfg_scale=cfg_scale)
    kwargs.update(kv_cache=kv_cache, parallel_threshold=threshold)
    batched = sample_text(tiny_model, prompts, **kwargs)
    for row, prompt in zip(batched, prompts, strict=True):
        assert torch.equal(row, sample_text(tiny_model, [prompt], **kwargs)[0])
        assert not (row == tok["mask"]).any()


def test_seeded_rows_do_not_depend_on_their_batch_in_cached_mode(tiny_model, tok):
    """Temperature > 0: the noise is drawn for the whole block, whatever width the head gets."""
    prompts = [mmu_prompt(tok, n, i) for i, (n, _) in enumerate(LENGTHS)]
    kwargs = dict(gen_length=12, block_length=4, steps=6, temperature=0.8, kv_cache="dual")
    seeded = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batched = sample_text(tiny_model, prompts, generator=seeded, **kwargs)
    alone = sample_text(tiny_model, prompts[2:], generator=[torch.Generator().manual_seed(3)], **kwargs)
    assert torch.equal(batched[2], alone[0])


@pytest.mark.parametrize("threshold", [None, 0.02])
@pytest.mark.parametrize("kv_cache", ["none", *CACHED])
def test_rows_stopped_at_eos_stay_stopped(tiny_model, tok, kv_cache, threshold):
    """Row 0's first block is given and holds EOS: its later blocks stay MASK while row 1 is answered."""
    stopped = mmu_prompt(tok, 5, 0)
    answer = stopped.numel() - 13
    stopped[answer : answer + 4] = torch.tensor([11, tok["eos"], 12, 13])
    kwargs = dict(gen_length=12, block_length=4, steps=6, kv_cache=kv_cache, parallel_threshold=threshold)
    out = sample_text(tiny_model, [stopped, mmu_prompt(tok, 9, 1)], **kwargs)
    assert (out[0][answer + 4 : answer + 12] == tok["mask"]).all()
    assert not (out[1] == tok["mask"]).any()


def _forwards(model, monkeypatch) -> list[int]:
    calls = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    return calls


@pytest.mark.parametrize("kv_cache", ["none", "dual"])
def test_threshold_never_runs_more_forwards_and_ends_revealed_blocks(tiny_model, tok, monkeypatch, kv_cache):
    calls = _forwards(tiny_model, monkeypatch)
    prompts = [mmu_prompt(tok, 5, 0), mmu_prompt(tok, 9, 1)]
    kwargs = dict(gen_length=12, block_length=4, steps=12, kv_cache=kv_cache)
    for threshold, most in ((1.0, 12), (1e-9, 3)):  # any confidence passes 1e-9: each block in one step
        calls.clear()
        out = sample_text(tiny_model, prompts, parallel_threshold=threshold, **kwargs)
        assert len(calls) <= most and not (out[1] == tok["mask"]).any(), (threshold, len(calls))
    assert len(calls) == 3


@pytest.mark.parametrize("kv_cache", CACHED)
def test_group_tasks_started_together_equal_each_alone(tiny_model, tok, kv_cache):
    """`dimoo serve`'s step-level group with a cache: tasks starting together keep their blocks in step."""
    prompts = [mmu_prompt(tok, 5, 0), mmu_prompt(tok, 9, 1)]
    kwargs = dict(gen_length=12, block_length=4, steps=6, cfg_scale=1.5, kv_cache=kv_cache)
    tasks = [text_task(tiny_model, [prompt], **kwargs) for prompt in prompts]
    group = TextGroup(tiny_model, tasks[0].key)
    for task in tasks:
        group.join(task)
    for _ in range(6):
        group.step()
    assert all(task.finished for task in tasks)
    for task, prompt in zip(tasks, prompts, strict=True):
        assert torch.equal(task.x[0], sample_text(tiny_model, [prompt], **kwargs)[0])


def test_group_task_joining_mid_block_forces_a_refresh(tiny_model, tok, monkeypatch):
    """A task joining a cached group mid-block: the next step is a full (store) step for every row; all finish."""
    kinds = []
    step = text_sampling._TextRun.step
    monkeypatch.setattr(text_sampling._TextRun, "step", lambda self, *a: kinds.append(a[2]) or step(self, *a))
    kwargs = dict(gen_length=12, block_length=4, steps=12, kv_cache="dual", parallel_threshold=0.5)
    tasks = [text_task(tiny_model, [mmu_prompt(tok, 5 + 4 * i, i)], **kwargs) for i in range(2)]
    group = TextGroup(tiny_model, tasks[0].key)
    group.join(tasks[0])
    group.step()
    group.step()
    group.join(tasks[1])
    for _ in range(30):
        group.step()
    assert kinds[:3] == ["store", "cached", "store"], kinds
    assert all(task.finished for task in tasks)
    assert not any((task.x == tok["mask"]).any() for task in tasks)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(kv_cache="full"), "kv_cache='full' is not a cache mode: use one of none, prefix, dual"),
        (dict(parallel_threshold=0.0), r"parallel_threshold=0.0 must be within \(0, 1\]"),
        (dict(parallel_threshold=1.5), r"parallel_threshold=1.5 must be within \(0, 1\]"),
        (dict(parallel_threshold=float("nan")), r"parallel_threshold=nan must be within \(0, 1\]"),
    ],
)
def test_bad_cache_settings_are_refused_naming_value_and_choices(tiny_model, tok, settings, message):
    with pytest.raises(InputError, match=message):
        sample_text(tiny_model, [mmu_prompt(tok, 5, 0)], gen_length=12, block_length=4, steps=6, **settings)


def test_graph_mode_compiles_one_graph_per_kind_of_step(fake_torch_npu, golden, cases):
    """Dual cache under fullgraph compile (the fake torchair backend): a store and a cached graph for every block
    of every step, static shapes; the tokens are eager's."""
    import importlib

    from dimoo_npu.adapters import NpuBackend
    from dimoo_npu.model import fuse_projections
    from dimoo_npu.sampling import graph
    from tests.conftest import CHECKPOINT

    case, prompt = cases["cases"]["mmu_cfg"], golden["mmu_cfg.prompt"]
    settings = dict(_settings(case), kv_cache="dual", parallel_threshold=0.5)
    eager = sample_text(fuse_projections(dimoo_npu.load_model(CHECKPOINT)), prompt, **settings)
    torch._dynamo.reset()
    torchair = importlib.import_module("torchair")
    torchair.GRAPHS.clear()
    model = fuse_projections(dimoo_npu.load_model(CHECKPOINT))
    graph.compile_forward(model, backend=NpuBackend().compile_backend())
    assert torch.equal(sample_text(model, prompt, **settings), eager)
    assert len(torchair.GRAPHS) == 2, f"{len(torchair.GRAPHS)} graphs for {case['steps']} steps"
    torch._dynamo.reset()
