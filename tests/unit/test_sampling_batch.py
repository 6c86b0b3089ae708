"""Batching of the samplers: a batch gives what each prompt gives alone (greedy), and with per-sample
generators a seeded sample does not depend on its batch. Uses the fixture checkpoint (real vocabulary)."""

from __future__ import annotations

import pytest
import torch

from dimoo_npu.sampling import sample_image, sample_text

pytestmark = pytest.mark.usefixtures("one_thread")


def ids(*parts) -> torch.Tensor:
    return torch.cat([torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in parts])


def text(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 120000, (length,), generator=torch.Generator().manual_seed(seed))


def grid(tok, h: int, w: int, known: torch.Tensor | None = None) -> torch.Tensor:
    """h rows of w cells + end-of-line; cells MASK unless ``known`` (h, w) gives a code (>= 0)."""
    cells = torch.full((h, w), tok["mask"])
    if known is not None:
        cells = torch.where(known >= 0, known + tok["image_offset"], cells)
    newline = torch.full((h, 1), tok["newline"])
    return torch.cat([cells, newline], dim=1).reshape(-1)


def t2i_prompt(tok, text_ids, h=4, w=7, known=None) -> torch.Tensor:
    return ids(text_ids, [tok["boa"], tok["boi"]], grid(tok, h, w, known), [tok["eoi"], tok["eoa"]])


def source_image(tok, seed: int, h=3, w=3) -> torch.Tensor:
    codes = torch.randint(0, tok["codebook_size"], (h, w), generator=torch.Generator().manual_seed(seed))
    return ids([tok["boi"]], grid(tok, h, w, codes), [tok["eoi"]])


LENGTHS = [(5, 9), (21, 3), (34, 15)]  # (prompt text, uncond prefix): every row padded differently


@pytest.mark.parametrize(
    "settings",
    [
        dict(cfg_scale=0.0),
        dict(cfg_scale=3.0),
        dict(cfg_scale=3.0, use_cache=True),
        dict(cfg_scale=2.0, use_cache=True, cache_ratio=0.5, warmup_ratio=0.1, refresh_interval=3),
    ],
    ids=["nocfg", "cfg", "cfg_cache", "cfg_cache_often"],
)
def test_t2i_batch_equals_each_alone(tiny_model, tok, settings):
    prompts = [t2i_prompt(tok, text(n, i)) for i, (n, _) in enumerate(LENGTHS)]
    uncond = [text(n, 10 + i) for i, (_, n) in enumerate(LENGTHS)]
    kwargs = dict(timesteps=10, temperature=0.0, **settings)
    batched = sample_image(tiny_model, prompts, uncond_ids=uncond, **kwargs)
    alone = [sample_image(tiny_model, [p], uncond_ids=[u], **kwargs)[0] for p, u in zip(prompts, uncond, strict=True)]
    assert batched.shape == (3, 28)
    assert torch.equal(batched, torch.stack(alone))


def test_inpaint_batch_with_different_masked_counts(tiny_model, tok):
    gen = torch.Generator().manual_seed(3)
    prompts = []
    for i, (n, _) in enumerate(LENGTHS):
        known = torch.randint(0, tok["codebook_size"], (4, 7), generator=gen)
        known[torch.rand(4, 7, generator=gen) < 0.3 + 0.2 * i] = -1  # -1: to sample
        prompts.append(t2i_prompt(tok, text(n, i), known=known))
    uncond = [text(n, 10 + i) for i, (_, n) in enumerate(LENGTHS)]
    kwargs = dict(timesteps=6, temperature=0.0, cfg_scale=2.0)
    batched = sample_image(tiny_model, prompts, uncond_ids=uncond, **kwargs)
    for row, prompt, u in zip(batched, prompts, uncond, strict=True):
        assert torch.equal(row, sample_image(tiny_model, [prompt], uncond_ids=[u], **kwargs)[0])
    cells = torch.stack([p[len(p) - 2 - 32 : len(p) - 2] for p in prompts])  # the grid with end-of-lines
    cells = cells[cells != tok["newline"]].view(3, 28)
    fixed = cells != tok["mask"]
    assert torch.equal(batched[fixed], cells[fixed]), "given cells are kept"


