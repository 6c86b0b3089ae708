"""Recorded rollouts (`sample_image` / `sample_text` with ``record=True``): same samples, a consistent trajectory,
tensors autograd can use, and the fused layout refused."""

from __future__ import annotations

import pytest
import torch

from dimoo_npu.model import fuse_projections
from dimoo_npu.sampling import sample_image, sample_text
from dimoo_npu.sampling.schedule import cosine_keep_masked
from dimoo_npu.utils.errors import InputError
from tests.unit.rl_support import GRID, image_prompts, image_rollout, tiny_policy
from tests.unit.train_support import tiny_special_tokens


def test_image_rollout_records_the_samples_and_their_reveal_steps():
    model = tiny_policy()
    steps = 4
    rollout = image_rollout(model, steps=steps, seed=3)
    generators = [torch.Generator().manual_seed(3 + i) for i in range(2)]
    plain = sample_image(model, image_prompts(), timesteps=steps, temperature=1.0, generator=generators)
    assert torch.equal(rollout.tokens, plain), "recording changes nothing that is sampled"
    assert not rollout.sequence.is_inference() and not rollout.tokens.is_inference()
    assert torch.equal(rollout.sequence.gather(1, rollout.positions), rollout.tokens)
    cells = GRID[0] * GRID[1]
    still_masked = [cells, *cosine_keep_masked(cells, steps)]
    for row in rollout.reveal_step:
        revealed = [int((row == s).sum()) for s in range(steps)]
        assert revealed == [still_masked[s] - still_masked[s + 1] for s in range(steps)]


def test_text_rollout_records_each_answer_position_once():
    model = tiny_policy()
    tokens = tiny_special_tokens()
    prompt = torch.cat([torch.arange(1, 6), torch.tensor([tokens["boa"]]), torch.full((6,), tokens["mask"])])
    prompt = torch.cat([prompt, torch.tensor([tokens["eoa"]])])
    rollout = sample_text(
        model, [prompt, prompt], gen_length=6, block_length=3, steps=4, temperature=1.0,
        generator=[torch.Generator().manual_seed(i) for i in range(2)], record=True,
    )  # fmt: skip
    plain = sample_text(
        model, [prompt, prompt], gen_length=6, block_length=3, steps=4, temperature=1.0,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
    )  # fmt: skip
    assert torch.equal(rollout.sequence, torch.stack(plain))
    assert rollout.tokens.shape == (2, 6) and rollout.steps == 4
    first, second = rollout.reveal_step[:, :3], rollout.reveal_step[:, 3:]
    assert ((first >= 0) & (first < 2)).all(), "block 1 is revealed on steps 0 and 1"
    for row in range(2):
        ended = bool((rollout.tokens[row, :3] == tokens["eos"]).any())  # then block 2 is never sampled
        if ended:
            assert (second[row] == -1).all()
        else:
            assert ((second[row] >= 2) & (second[row] < 4)).all()


def test_recording_refuses_the_fused_sampling_layout():
    model = fuse_projections(tiny_policy())
    with pytest.raises(InputError, match="unfused"):
        image_rollout(model)
