"""Self-GRPO through `dimoo train`: rollouts from the policy, rewards from its own answers, GRPO updates.

One step: take ``global_batch_size / num_generations`` prompts of the reward spec, sample ``num_generations``
images of each with `sample_image(record=True)` at ``rl.temperature``, decode them, score them (self-reward or
``rl.reward_function``), normalise the rewards within each group, and make ``num_iterations`` optimizer updates
of the GRPO loss (`dimoo_npu.rl.objective`) on the recorded rollouts. Every random draw (prompt order, sampling
noise, the likelihood's hidden tokens) comes from a generator seeded by (run seed, step, row), and the reference
is the run's starting weights rebuilt, so a resumed run repeats the uninterrupted one. Checkpoints, the run lock,
resume and metrics are the supervised trainer's (`dimoo_npu.train.trainer.Trainer`).
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dimoo_npu.errors import ConfigError
from dimoo_npu.generation_settings import check_image_settings, check_text_settings
from dimoo_npu.image_tokenizer import ImageTokenizer
from dimoo_npu.lengths import LengthLimit
from dimoo_npu.requests import PIXELS_PER_CELL
from dimoo_npu.rl.likelihood import TokenScores, sampled_timestep_mask, sampled_timestep_scores, trajectory_scores
from dimoo_npu.rl.objective import group_advantages, grpo_loss
from dimoo_npu.rl.reward import (
    SHAPES_SPEC,
    RewardError,
    RewardItem,
    checked_rewards,
    load_reward_function,
    load_spec,
    self_reward,
    shapes_spec,
)
from dimoo_npu.sampling import sample_image, sample_text
from dimoo_npu.sampling.record import Rollout
from dimoo_npu.shapes import world
from dimoo_npu.shapes.evaluate import normalise_answer
from dimoo_npu.tasks import PromptEncoder, text_to_image, understand
from dimoo_npu.text_tokenizer import load_text_tokenizer
from dimoo_npu.train.config import TrainConfig
from dimoo_npu.train.masking import sample_generator
from dimoo_npu.train.schedule import learning_rate
from dimoo_npu.train.trainer import DistEnv, Trainer


def check_rl_layout(config: TrainConfig, world_size: int) -> None:
    """Self-GRPO runs in one process or as FSDP2 data parallel (every rank samples and scores whole groups of its own
    prompts); tensor and pipeline parallelism, and DDP, are refused before anything is built."""
    g, groups = config.gpt_args, config.gpt_args.global_batch_size // config.rl.num_generations
    if g.tensor_model_parallel_size > 1 or g.pipeline_model_parallel_size > 1:
        raise ConfigError(
            f"Self-GRPO (the rl: section) runs data parallel only: tp {g.tensor_model_parallel_size} and pp "
            f"{g.pipeline_model_parallel_size} are not supported; set tensor/pipeline_model_parallel_size to 1"
        )
    if world_size > 1 and not g.use_distributed_optimizer:
        raise ConfigError(
            "Self-GRPO under torchrun needs FSDP2 (use_distributed_optimizer: true): the rollouts sample through "
            "the sharded model, which DDP's wrapper does not expose"
        )
    if groups % world_size:
        raise ConfigError(
            f"{groups} prompt group(s) per step (global_batch_size / num_generations) do not split over {world_size} "
            f"data-parallel ranks: make global_batch_size a multiple of num_generations * {world_size}"
        )


def step_items(items: list[RewardItem], step: int, count: int, seed: int) -> list[RewardItem]:
    """The ``count`` prompts of ``step``: the spec in a fresh seeded order per pass over it."""
    chosen = []
    for index in range(step * count, (step + 1) * count):
        epoch, offset = divmod(index, len(items))
        chosen.append(items[_pass_order(seed, epoch, len(items))[offset]])
    return chosen


@functools.lru_cache(maxsize=2)
def _pass_order(seed: int, epoch: int, count: int) -> tuple[int, ...]:
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


class GRPOTrainer(Trainer):
    """`Trainer` with Self-GRPO steps: the spec, the reward and the settings are checked before the model loads."""

    def __init__(self, config: TrainConfig, env: DistEnv | None = None):
        check_rl_layout(config, (env or DistEnv.from_environment()).world_size)
        super().__init__(config, env)

    # ---- before the model: everything the user can get wrong ----

    def _check_data(self) -> None:
        rl = self.config.rl
        external = rl.reward_function is not None
        if rl.prompts == SHAPES_SPEC:
            self.items = shapes_spec(rl.attributes, self.config.gpt_args.seed)
        else:
            if rl.attributes is not None:
                raise ConfigError("rl.attributes is for the shapes world (rl.prompts: shapes); a JSONL spec names "
                                  "its own questions")  # fmt: skip
            self.items = load_spec(rl.prompts, questions_needed=not external)
        if rl.understanding and rl.prompts != SHAPES_SPEC:
            raise ConfigError(
                "rl.understanding needs pictures whose answers are known: it runs on the shapes world "
                "(rl.prompts: shapes), whose prompts come with their true picture"
            )
        self.reward_function = load_reward_function(rl.reward_function) if external else None
        assets = rl.assets or self.config.model.init_from
        if assets is None:
            raise ConfigError("rl needs a tokenizer and vqvae/: set rl.assets, or model.init_from to a checkpoint")
        self.assets = assets
        tuned = self.model_config.generation_defaults
        self.width, self.height = rl.image_size(tuned)
        self.timesteps = rl.timesteps or tuned.get("timesteps", 64)
        self.answer_length = rl.answer_length or tuned.get("gen_length", 32)
        self.answer_steps = rl.answer_steps or self.answer_length
        check_image_settings(self.timesteps, rl.temperature, rl.cfg_scale, 0.0, 0.9, 0.3, 5)
        check_text_settings(self.answer_length, self.answer_length, self.answer_steps, 0.0, 0.0)

    # ---- after the model: tokenizers, the reference, the reward ----

    def _prepare_inputs(self) -> None:
        rl = self.config.rl
        limit = LengthLimit.for_model(self.model_config.max_sequence_length)
        self.image_tokenizer = ImageTokenizer.from_pretrained(self.assets, device=self.device)
        tokens = self.model_config.special_tokens
        self.encoder = PromptEncoder(load_text_tokenizer(self.assets), self.image_tokenizer, tokens, limit)
        self.mask_id = tokens["mask"]
        self.codes = (tokens["image_offset"], tokens["image_offset"] + tokens["codebook_size"])
        needs_reference = rl.beta > 0 or rl.reward_model == "reference"
        self.reference = self._frozen_reference() if needs_reference else None
        if self.reward_function is None:
            answerer = self.reference if rl.reward_model == "reference" else self.model
            self.score = self_reward(lambda images, questions: self._answer(answerer, images, questions))
        self.prompts = {item.prompt: self._image_prompt(item.prompt) for item in self.items}

    def _frozen_reference(self) -> torch.nn.Module:
        """The run's starting weights (init_from, or the seeded fresh model), frozen: also after a resume."""
        return self._build_model(load_weights=True).eval().requires_grad_(False)

    def _image_prompt(self, prompt: str):
        return text_to_image.prepare(self.encoder, prompt, self.width, self.height)

    def _answer(self, model, images, questions) -> list[str]:
        """Greedy answers (evaluation stays greedy) of ``model`` to one question per image."""
        prompts = [
            understand.prepare(self.encoder, image, q, self.answer_length, None)
            for image, q in zip(images, questions, strict=True)
        ]
        outputs = sample_text(
            model,
            [p.to(self.device) for p in prompts],
            gen_length=self.answer_length,
            block_length=self.answer_length,
            steps=self.answer_steps,
            temperature=0.0,
        )
        return [understand.decode_answer(self.encoder, p, o) for p, o in zip(prompts, outputs, strict=True)]

    # ---- one step ----

    def _rollout(self, items: list[RewardItem], first: int) -> Rollout:
        """``num_generations`` images of each item; row i draws from the generator of the run's row ``first + i``."""
        rl, batch = self.config.rl, len(items) * self.config.rl.num_generations
        prepared = [self.prompts[item.prompt] for item in items for _ in range(rl.num_generations)]
        return sample_image(
            self.model,
            [p.prompt.to(self.device) for p in prepared],
            uncond_ids=[p.uncond.to(self.device) for p in prepared] if rl.cfg_scale > 0 else None,
            timesteps=self.timesteps,
            temperature=rl.temperature,
            cfg_scale=rl.cfg_scale,
            generator=self._generators(IMAGE_SAMPLING, first, batch),
            record=True,
        )

    def _generators(self, kind: int, first: int, count: int) -> list[torch.Generator]:
        """One generator per row ``first .. first + count - 1`` of the run, for one kind of draw."""
        return [sample_generator(self.config.gpt_args.seed, DRAW_KINDS * (first + i) + kind) for i in range(count)]

    def _answer_rollout(self, items: list[RewardItem], first: int) -> tuple[Rollout, torch.Tensor]:
        """Understanding rollouts: ``num_generations`` sampled answers to one question of each item (the step's
        turn through its questions) about the item's true picture, and their rewards (1 for the expected answer)."""
        rl = self.config.rl
        asked = [item.questions[self.step % len(item.questions)] for item in items]
        prompts = [
            understand.prepare(self.encoder, world.render(item.scene), question, self.answer_length, None)
            for item, (question, _) in zip(items, asked, strict=True)
            for _ in range(rl.num_generations)
        ]
        rollout = sample_text(
            self.model,
            [p.to(self.device) for p in prompts],
            gen_length=self.answer_length,
            block_length=self.answer_length,
            steps=self.answer_steps,
            temperature=rl.temperature,
            generator=self._generators(ANSWER_SAMPLING, first, len(prompts)),
            record=True,
        )
        expected = [want for _, want in asked for _ in range(rl.num_generations)]
        rewards = [
            float(normalise_answer(understand.decode_answer(self.encoder, p, row[: p.numel()])) == normalise_answer(e))
            for p, row, e in zip(prompts, rollout.sequence, expected, strict=True)
        ]
        return rollout, torch.tensor(rewards, device=self.device)

    def _rewards(self, rollout: Rollout, items: list[RewardItem]) -> torch.Tensor:
        grid = (self.height // PIXELS_PER_CELL, self.width // PIXELS_PER_CELL)
        codes = (rollout.tokens - self.codes[0]).reshape(-1, *grid).cpu()
        images = self.image_tokenizer.decode_images(codes)
        per_image = [item for item in items for _ in range(self.config.rl.num_generations)]
        failure = None
        try:
            if self.reward_function is not None:
                name = self.config.rl.reward_function
                values = checked_rewards(name, self.reward_function, images, [i.prompt for i in per_image])
            else:
                values = checked_rewards("self-reward", self.score, images, per_image)
        except RewardError as err:
            failure, values = err, [0.0] * len(images)
        self._agree_on(failure)
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def _agree_on(self, failure: RewardError | None) -> None:
        """Every rank stops when one rank's reward failed (else the others would wait for it in a collective)."""
        failed = torch.tensor([failure is not None], dtype=torch.float32, device=self.device)
        if self.dims.dp > 1:
            dist.all_reduce(failed)
        if failure is not None:
            raise failure
        if float(failed) > 0:
            raise RewardError("the reward function failed on another data-parallel rank (its log names it)")

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        """The whole step's values from every data-parallel rank's (equal-length) share."""
        if self.dims.dp == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.dims.dp)]
        dist.all_gather(parts, local)
        return torch.cat(parts)

    def _scores(self, model, part: _Part, lo: int, hi: int) -> TokenScores:
        """The configured likelihood estimate of rows ``lo:hi`` of ``part`` under ``model``."""
        temperature, rollout = self.config.rl.temperature, part.rollout.rows(lo, hi)
        if part.hidden is None:
            return trajectory_scores(model, rollout, self.mask_id, part.vocab_range, temperature)
        return sampled_timestep_scores(model, rollout, part.hidden[lo:hi], self.mask_id, part.vocab_range, temperature)

    def _frozen_logps(self, part: _Part, chunks) -> list[tuple]:
        """Per micro-batch: logp_old (with num_iterations > 1; else each update's own logp, detached) and the
        reference's logp (beta > 0), under no_grad and the same hidden tokens as the updates."""
        rl = self.config.rl
        models = (self.model if rl.num_iterations > 1 else None, self.reference if rl.beta > 0 else None)
        with torch.no_grad(), self._autocast():
            return [
                tuple(None if m is None else self._scores(m, part, lo, hi).logp for m in models) for lo, hi in chunks
            ]

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.options.param_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _update(self, parts: list[_Part], lr: float) -> dict[str, float]:
        """``num_iterations`` optimizer steps of the GRPO loss on this rank's rollouts (every part: images, and
        answers with ``rl.understanding``); this rank's metric sums."""
        rl, g = self.config.rl, self.config.gpt_args
        rows = sum(p.rollout.tokens.shape[0] for p in parts)  # this rank's completions
        every = rows * self.dims.dp  # the step's, over every rank
        chunked = []
        for part in parts:
            batch = part.rollout.tokens.shape[0]
            chunks = [(i, min(i + g.micro_batch_size, batch)) for i in range(0, batch, g.micro_batch_size)]
            chunked.append((part, chunks, self._frozen_logps(part, chunks)))
        sums = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "entropy": 0.0, "grad_norm": 0.0}
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for _ in range(rl.num_iterations):
            for part, chunks, frozen in chunked:
                for (lo, hi), (old, ref) in zip(chunks, frozen, strict=True):
                    with self._autocast():
                        scores = self._scores(self.model, part, lo, hi)
                    old = scores.logp.detach() if old is None else old
                    advantages = part.advantages[lo:hi]
                    loss = grpo_loss(scores.logp, old, ref, advantages, scores.scored, rl.epsilon, rl.beta)
                    # FSDP averages gradients over the dp ranks: each rank's share of the global mean, times dp
                    (loss.per_sequence.sum() * self.dims.dp / every).backward()
                    share = (hi - lo) / rows / rl.num_iterations
                    sums["loss"] += float(loss.per_sequence.detach().sum()) / rows / rl.num_iterations
                    sums["kl"] += float(loss.kl) * share
                    sums["clip_fraction"] += float(loss.clip_fraction) * share
                    counted = scores.scored.float()
                    sums["entropy"] += float((scores.entropy * counted).sum() / counted.sum().clamp_min(1)) * share
            norm = self.step_runner.clip_grad_norm(g.clip_grad if g.clip_grad > 0 else float("inf"))
            sums["grad_norm"] += float(norm) / rl.num_iterations
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return sums

    def _part(self, rollout: Rollout, rewards: torch.Tensor, vocab_range, first: int, hidden_kind: int) -> _Part:
        """A rollout with its group advantages and, for the sampled-timestep estimate, its hidden tokens."""
        hidden = None
        if self.config.rl.likelihood == "sampled_timestep":
            hidden = sampled_timestep_mask(rollout, self._generators(hidden_kind, first, rollout.tokens.shape[0]))
        return _Part(rollout, hidden, group_advantages(rewards, self.config.rl.num_generations), vocab_range)

    def train_step(self) -> dict[str, Any]:
        """One rollout batch and its ``num_iterations`` updates; returns the step's metrics line."""
        rl, g = self.config.rl, self.config.gpt_args
        start = time.perf_counter()
        groups = g.global_batch_size // rl.num_generations // self.dims.dp
        items = step_items(self.items, self.step, groups * self.dims.dp, g.seed)[self.dp_rank * groups :][:groups]
        first = self.step * g.global_batch_size + self.dp_rank * groups * rl.num_generations  # this rank's first row
        rollout = self._rollout(items, first)
        local_rewards = self._rewards(rollout, items)
        rewards = self._gather(local_rewards)
        parts = [self._part(rollout, local_rewards, self.codes, first, IMAGE_HIDDEN)]
        extra = {}
        if rl.understanding:
            answers, answer_rewards = self._answer_rollout(items, first)
            parts.append(self._part(answers, answer_rewards, None, first, ANSWER_HIDDEN))
            every = self._gather(answer_rewards)
            extra = {"answer_reward_mean": float(every.mean()), "answer_reward_std": float(every.std())}
        rollout_s = time.perf_counter() - start
        lr = learning_rate(self.step, self.config)
        sums = self._update(parts, lr)
        averaged = self._gather(torch.tensor([sums[k] for k in _RANK_MEANS], device=self.device))
        sums.update(zip(_RANK_MEANS, averaged.view(self.dims.dp, -1).mean(dim=0).tolist(), strict=True))
        self.backend.synchronize()
        seconds = time.perf_counter() - start
        self.step += 1
        self.consumed += g.global_batch_size
        return {
            "step": self.step,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            **extra,
            **sums,
            "lr": lr,
            "tokens_per_s": rollout.tokens.numel() * self.dims.dp / seconds,
            "rollout_s": rollout_s,
            "update_s": seconds - rollout_s,
            "step_time_s": seconds,
        }


@dataclass
class _Part:
    """One kind of rollout of a step (images, or answers) and what its update needs."""

    rollout: Rollout
    hidden: torch.Tensor | None  # the sampled-timestep estimate's hidden tokens; None: the trajectory estimate
    advantages: torch.Tensor
    vocab_range: tuple[int, int] | None  # what the sampler drew from: the image codes, or every id


# Draws of a row, each from its own generator stream: image sampling, its hidden tokens, answers, theirs.
IMAGE_SAMPLING, IMAGE_HIDDEN, ANSWER_SAMPLING, ANSWER_HIDDEN = range(4)
DRAW_KINDS = 4
_RANK_MEANS = ("loss", "kl", "clip_fraction", "entropy")  # per-rank means of equal shares: averaged over ranks


def run_grpo(config: TrainConfig) -> list[float]:
    """Self-GRPO as configured (one process); returns this call's losses (rewards are in metrics.jsonl)."""
    trainer = GRPOTrainer(config)
    try:
        return trainer.train()
    finally:
        trainer.close()
