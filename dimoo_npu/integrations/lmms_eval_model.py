"""``--model dimoo`` for lmms-eval 0.7.3: generate_until answered by the batched understanding sampler.

Imported by lmms-eval only (the ``lmms_eval.models`` entry point names this class), so it may import lmms-eval at
module level; nothing else in the package imports it. Requests with the same sampler settings and crop budget are
answered together, ``batch_size`` per forward; request i of such a group uses seed + i.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmms_eval.api.model import lmms
from tqdm import tqdm

from dimoo_npu.integrations.lmms_eval_settings import (
    cut_at_stop,
    image_budget_for,
    parse_model_args,
    request_settings,
    single_image,
    unsupported,
)
from dimoo_npu.settings.generation_settings import DEFAULTS, TextSettings


class DiMOOLmms(lmms):
    """A DiMOO checkpoint (default: the bundled shapes model) behind lmms-eval's simple-model interface."""

    is_simple = True

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        from dimoo_npu.pipeline import DiMOOPipeline, default_checkpoint

        self.options = parse_model_args(model_args)
        checkpoint = self.options.pretrained or default_checkpoint()
        self.pipeline = DiMOOPipeline.from_pretrained(
            checkpoint, device=self.options.device or "auto", max_length=self.options.max_length
        )
        self.defaults = dict(self.pipeline.config.generation_defaults)

    def generate_until(self, requests) -> list[str]:
        checkpoint_budget = self.defaults.get("image_budget", DEFAULTS["understand"]["image_budget"])
        groups: dict[tuple, list[int]] = {}  # (settings as a tuple, crop budget) -> request indices
        chosen: dict[tuple, TextSettings] = {}
        asked, stops = [], []
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            where = f"{task} {split} doc {doc_id}"
            picture = single_image(doc_to_visual(self.task_dict[task][split][doc_id]), where, self.options.multi_image)
            settings, until = request_settings(gen_kwargs or {}, self.options, self.defaults)
            budget = image_budget_for(picture.size, self.options.image_budget, checkpoint_budget)
            key = (dataclasses.astuple(settings), budget)
            chosen[key] = settings
            groups.setdefault(key, []).append(index)
            asked.append((picture, context))
            stops.append(until)
        answers = [""] * len(requests)
        progress = tqdm(total=len(requests), desc="dimoo answers", disable=self.rank != 0)
        for key, members in groups.items():
            texts = self.pipeline.understand(
                [asked[i][0] for i in members],
                [asked[i][1] for i in members],
                settings=chosen[key],
                image_budget=key[1],
                seed=self.options.seed,
                batch_size=self.options.batch_size,
            )
            for index, text in zip(members, texts, strict=True):
                answers[index] = cut_at_stop(text, stops[index])
            progress.update(len(members))
        progress.close()
        return answers

    def loglikelihood(self, requests):
        raise unsupported("loglikelihood")

    def generate_until_multi_round(self, requests):
        raise unsupported("generate_until_multi_round")
