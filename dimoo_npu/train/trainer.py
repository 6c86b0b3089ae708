"""The training loop: masked-diffusion fine-tuning over a (pp, dp, tp) mesh, with DCP checkpoints.

One process or many (torchrun): rank, world size and the local device come from the environment
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); the collective backend from the device's adapter
(gloo on CPU, nccl on CUDA, hccl on Ascend). Parameters are fp32 master weights; with ``bf16`` the
compute runs in bf16 (FSDP2's mixed-precision policy, or autocast in a single process), gradients are
reduced in fp32, and AdamW updates fp32 weights. With a ``lora`` section only peft adapters train (fp32 master
weights); the frozen base is held once, in bf16 when ``bf16`` (`dimoo_npu.train.lora`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dimoo_npu.adapters import resolve_device
from dimoo_npu.files.atomic import replace_directory
from dimoo_npu.files.run_lock import RunFolderBusyError, hold_run_folder
from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.ops import resolve_ops
from dimoo_npu.parallel import build_mesh, parallelize
from dimoo_npu.tokens.lengths import LengthLimit
from dimoo_npu.train.checkpoint import CONFIG_FILE, STATE_FILE, Checkpointer, load_hf_weights
from dimoo_npu.train.config import TrainConfig
from dimoo_npu.train.data import BatchSource
from dimoo_npu.train.layout import model_config_of, plan_layout
from dimoo_npu.train.lora import (
    LORA_DIR,
    adapter_tensors,
    apply_lora,
    check_same_adapters,
    init_adapters,
    save_adapter,
)
from dimoo_npu.train.masking import Objective
from dimoo_npu.train.metrics import MetricsLog, flops_per_token, measure_peak_flops
from dimoo_npu.train.schedule import learning_rate
from dimoo_npu.train.shards import ShardDataset
from dimoo_npu.train.step import TrainStep
from dimoo_npu.utils import envs
from dimoo_npu.utils.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> DistEnv:
        return cls(*envs.torchrun_ranks())


def build_optimizer(parts: list[torch.nn.Module], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over fp32 parameters; no weight decay on vectors (norm weights), as Megatron does."""
    params = [p for part in parts for p in part.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.gpt_args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    g = config.gpt_args
    groups = [group for group in groups if group["params"]]  # LoRA trains no vectors (DCP refuses empty groups)
    return torch.optim.AdamW(groups, lr=g.lr, betas=(g.adam_beta1, g.adam_beta2), eps=g.adam_eps)


def check_fits(longest: int, seq_length: int | None, limit: LengthLimit) -> None:
    """Refuse, before training, samples that no batch could take or that pass the length cap (warn past the
    checkpoint's max_sequence_length: Lumina-DiMOO itself was trained at 5120 with 4096 in its config)."""
    if seq_length is not None and longest > seq_length:
        raise ConfigError(
            f"the longest pre-tokenized sample has {longest} tokens > data.seq_length {seq_length}: "
            f"raise seq_length to at least {longest}, or pre-tokenize with --max-length {seq_length}"
        )
    limit.check(max(longest, seq_length or 0), "training sequences")


class Trainer:
    """Builds everything a run needs from its config (checks first), then `train` runs the steps."""

    def __init__(self, config: TrainConfig, env: DistEnv | None = None):
        self.config = config
        self.env = env or DistEnv.from_environment()
        self.model_config = model_config_of(config)
        self.dims, self.options = plan_layout(config, self.model_config, self.env.world_size)
        self._check_data()
        backend, _ = resolve_device(config.device)
        self.backend, self.device = backend, backend.device(self.env.local_rank)
        self._init_distributed()
        self.output = Path(config.output_dir)
        try:  # before anything in the folder is read or cleaned: one writer per run folder
            self.lock = hold_run_folder(self.output, self.env.rank, self.env.world_size)
        except RunFolderBusyError:
            self.close()
            raise
        self.checkpointer = Checkpointer(self.output / "checkpoints", config.keep_checkpoints, self.env.rank)
        resume_from = self.checkpointer.latest()
        if resume_from is not None and config.resume == "never":
            raise ConfigError(
                f"{self.output} already holds checkpoints ({resume_from.name}) and resume is 'never': "
                "choose a new output_dir, or resume=auto to continue that run"
            )
        self.mesh = build_mesh(self.dims, self.device.type)
        self.model = self._build_model(load_weights=resume_from is None)
        self.step_runner = TrainStep(self.model, self.dims, self.mesh, self.options, self.device)
        self.optimizer = build_optimizer([self.model], config)
        self.step, self.consumed = 0, 0
        if resume_from is not None:
            self._restore(resume_from)
        self._prepare_inputs()
        self.metrics = MetricsLog(self.output / "metrics.jsonl", self.env.rank == 0, self.step)
        self.peak_flops = self._peak_flops()

    def _check_data(self) -> None:
        """The run's data, checked before any process group or model exists (a subclass may read other data)."""
        self.dataset = ShardDataset(self.config.data.shards)
        limit = LengthLimit.for_model(self.model_config.max_sequence_length)
        check_fits(self.dataset.max_length(), self.config.data.seq_length, limit)

    def _prepare_inputs(self) -> None:
        """What `train_step` draws its batches from, once the model is built and restored."""
        special = self.model_config.special_tokens
        objective = Objective.from_special_tokens(special, self.config.data.cond_drop_prob)
        self.batches = BatchSource(
            self.dataset,
            objective,
            self.config.gpt_args.seed,
            special["eos"],
            self.config.data.seq_length,
            group_by_length=self.config.gpt_args.global_batch_size if self.config.data.group_by_length else 0,
        )

    @property
    def dp_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh.get_local_rank("dp")

    def _init_distributed(self) -> None:
        if self.env.world_size == 1 or dist.is_initialized():
            return
        self.backend.set_device(self.env.local_rank)
        dist.init_process_group(self.backend.dist_backend)

    def _build_model(self, load_weights: bool) -> torch.nn.Module:
        """This rank's part of a fresh model (seeded, built whole on every rank) or of ``init_from``'s weights
        (built on meta, so only this rank's shards are ever allocated)."""
        ops = resolve_ops(self.device.type, self.config.model.ops)
        lora, seed = self.config.lora, self.config.gpt_args.seed
        if self.config.model.init_from is None:
            torch.manual_seed(seed)
            model = self._with_adapters(DiMOOModel(self.model_config, ops))
            part = parallelize(model, self.dims, self.mesh, self.options, self.device)
        else:
            with torch.device("meta"):
                model = self._with_adapters(DiMOOModel(self.model_config, ops))
            part = parallelize(model, self.dims, self.mesh, self.options, self.device)
            part.to_empty(device=self.device)
            if load_weights:
                load_hf_weights([part], self.config.model.init_from)
        if lora.enabled and load_weights:
            init_adapters(part, seed)
        return part.train()

    def _with_adapters(self, model: DiMOOModel) -> torch.nn.Module:
        """The model with LoRA adapters and its base frozen in the compute dtype, when the run has a lora section."""
        if not self.config.lora.enabled:
            return model
        return apply_lora(model, self.config.lora, torch.bfloat16 if self.config.gpt_args.bf16 else None)

    def _restore(self, path: Path) -> None:
        check_same_adapters(path, json.loads((path / STATE_FILE).read_text()).get("run_config", {}), self.config.lora)
        saved = DiMOOConfig.from_json(path / CONFIG_FILE)
        if saved.to_hf_dict() != self.model_config.to_hf_dict():
            raise CheckpointError(
                f"{path} holds a model with another config ({saved.n_layers} layers, d_model {saved.d_model}) than "
                "this run's: choose a new output_dir, or restore the model settings it was trained with"
            )
        state = self.checkpointer.load(path, [self.model], self.optimizer)
        self.step, self.consumed = int(state["step"]), int(state["consumed_samples"])
        if state.get("seed") != self.config.gpt_args.seed:
            logger.warning(
                "resuming with seed %s, the checkpoint was trained with %s: the data order and masks "
                "of the remaining steps change",
                self.config.gpt_args.seed,
                state.get("seed"),
            )
        logger.info("resumed at step %d from %s", self.step, path)

    def _peak_flops(self) -> float:
        if self.config.peak_tflops:
            return self.config.peak_tflops * 1e12
        dtype = torch.bfloat16 if self.config.gpt_args.bf16 else torch.float32
        return measure_peak_flops(self.device, dtype, self.backend.synchronize)

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "consumed_samples": self.consumed,
            "seed": self.config.gpt_args.seed,
            "layout": {"tp": self.dims.tp, "pp": self.dims.pp, "dp": self.dims.dp},
            "init_from": self.config.model.init_from,
            "run_config": self.config.to_dict(),
        }

    def save(self) -> Path:
        """A checkpoint (every rank); a LoRA run's holds its adapter (peft's format) in ``lora/``."""
        extra = None
        if self.config.lora.enabled:
            writer = self._adapter_writer()
            extra = lambda folder: writer(folder / LORA_DIR)  # noqa: E731
        state = self.trainer_state()
        return self.checkpointer.save(self.step, [self.model], self.optimizer, state, self.model_config, extra)

    def _adapter_writer(self) -> Callable[[Path], None]:
        """Gathers the adapters now (a collective: every rank calls it); the writer puts them in a folder."""
        tensors = adapter_tensors(self.model)
        return lambda folder: save_adapter(folder, tensors, self.config.lora, self.config.model.init_from)

    def save_final_adapter(self) -> Path | None:
        """``output_dir/lora``: the adapter as the run ends (swapped in whole; written by rank 0)."""
        writer = self._adapter_writer()
        if self.env.rank != 0:
            return None
        return replace_directory(self.output / LORA_DIR, writer)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics line."""
        g = self.config.gpt_args
        start = time.perf_counter()
        batch = self.batches.batch(self.consumed, g.global_batch_size, self.dp_rank, self.dims.dp)
        lr = learning_rate(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.config.lora.dropout:  # adapter dropout draws from the global RNG: a function of the step, for resume
            torch.manual_seed(hash((g.seed, self.step, self.env.rank)) & 0x7FFF_FFFF)
        loss = self.step_runner.forward_backward(batch.input_ids, batch.labels, batch.attention_mask)
        grad_norm = self.step_runner.clip_grad_norm(g.clip_grad if g.clip_grad > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        real, computed = self._global_tokens(batch.real_tokens, batch.input_ids.numel())
        self.backend.synchronize()
        seconds = time.perf_counter() - start
        self.step += 1
        self.consumed += g.global_batch_size
        achieved = flops_per_token(self.model_config, batch.input_ids.shape[1]) * computed / seconds
        return {
            "step": self.step,
            "loss": float(loss),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": real,
            "tokens_per_s": real / seconds,
            "mfu": achieved / (self.peak_flops * self.env.world_size),
            "step_time_s": seconds,
        }

    def _global_tokens(self, real: int, computed: int) -> tuple[int, int]:
        """(real, padded) tokens of the global batch: summed over ranks, each dp group counted once."""
        if self.env.world_size == 1:
            return real, computed
        counts = torch.tensor([real, computed], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)
        replicas = self.dims.tp * self.dims.pp
        return int(counts[0]) // replicas, int(counts[1]) // replicas

    def train(self) -> list[float]:
        """Run the remaining steps up to ``train_iters``; return this call's losses."""
        g = self.config.gpt_args
        losses = []
        bar = tqdm(total=g.train_iters, initial=self.step, desc="training", unit="step", disable=self.env.rank != 0)
        while self.step < g.train_iters:
            record = self.train_step()
            losses.append(record["loss"])
            self.metrics.write(record)
            bar.update()
            if self.step % g.log_interval == 0:
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
                )
            if (g.save_interval and self.step % g.save_interval == 0) or self.step == g.train_iters:
                self.save()
        bar.close()
        if self.config.lora.enabled:
            self.save_final_adapter()
        self.metrics.close()
        if self.config.plot and self.env.rank == 0:
            from dimoo_npu.train.plots import plot_curves

            plot_curves(self.output / "metrics.jsonl", self.output / "curves.png")
        return losses

    def close(self) -> None:
        if getattr(self, "lock", None) is not None:
            self.lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_training(config: TrainConfig) -> list[float]:
    """Train as configured (one process, or one rank of a torchrun job) and return the losses."""
    trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        trainer.close()
