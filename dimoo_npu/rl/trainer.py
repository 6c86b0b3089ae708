"""Self-GRPO through `dimoo train`: rollouts from the policy, rewards from its own answers, GRPO updates.

One step: take ``global_batch_size / num_generations`` prompt groups, each of the next task of ``rl.tasks`` in
turn (text-to-image, an edit of a source picture, or a caption of a true picture), sample ``num_generations``
completions of each at ``rl.temperature`` (`sample_image` / `sample_text` with ``record=True``), score them
(pictures: self-reward or ``rl.reward_function``; captions: their credit against the true caption), normalise the
rewards within each group, and make ``num_iterations`` optimizer updates of the GRPO loss
(`dimoo_npu.rl.objective`) on the recorded rollouts. Every ``rl.eval_interval`` steps the target tasks are
scored greedily on a held-out slice (`dimoo_npu.rl.heldout`). Every random draw (prompt order, sampling
noise, the likelihood's hidden tokens) comes from a generator seeded by (run seed, step, row), and the reference
is the run's starting weights rebuilt, so a resumed run repeats the uninterrupted one. Checkpoints, the run lock,
resume and metrics are the supervised trainer's (`dimoo_npu.train.trainer.Trainer`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from dimoo_npu.rl.augment import augmented
from dimoo_npu.rl.heldout import check_heldout_tasks, score_heldout
from dimoo_npu.rl.likelihood import TokenScores, sampled_timestep_mask, sampled_timestep_scores, trajectory_scores
from dimoo_npu.rl.objective import group_advantages, grpo_loss, uniform_groups
from dimoo_npu.rl.reward import (
    SHAPES_SPEC,
    SHAPES_TASKS,
    RewardError,
    RewardItem,
    answer_credit,
    checked_rewards,
    load_reward_function,
    load_spec,
    self_reward,
    shapes_spec,
    shapes_task_spec,
)
from dimoo_npu.sampling import sample_image, sample_text
from dimoo_npu.sampling.record import Rollout
from dimoo_npu.settings.generation_settings import check_cache_settings, check_image_settings, check_text_settings
from dimoo_npu.settings.requests import PIXELS_PER_CELL
from dimoo_npu.shapes import world
from dimoo_npu.tasks import PromptEncoder, edit, text_to_image, understand
from dimoo_npu.tokens.image_tokenizer import ImageTokenizer
from dimoo_npu.tokens.lengths import LengthLimit
from dimoo_npu.tokens.text_tokenizer import load_text_tokenizer
from dimoo_npu.train.config import TrainConfig
from dimoo_npu.train.masking import sample_generator
from dimoo_npu.train.schedule import learning_rate
from dimoo_npu.train.trainer import DistEnv, Trainer
from dimoo_npu.utils.errors import ConfigError, InputError


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
    if world_size > 1:
        _check_ranks_run_alike(config, groups // world_size, world_size)


def _configured_tasks(config: TrainConfig) -> list[str]:
    """The rollout tasks, one per prompt group in turn: ``rl.tasks``, or text-to-image alone when unset."""
    return list(config.rl.tasks) if config.rl.tasks is not None else ["t2i"]


def _check_ranks_run_alike(config: TrainConfig, per_rank: int, world_size: int) -> None:
    """FSDP pairs every rank's forwards up, so each step every rank must run as many: the same number of caption
    groups (a caption rollout and a picture rollout run different forwards), and a judge whose answers take a fixed
    number of steps (threshold decoding ends an answer when the model is sure: a step count that depends on it)."""
    rl = config.rl
    if rl.answer_parallel_threshold is not None:
        raise ConfigError(
            f"rl.answer_parallel_threshold {rl.answer_parallel_threshold} ends the judge's answers after as many steps "
            "as the model needs, which differs between data-parallel ranks and would stall them: set "
            "rl.answer_parallel_threshold=null under torchrun (rl.answer_kv_cache still speeds the answers up)"
        )
    tasks = _configured_tasks(config)
    steps = len(tasks) // math.gcd(len(tasks), per_rank * world_size)  # the pattern of groups repeats after these
    for step in range(steps):
        captions = [
            sum(tasks[k % len(tasks)] == "caption" for k in rank_groups(step, rank, per_rank, world_size))
            for rank in range(world_size)
        ]
        if len(set(captions)) > 1:
            raise ConfigError(
                f"rl.tasks {tasks} give the {world_size} data-parallel ranks different mixes at step {step + 1} "
                f"(caption groups per rank: {captions}; each rank takes {per_rank} consecutive group(s)), and ranks "
                "that roll out different tasks run different forwards and stall: order rl.tasks so that every run of "
                f"{per_rank} consecutive groups holds as many captions, or change global_batch_size"
            )


def rank_groups(step: int, rank: int, per_rank: int, world_size: int) -> range:
    """The run's prompt groups that data-parallel ``rank`` rolls out at ``step`` (from 0): ``per_rank`` consecutive
    ones, rank after rank, so the layout check and the step read the same assignment."""
    first = (step * world_size + rank) * per_rank
    return range(first, first + per_rank)


def step_items(
    tasks: list[str], items: dict[str, list[RewardItem]], first: int, count: int, seed: int
) -> list[RewardItem]:
    """The items of the run's prompt groups ``first .. first + count - 1``: group k is of task
    ``tasks[k % len(tasks)]``, and each task walks its items in a fresh seeded order per pass over them."""
    chosen = []
    for group in range(first, first + count):
        turn, slot = divmod(group, len(tasks))
        task = tasks[slot]
        occurrence = turn * tasks.count(task) + tasks[:slot].count(task)
        epoch, offset = divmod(occurrence, len(items[task]))
        chosen.append(items[task][_pass_order(seed, epoch, len(items[task]))[offset]])
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
        self.tasks = self._rollout_tasks()
        self.task_items = {
            task: self.items if task == "t2i" else shapes_task_spec(task, self.config.gpt_args.seed, rl.task_items)
            for task in self.tasks
        }
        self.eval_tasks = check_heldout_tasks(rl.eval_tasks if rl.eval_tasks is not None else self.tasks)
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
        try:
            check_cache_settings(rl.answer_kv_cache, rl.answer_parallel_threshold)
        except InputError as err:
            raise ConfigError(f"rl.answer_kv_cache / rl.answer_parallel_threshold: {err}") from None

    def _rollout_tasks(self) -> list[str]:
        """``rl.tasks`` checked: known names, the shapes world for anything but text-to-image, unguided edits."""
        rl = self.config.rl
        tasks = _configured_tasks(self.config)
        if not tasks:
            raise ConfigError(f"rl.tasks is empty: name at least one of {', '.join(SHAPES_TASKS)}")
        for task in tasks:
            if task not in SHAPES_TASKS:
                raise ConfigError(f"rl.tasks names {task!r}: use {', '.join(SHAPES_TASKS)}")
        if rl.prompts != SHAPES_SPEC and tasks != ["t2i"]:
            raise ConfigError(
                "rl.tasks beyond t2i need pictures and answers the run knows: they run on the shapes world "
                "(rl.prompts: shapes); a JSONL spec rolls out text-to-image only"
            )
        if rl.cfg_scale > 0 and any(task.startswith("edit-") for task in tasks):
            raise ConfigError("edit rollouts run unguided (the likelihood scores the conditional branch): set "
                              "rl.cfg_scale: 0 or drop the edit tasks")  # fmt: skip
        return tasks

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
        self.prompts = {item.prompt: self._image_prompt(item.prompt) for item in self.task_items.get("t2i", [])}
        self.image_budget = self.model_config.generation_defaults.get("image_budget")

    def _frozen_reference(self) -> torch.nn.Module:
        """The run's starting weights (init_from, or the seeded fresh model), frozen: also after a resume."""
        return self._build_model(load_weights=True).eval().requires_grad_(False)

    def _image_prompt(self, prompt: str):
        return text_to_image.prepare(self.encoder, prompt, self.width, self.height)

    def _answer(self, model, images, questions) -> list[str]:
        """Greedy answers (evaluation stays greedy) of ``model`` to one question per image, decoded with
        ``rl.answer_kv_cache`` / ``rl.answer_parallel_threshold`` (exact by default)."""
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
            kv_cache=self.config.rl.answer_kv_cache,
            parallel_threshold=self.config.rl.answer_parallel_threshold,
        )
        return [understand.decode_answer(self.encoder, p, o) for p, o in zip(prompts, outputs, strict=True)]

    # ---- one step ----

    def _rollout(self, groups: list[int], items: list[RewardItem]) -> Rollout:
        """``num_generations`` pictures of each item (text-to-image, or an edit of its source picture), sampled
        with the generators of the groups' rows."""
        rl = self.config.rl
        prepared = [self._picture_prompt(group, item) for group, item in zip(groups, items, strict=True)]

        def draw(rows: list, temperature: float, generators) -> Rollout:
            return sample_image(
                self.model,
                [p.prompt.to(self.device) for p in rows],
                uncond_ids=[p.uncond.to(self.device) for p in rows] if rl.cfg_scale > 0 else None,
                timesteps=self.timesteps,
                temperature=temperature,
                cfg_scale=rl.cfg_scale,
                generator=generators,
                record=True,
            )

        return self._group_rollout(draw, prepared, groups, IMAGE_SAMPLING)

    def _group_rollout(self, draw, prompts: list, groups: list[int], kind: int) -> Rollout:
        """``num_generations`` completions of each group's prompt, drawn by ``draw(prompts, temperature,
        generators)``: sampled at ``rl.temperature`` from the groups' row generators, and with
        ``rl.greedy_completion`` the last of each group decoded greedily instead (evaluation's path, which the
        sampled ones rarely take: a group then scores the decode that is evaluated beside its samples)."""
        rl = self.config.rl
        sampled = rl.num_generations - int(rl.greedy_completion)
        rows = self._rows(groups, sampled)
        rollout = draw([p for p in prompts for _ in range(sampled)], rl.temperature, self._generators(kind, rows))
        if not rl.greedy_completion:
            return rollout
        both = Rollout.stacked([rollout, draw(prompts, 0.0, None)])
        order = [i for g in range(len(groups)) for i in (*range(g * sampled, (g + 1) * sampled), len(rows) + g)]
        return both.select(torch.tensor(order, device=both.tokens.device))

    def _picture_prompt(self, group: int, item: RewardItem):
        if item.source is None:
            return self.prompts[item.prompt]
        source = self._shown(world.render(item.source), group)
        return edit.prepare(self.encoder, source, item.prompt, item.edit_type, image_budget=self.image_budget)

    def _shown(self, picture, group: int):
        """A picture as a rollout of ``group`` reads it: augmented (one draw per group) with ``rl.augment``."""
        if not self.config.rl.augment:
            return picture
        return augmented(picture, self.config.gpt_args.seed * 1_000_003 + group)

    def _rows(self, groups: list[int], per_group: int | None = None) -> list[int]:
        """The run's completion rows of prompt groups ``groups``: each group's first ``per_group`` (null: all)."""
        n = self.config.rl.num_generations
        return [group * n + j for group in groups for j in range(per_group or n)]

    def _generators(self, kind: int, rows: list[int]) -> list[torch.Generator]:
        """One generator per run row in ``rows``, for one kind of draw."""
        return [sample_generator(self.config.gpt_args.seed, DRAW_KINDS * row + kind) for row in rows]

    def _answer_rollout(self, groups: list[int], items: list[RewardItem]) -> tuple[Rollout, torch.Tensor]:
        """Understanding rollouts: ``num_generations`` sampled answers to one question of each item (the step's
        turn through its questions) about the item's true picture, and their rewards (`answer_credit`)."""
        rl = self.config.rl
        asked = [item.questions[self.step % len(item.questions)] for item in items]
        prompts = [
            understand.prepare(self.encoder, self._shown(world.render(item.scene), group), question,
                               self.answer_length, None)
            for group, item, (question, _) in zip(groups, items, asked, strict=True)
        ]  # fmt: skip

        def draw(rows: list, temperature: float, generators) -> Rollout:
            return sample_text(
                self.model,
                [p.to(self.device) for p in rows],
                gen_length=self.answer_length,
                block_length=self.answer_length,
                steps=self.answer_steps,
                temperature=temperature,
                generator=generators,
                record=True,
            )

        rollout = self._group_rollout(draw, prompts, groups, ANSWER_SAMPLING)
        per_row = [(p, pair) for p, pair in zip(prompts, asked, strict=True) for _ in range(rl.num_generations)]
        rewards = [
            answer_credit(question, want, understand.decode_answer(self.encoder, p, row[: p.numel()]))
            for (p, (question, want)), row in zip(per_row, rollout.sequence, strict=True)
        ]
        return rollout, torch.tensor(rewards, device=self.device)

    def _decode(self, cells: torch.Tensor) -> list[Image.Image]:
        """Sampled image cells (absolute ids, one row per picture) as pictures, through the VQ."""
        grid = (self.height // PIXELS_PER_CELL, self.width // PIXELS_PER_CELL)
        return self.image_tokenizer.decode_images((cells - self.codes[0]).reshape(-1, *grid).cpu())

    def _rewards(self, rollout: Rollout, items: list[RewardItem]) -> torch.Tensor:
        images = self._decode(rollout.tokens)
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

    def _reward_metrics(self, by_task: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """``reward_mean`` / ``reward_std`` over the step's task rollouts on every rank, ``reward_<task>`` per task
        when there are several (ranks hold different tasks: sums are reduced, not gathered), and ``uniform_groups``:
        the share of groups whose completions all scored the same (advantage 0: nothing to learn from them); with
        ``rl.greedy_completion``, ``reward_greedy``: the mean of the groups' greedy decodes."""
        names = list(dict.fromkeys(self.tasks))
        sums = torch.zeros(len(names), 6, dtype=torch.float64, device=self.device)
        for index, name in enumerate(names):
            for values in by_task.get(name, []):
                values = values.double()
                uniform = uniform_groups(values, values.numel())[0]
                sums[index] += torch.stack([values.sum(), values.square().sum(), values.new_tensor(values.numel()),
                                            uniform.double(), values.new_tensor(1.0), values[-1]])  # fmt: skip
        if self.dims.dp > 1:
            dist.all_reduce(sums)
        total, squares, count, uniform, groups, last = sums.sum(dim=0).tolist()
        mean = total / count
        variance = max(squares - count * mean**2, 0.0) / max(count - 1, 1)  # Bessel's correction, as torch.std
        metrics = {"reward_mean": mean, "reward_std": variance**0.5, "uniform_groups": uniform / groups}
        if self.config.rl.greedy_completion:
            metrics["reward_greedy"] = last / groups
        if len(names) > 1:
            metrics.update({f"reward_{n}": float(s[0] / s[2]) for n, s in zip(names, sums, strict=True) if s[2] > 0})
        return metrics

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

    def _updated_parts(self, parts: list[_Part]) -> list[_Part]:
        """Each part cut to the rows its update runs: the updated ones first, then (zero-weight) padding up to the
        most any rank updates, so that every rank runs the same forwards (FSDP's collectives pair them up)."""
        counts = torch.tensor([int(p.updated.sum()) for p in parts], device=self.device)
        if self.dims.dp > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        cut = []
        for part, count in zip(parts, counts.tolist(), strict=True):
            order = torch.argsort((~part.updated).to(torch.int8), stable=True)[:count]
            cut.append(part.select(order))
        return cut

    def _update(self, parts: list[_Part], lr: float) -> dict[str, float]:
        """``num_iterations`` optimizer steps of the GRPO loss on this rank's rollouts (every part: images, and
        answers with ``rl.understanding``); this rank's metric sums (kl, clip fraction and entropy over the updated
        completions)."""
        rl, g = self.config.rl, self.config.gpt_args
        rows = sum(p.rollout.tokens.shape[0] for p in parts)  # this rank's completions
        every = rows * self.dims.dp  # the step's, over every rank
        updated = max(sum(int(p.updated.sum()) for p in parts), 1)
        chunked = []
        for part in self._updated_parts(parts):
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
                    real = part.updated[lo:hi]
                    scored = scores.scored & real[:, None]  # a padding row scores nothing
                    loss = grpo_loss(scores.logp, old, ref, part.advantages[lo:hi], scored, rl.epsilon, rl.beta)
                    # FSDP averages gradients over the dp ranks: each rank's share of the global mean, times dp
                    (loss.per_sequence.sum() * self.dims.dp / every).backward()
                    share = int(real.sum()) / updated / rl.num_iterations
                    sums["loss"] += float(loss.per_sequence.detach().sum()) / rows / rl.num_iterations
                    sums["kl"] += float(loss.kl) * share
                    sums["clip_fraction"] += float(loss.clip_fraction) * share
                    counted = scored.float()
                    sums["entropy"] += float((scores.entropy * counted).sum() / counted.sum().clamp_min(1)) * share
            norm = self.step_runner.clip_grad_norm(g.clip_grad if g.clip_grad > 0 else float("inf"))
            sums["grad_norm"] += float(norm) / rl.num_iterations
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return sums

    def _part(self, rollout: Rollout, rewards: torch.Tensor, vocab_range, rows: list[int], hidden_kind: int) -> _Part:
        """A rollout with its group advantages and, for the sampled-timestep estimate, its hidden tokens."""
        rl, hidden = self.config.rl, None
        if rl.likelihood == "sampled_timestep":
            hidden = sampled_timestep_mask(rollout, self._generators(hidden_kind, rows))
        updated = torch.ones_like(rewards, dtype=torch.bool)
        if rl.skip_uniform_groups:
            updated = ~uniform_groups(rewards, rl.num_generations).repeat_interleave(rl.num_generations)
        return _Part(rollout, hidden, group_advantages(rewards, rl.num_generations), vocab_range, updated)

    def train_step(self) -> dict[str, Any]:
        """One rollout batch and its ``num_iterations`` updates; returns the step's metrics line."""
        rl, g = self.config.rl, self.config.gpt_args
        start = time.perf_counter()
        count = g.global_batch_size // rl.num_generations // self.dims.dp  # this rank's prompt groups
        groups = list(rank_groups(self.step, self.dp_rank, count, self.dims.dp))
        items = step_items(self.tasks, self.task_items, groups[0], count, g.seed)
        pictures = [(k, item) for k, item in zip(groups, items, strict=True) if item.task != "caption"]
        captions = [(k, item) for k, item in zip(groups, items, strict=True) if item.task == "caption"]
        parts, by_task, completions = [], {}, 0
        if pictures:
            picture_groups, picture_items = map(list, zip(*pictures, strict=True))
            rollout = self._rollout(picture_groups, picture_items)
            rewards = self._rewards(rollout, picture_items)
            parts.append(self._part(rollout, rewards, self.codes, self._rows(picture_groups), IMAGE_HIDDEN))
            self._by_task(by_task, picture_items, rewards)
            completions += rollout.tokens.numel()
        if captions:
            caption_groups, caption_items = map(list, zip(*captions, strict=True))
            rollout, rewards = self._answer_rollout(caption_groups, caption_items)
            parts.append(self._part(rollout, rewards, None, self._rows(caption_groups), ANSWER_HIDDEN))
            self._by_task(by_task, caption_items, rewards)
            completions += rollout.tokens.numel()
        extra = self._reward_metrics(by_task)
        if rl.understanding:
            answers, answer_rewards = self._answer_rollout(groups, items)
            parts.append(self._part(answers, answer_rewards, None, self._rows(groups), ANSWER_HIDDEN))
            every = self._gather(answer_rewards)
            extra.update(answer_reward_mean=float(every.mean()), answer_reward_std=float(every.std()))
        rollout_s = time.perf_counter() - start
        lr = learning_rate(self.step, self.config)
        sums = self._update(parts, lr)
        averaged = self._gather(torch.tensor([sums[k] for k in _RANK_MEANS], device=self.device))
        sums.update(zip(_RANK_MEANS, averaged.view(self.dims.dp, -1).mean(dim=0).tolist(), strict=True))
        self.backend.synchronize()
        seconds = time.perf_counter() - start
        self.step += 1
        self.consumed += g.global_batch_size
        heldout = self._heldout_scores()
        return {
            "step": self.step,
            **extra,
            **sums,
            "lr": lr,
            "tokens_per_s": completions * self.dims.dp / seconds,
            "rollout_s": rollout_s,
            "update_s": seconds - rollout_s,
            "step_time_s": seconds,
            **heldout,
        }

    @staticmethod
    def _by_task(by_task: dict[str, list[torch.Tensor]], items: list[RewardItem], rewards: torch.Tensor) -> None:
        """File each group's rewards under its task."""
        for item, values in zip(items, rewards.view(len(items), -1), strict=True):
            by_task.setdefault(item.task, []).append(values)

    # ---- in-run scoring ----

    def _heldout_scores(self) -> dict[str, float]:
        """Every ``rl.eval_interval`` steps (and at the last): the held-out slice's scores, with their seconds."""
        rl = self.config.rl
        last = self.step == self.config.gpt_args.train_iters
        if not rl.eval_interval or (self.step % rl.eval_interval and not last):
            return {}
        start = time.perf_counter()
        scores = score_heldout(self.eval_tasks, rl.eval_limit, self._greedy_t2i, self._greedy_edit, self._read)
        return {**scores, "heldout_s": time.perf_counter() - start}

    def _greedy_pictures(self, prepared) -> list:
        """Greedy pictures at the checkpoint's settings (as `dimoo eval shapes` draws them), as RGB arrays."""
        defaults = self.model_config.generation_defaults
        with self._autocast():
            cells = sample_image(
                self.model, [p.prompt.to(self.device) for p in prepared],
                timesteps=defaults.get("timesteps", 64), temperature=0.0,
            )  # fmt: skip
        return [np.asarray(image.convert("RGB")) for image in self._decode(cells)]

    def _greedy_t2i(self, prompts: list[str]) -> list:
        return self._greedy_pictures([self._image_prompt(prompt) for prompt in prompts])

    def _greedy_edit(self, sources, instructions: list[str], edit_types: list[str]) -> list:
        prepared = [
            edit.prepare(self.encoder, Image.fromarray(source), text, kind, image_budget=self.image_budget)
            for source, text, kind in zip(sources, instructions, edit_types, strict=True)
        ]
        return self._greedy_pictures(prepared)

    def _read(self, images, questions: list[str]) -> list[str]:
        with self._autocast():
            return self._answer(self.model, [Image.fromarray(image) for image in images], questions)


@dataclass
class _Part:
    """One kind of rollout of a step (images, or answers) and what its update needs."""

    rollout: Rollout
    hidden: torch.Tensor | None  # the sampled-timestep estimate's hidden tokens; None: the trajectory estimate
    advantages: torch.Tensor
    vocab_range: tuple[int, int] | None  # what the sampler drew from: the image codes, or every id
    updated: torch.Tensor  # (B,) bool: the rows the update learns from (rl.skip_uniform_groups leaves some out)

    def select(self, pick: torch.Tensor) -> _Part:
        """The rows ``pick`` indexes, in its order."""
        hidden = None if self.hidden is None else self.hidden[pick]
        return _Part(self.rollout.select(pick), hidden, self.advantages[pick], self.vocab_range, self.updated[pick])


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
