"""Step math, schedules and the ML-Cache object, on small hand-made tensors."""

from __future__ import annotations

import torch

from dimoo_npu.sampling import MLCache, refresh_steps
from dimoo_npu.sampling.schedule import keep_masked_table, masked_upper_bounds, recompute_widths
from dimoo_npu.sampling.step import draw_uniform, reveal, sample_codes, stay_masked


def test_stay_masked_keeps_below_the_kth_score_and_fixes_at_least_one():
    score = torch.tensor([[0.5, -1.0, -3.0, 2.0, 9.0], [1.0, 2.0, 0.0, 0.0, 0.0]])
    live = torch.tensor([[True, True, True, True, False], [True, True, False, False, False]])
    stay = stay_masked(score, live, torch.tensor([2, 5]))
    # row 0: live scores sorted -3, -1, 0.5, 2 -> cutoff index 2 = 0.5: strictly below stay masked
    assert stay[0].tolist() == [False, True, True, False, False]
    # row 1: keep 5 > M - 1 = 1 -> cutoff = 2nd smallest live score (2.0): only the 1.0 slot stays masked
    assert stay[1].tolist() == [True, False, False, False, False]


def test_stay_masked_ties_fix_more_and_a_single_live_slot_is_fixed():
    score = torch.tensor([[0.0, 0.0, 0.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    live = torch.tensor([[True, True, True, True], [True, False, False, False]])
    stay = stay_masked(score, live, torch.tensor([2, 1]))
    assert stay[0].tolist() == [False, False, False, True]
    assert not stay[1].any()


def test_sample_codes_greedy_score_is_log_softmax_of_the_argmax():
    logits = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    sampled, score = sample_codes(logits, 0.0, [None, None], [3, 3])
    assert torch.equal(sampled, logits.argmax(-1))
    expected = torch.log_softmax(logits, -1).gather(-1, sampled[..., None])[..., 0]
    assert torch.allclose(score, expected, atol=1e-6)


def test_draw_uniform_uses_each_rows_generator_and_count():
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    noise = draw_uniform(gens, [2, 1], 4, 3, torch.device("cpu"))
    assert torch.equal(noise[0, :2], torch.rand((2, 4), generator=torch.Generator().manual_seed(1)))
    assert torch.equal(noise[1, :1], torch.rand((1, 4), generator=torch.Generator().manual_seed(2)))
    assert (noise[1, 1:] == 0.5).all()


def test_reveal_picks_the_most_confident_per_row():
    conf = torch.tensor([[0.1, 0.9, float("-inf"), 0.5], [0.3, float("-inf"), float("-inf"), 0.2]])
    chosen = reveal(conf, torch.tensor([2, 3]))
    assert chosen[0].tolist() == [False, True, False, True]
    assert chosen[1].tolist() == [True, False, False, True], "never a -inf slot"


def test_masked_upper_bounds_follow_the_schedule():
    keep = keep_masked_table([12, 3], 6)
    assert keep == [[11, 2], [10, 2], [8, 2], [5, 1], [3, 1], [0, 0]]
    # a step leaves at most min(keep, M - 1) masked: row 1 (3 cells) is done after three steps
    assert masked_upper_bounds([12, 3], keep) == [[12, 3], [11, 2], [10, 1], [8, 0], [5, 0], [3, 0]]


def test_refresh_steps_defaults_give_28_full_of_64():
    steps = refresh_steps(64, True, 0.3, 5)
    assert steps.count(True) == 28 and steps[:20] == [True] * 20 and steps[20:25] == [False] * 4 + [True]
    assert all(refresh_steps(10, False, 0.3, 5))


def test_cache_update_stores_then_scatters_rows():
    cache = MLCache()
    k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    assert cache.update(0, k, v, None)[0] is k
    cache.begin_step(full=False)
    positions = torch.tensor([[4, 1], [0, 0]])  # row 1 repeats its own index (padding)
    new_k, new_v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    new_k[1, :, 1], new_v[1, :, 1] = new_k[1, :, 0], new_v[1, :, 0]
    full_k, full_v = cache.update(0, new_k, new_v, positions)
    assert full_k.shape == (2, 3, 5, 4)
    assert torch.equal(full_k[0, :, 4], new_k[0, :, 0]) and torch.equal(full_k[0, :, 1], new_k[0, :, 1])
    assert torch.equal(full_v[1, :, 0], new_v[1, :, 0]) and torch.equal(full_k[0, :, 0], k[0, :, 0])


def test_cache_full_step_ignores_positions():
    """The model hands its rotary positions on full forwards too; a full step stores K/V as they are."""
    cache = MLCache()
    cache.begin_step(full=True)
    k = torch.randn(1, 2, 4, 2)
    assert cache.update(3, k, k, torch.tensor([[0, 1, 1, 1]]))[0] is k


def test_recompute_positions_quantile_per_row_over_real_positions():
    gen = torch.Generator().manual_seed(0)
    lengths = [40, 25, 33]
    cache = MLCache()
    cache.store_logits(torch.randn(3, 40, 6, generator=gen))
    real = torch.arange(40) < torch.tensor(lengths)[:, None]
    widths = recompute_widths(lengths, 0.1)
    positions = cache.recompute_positions(real, torch.tensor(widths), max(widths))
    for row, length in enumerate(lengths):
        conf = cache.max_logit[row, :length]
        expected = (conf <= torch.quantile(conf, 0.1)).nonzero()[:, 0]
        got = positions[row].unique()
        assert torch.equal(got, expected)
        assert (positions[row, expected.numel() :] == expected[0]).all(), "padding repeats the row's own index"


def test_merge_logits_updates_values_and_max():
    cache = MLCache()
    cache.store_logits(torch.zeros(2, 5, 3))
    fresh = torch.tensor([[[1.0, 4.0, 2.0]], [[-1.0, -2.0, -3.0]]])
    cache.merge_logits(torch.tensor([[2], [4]]), fresh)
    assert cache.max_logit.tolist() == [[0, 0, 4.0, 0, 0], [0, 0, 0, 0, -1.0]]
    assert torch.equal(cache.logits_at(torch.tensor([[2], [4]])), fresh)