@pytest.mark.parametrize("use_cache", [False, True])
def test_editing_batch_equals_each_alone(tiny_model, tok, use_cache):
    prompts, uncond_text, uncond_image = [], [], []
    for i, (n, m) in enumerate(LENGTHS):
        question, source = text(n, i), source_image(tok, i)
        instruction = ids(question[:-1], source, question[-1:])
        prompts.append(t2i_prompt(tok, instruction, h=4, w=4))
        uncond_text.append(ids(text(m, 20 + i), source, [7]))
        uncond_image.append(question)
    kwargs = dict(timesteps=10, temperature=0.0, cfg_scale=2.5, cfg_img=1.5, use_cache=use_cache)
    batched = sample_image(tiny_model, prompts, uncond_ids=uncond_text, uncond_image_ids=uncond_image, **kwargs)
    for row, p, ut, ui in zip(batched, prompts, uncond_text, uncond_image, strict=True):
        assert torch.equal(row, sample_image(tiny_model, [p], uncond_ids=[ut], uncond_image_ids=[ui], **kwargs)[0])


def mmu_prompt(tok, n: int, seed: int, answer: int = 12) -> torch.Tensor:
    question = text(n, seed)
    return ids(
        question[:-1], source_image(tok, seed), question[-1:], [tok["boa"]], [tok["mask"]] * answer, [tok["eoa"]]
    )


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_understanding_batch_equals_each_alone(tiny_model, tok, cfg_scale):
    prompts = [mmu_prompt(tok, n, i) for i, (n, _) in enumerate(LENGTHS)]
    kwargs = dict(gen_length=12, block_length=4, steps=6, cfg_scale=cfg_scale)
    batched = sample_text(tiny_model, prompts, **kwargs)
    assert [len(row) for row in batched] == [len(p) for p in prompts]
    for row, prompt in zip(batched, prompts, strict=True):
        assert torch.equal(row, sample_text(tiny_model, [prompt], **kwargs)[0])
        assert torch.equal(row[: len(prompt) - 13], prompt[: len(prompt) - 13]), "the prompt is kept"
        assert not (row == tok["mask"]).any()


def seeded(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("use_cache", [False, True])
def test_seeded_image_sample_does_not_depend_on_its_batch(tiny_model, tok, use_cache):
    prompts = [t2i_prompt(tok, text(n, i)) for i, (n, _) in enumerate(LENGTHS)]
    uncond = [text(n, 10 + i) for i, (_, n) in enumerate(LENGTHS)]
    kwargs = dict(timesteps=10, temperature=1.0, cfg_scale=3.0, use_cache=use_cache)
    batched = sample_image(tiny_model, prompts, uncond_ids=uncond, generator=seeded([1, 2, 3]), **kwargs)
    pair = sample_image(tiny_model, prompts[1:], uncond_ids=uncond[1:], generator=seeded([2, 3]), **kwargs)
    alone = sample_image(tiny_model, prompts[2:], uncond_ids=uncond[2:], generator=seeded([3]), **kwargs)
    assert torch.equal(batched[1:], pair) and torch.equal(batched[2:], alone)
    other_seed = sample_image(tiny_model, prompts[2:], uncond_ids=uncond[2:], generator=seeded([4]), **kwargs)
    assert not torch.equal(alone, other_seed), "temperature 1 must depend on the seed"


def test_seeded_text_sample_does_not_depend_on_its_batch(tiny_model, tok):
    prompts = [mmu_prompt(tok, n, i) for i, (n, _) in enumerate(LENGTHS)]
    kwargs = dict(gen_length=12, block_length=4, steps=6, cfg_scale=1.0, temperature=0.8)
    batched = sample_text(tiny_model, prompts, generator=seeded([1, 2, 3]), **kwargs)
    alone = sample_text(tiny_model, prompts[2:], generator=seeded([3]), **kwargs)
    assert torch.equal(batched[2], alone[0])
    other_seed = sample_text(tiny_model, prompts[2:], generator=seeded([4]), **kwargs)
    assert not torch.equal(alone[0], other_seed[0])


def test_one_generator_for_all_rows_is_reproducible(tiny_model, tok):
    prompts = torch.stack([t2i_prompt(tok, text(8, i)) for i in range(2)])
    kwargs = dict(timesteps=5, temperature=1.0)
    first = sample_image(tiny_model, prompts, generator=torch.Generator().manual_seed(5), **kwargs)
    again = sample_image(tiny_model, prompts, generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(first, again) and first.shape == (2, 28)
    assert ((first >= tok["image_offset"]) & (first < tok["image_offset"] + tok["codebook_size"])).all()
