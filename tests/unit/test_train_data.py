"""The objective (cosine masking, condition drop), the shard format and the dp-sharded, resumable order."""

from __future__ import annotations

import math

import pytest
import torch

from dimoo_npu.modeling.losses import IGNORE_INDEX
from dimoo_npu.train.data import BatchSource, SampleOrder, rank_positions
from dimoo_npu.train.masking import Objective, collate, mask_answer, sample_generator, training_example
from dimoo_npu.train.shards import ShardDataset
from tests.unit.train_support import tiny_special_tokens, write_synthetic_shards

SPECIAL = tiny_special_tokens()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> ShardDataset:
    return ShardDataset(write_synthetic_shards(tmp_path_factory.mktemp("shards"), count=24, per_shard=10))


def test_shards_round_trip_through_the_memory_map(dataset):
    assert len(dataset) == 24 and len(dataset.shards) == 3
    sample = dataset[13]  # second shard, fourth sample
    assert sample.tokens.dtype == torch.long and sample.loss_mask.dtype == torch.bool
    image = [dataset[i] for i in range(24) if dataset[i].task != "mmu"][0]
    marked = image.tokens[image.loss_mask]
    assert bool((marked >= SPECIAL["image_offset"]).all()), "image answers mark codes only, never end-of-line"
    start, end = image.answer_span
    assert image.tokens[start - 1] == SPECIAL["boi"] and image.tokens[end] == SPECIAL["newline"]


def test_mask_count_follows_the_cosine_schedule_and_labels_only_masked_answer_tokens():
    tokens = torch.arange(100, 140)
    loss_mask = torch.zeros(40, dtype=torch.bool)
    loss_mask[10:30] = True
    for position in range(50):
        generator = sample_generator(7, position)
        r = float(torch.rand((), generator=sample_generator(7, position)))
        input_ids, labels = mask_answer(tokens, loss_mask, SPECIAL["mask"], generator)
        masked = input_ids == SPECIAL["mask"]
        assert int(masked.sum()) == max(1, int(20 * math.cos(math.pi / 2 * r)))
        assert not masked[~loss_mask].any(), "only answer tokens are masked"
        assert torch.equal(labels[masked], tokens[masked]) and bool((labels[~masked] == IGNORE_INDEX).all())
        assert torch.equal(input_ids[~masked], tokens[~masked])


def test_at_least_one_token_is_masked_even_at_ratio_zero():
    tokens, loss_mask = torch.arange(5), torch.tensor([False, True, True, False, False])
    counts = {
        int(mask_answer(tokens, loss_mask, 99, sample_generator(0, p))[1].ne(IGNORE_INDEX).sum()) for p in range(200)
    }
    assert counts == {1}  # int(2 * cos(pi/2 r)) is 0 or 1 for r > 0: the floor of one keeps every sample useful


def test_condition_drop_replaces_the_user_text_by_uncondition_at_the_configured_rate(dataset):
    image_samples = [dataset[i] for i in range(len(dataset)) if dataset[i].task != "mmu"]
    objective = Objective.from_special_tokens(SPECIAL, cond_drop_prob=0.5)
    dropped = 0
    for position in range(400):
        sample = image_samples[position % len(image_samples)]
        input_ids, labels = training_example(sample, objective, sample_generator(3, position))
        start, end = sample.drop_span
        if len(input_ids) != len(sample):
            dropped += 1
            assert len(input_ids) == len(sample) - (end - start) + 1
            assert input_ids[start] == SPECIAL["uncondition"] and labels[start] == IGNORE_INDEX
            assert torch.equal(input_ids[:start], sample.tokens[:start])
    assert 160 < dropped < 240  # 400 draws at p = 0.5
    never = Objective.from_special_tokens(SPECIAL, cond_drop_prob=0.0)
    assert all(
        len(training_example(s, never, sample_generator(0, i))[0]) == len(s) for i, s in enumerate(image_samples)
    )


def test_understanding_samples_are_never_dropped(dataset):
    always = Objective.from_special_tokens(SPECIAL, cond_drop_prob=1.0)
    mmu = [dataset[i] for i in range(len(dataset)) if dataset[i].task == "mmu"]
    assert mmu and all(len(training_example(s, always, sample_generator(0, 0))[0]) == len(s) for s in mmu)


def test_collate_pads_right_with_masked_labels():
    examples = [(torch.tensor([1, 2, 3]), torch.tensor([-100, 2, -100])), (torch.tensor([4]), torch.tensor([4]))]
    input_ids, labels, attention = collate(examples, pad_id=9, length=4)
    assert input_ids.tolist() == [[1, 2, 3, 9], [4, 9, 9, 9]]
    assert labels.tolist() == [[-100, 2, -100, -100], [4, -100, -100, -100]]
    assert attention.sum(1).tolist() == [3, 1]
    with pytest.raises(ValueError, match="does not fit data.seq_length 2"):
        collate(examples, pad_id=9, length=2)


def test_sample_order_visits_every_sample_once_per_epoch_and_reshuffles():
    order = SampleOrder(10, seed=5)
    first, second = [order(p) for p in range(10)], [order(p) for p in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert [SampleOrder(10, seed=5)(p) for p in range(15, 20)] == second[5:], "any position is reachable directly"


def test_dp_ranks_split_each_global_batch_and_batches_do_not_depend_on_the_layout(dataset):
    objective = Objective.from_special_tokens(SPECIAL, cond_drop_prob=0.1)
    source = BatchSource(dataset, objective, seed=11, pad_id=SPECIAL["eos"], seq_length=64)
    whole = source.batch(consumed=8, global_batch=4)
    halves = [source.batch(consumed=8, global_batch=4, dp_rank=r, dp_size=2) for r in range(2)]
    assert list(rank_positions(8, 4, 1, 2)) == [10, 11]
    assert torch.equal(torch.cat([h.input_ids for h in halves]), whole.input_ids)
    assert torch.equal(torch.cat([h.labels for h in halves]), whole.labels)
    again = BatchSource(dataset, objective, seed=11, pad_id=SPECIAL["eos"], seq_length=64).batch(8, 4)
    assert torch.equal(again.labels, whole.labels), "a resumed run rebuilds the same batch from the position"


def test_length_grouping_keeps_each_epoch_a_permutation_and_cuts_padding():
    lengths = [90 if i % 3 else 190 for i in range(1000)]
    plain, grouped = SampleOrder(1000, seed=3), SampleOrder(1000, seed=3, lengths=lengths, group=32)
    for epoch in range(3):
        visited = [grouped(p) for p in range(epoch * 1000, (epoch + 1) * 1000)]
        assert sorted(visited) == list(range(1000)), "every sample once per epoch"

    def padded_tokens(order: SampleOrder) -> int:
        steps = range(0, 3000 - 32, 32)  # batch starts, crossing epoch boundaries (1000 is not a multiple of 32)
        return sum(32 * max(lengths[order(p)] for p in range(start, start + 32)) for start in steps)

    assert padded_tokens(grouped) < 0.8 * padded_tokens(plain)
    again = SampleOrder(1000, seed=3, lengths=lengths, group=32)
    assert [again(p) for p in range(1500, 1600)] == [grouped(p) for p in range(1500, 1600)], "resumable"


def test_every_grouped_batch_is_one_run_of_sorted_lengths_across_epochs():
    lengths = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()  # all different
    order = SampleOrder(1000, seed=1, lengths=lengths, group=32)
    # epoch 1 begins inside the batch at 992 (1000 = 31 x 32 + 8); every later batch starts on a multiple of 32
    for first, last, starts in ((0, 1000, range(0, 992, 32)), (1024, 2000, range(1024, 1984, 32))):
        ranked = sorted(lengths[order(p)] for p in range(first, last))  # the epoch's grouped part, in length order
        for start in starts:
            batch = sorted(lengths[order(p)] for p in range(start, start + 32))
            at = ranked.index(batch[0])
            assert batch == ranked[at : at + 32], "each batch holds neighbours in length order, never pieces of two"


def test_batch_source_groups_by_the_shard_lengths(dataset):
    objective = Objective.from_special_tokens(SPECIAL, cond_drop_prob=0.1)
    source = BatchSource(dataset, objective, seed=11, pad_id=SPECIAL["eos"], group_by_length=4)
    assert dataset.lengths() == [len(dataset[i].tokens) for i in range(len(dataset))]
    lengths = dataset.lengths()
    spreads = [max(g) - min(g) for g in ([lengths[source.order(p)] for p in range(s, s + 4)] for s in (0, 4, 8))]
    plain = BatchSource(dataset, objective, seed=11, pad_id=SPECIAL["eos"])
    plain_spreads = [max(g) - min(g) for g in ([lengths[plain.order(p)] for p in range(s, s + 4)] for s in (0, 4, 8))]
    assert sum(spreads) < sum(plain_spreads)
