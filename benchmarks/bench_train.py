"""Training throughput on CPU: our trainer at tp=pp=dp=1 against a plain single-process loop, in the same run.

Both train the same small DiMOO (same seed) on the same batches (built by the same `BatchSource`, inside the
timed region of both) with the same AdamW, learning-rate schedule, micro-batch accumulation and gradient
clipping; the plain loop is just ``model -> masked_diffusion_loss -> backward -> clip -> step``. The two are
timed in interleaved blocks so that load from other processes hits both alike. The table gives median step times
(wall and CPU), tokens/s and MFU (model FLOPs per CPU-second against this CPU's fp32 matmul FLOPs per CPU-second,
see `dimoo_npu.train.metrics`); the trainer's overhead = its median step time / the plain loop's - 1 (goal: under
10%), in wall time and in this process's CPU time (which other processes' load on a shared machine disturbs far
less). The loss of every step must agree between the two (same work), which the script checks.

    python benchmarks/bench_train.py [--threads 1] [--rounds 5] [--steps 4] [--seq 128]

One thread by default: on a shared machine, OpenMP's spinning barriers with several threads stall whenever another
process holds a core, which swamps the difference being measured.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.losses import masked_diffusion_loss
from dimoo_npu.train.config import DataArgs, GptArgs, ModelArgs, TrainConfig
from dimoo_npu.train.metrics import flops_per_token, measure_peak_flops
from dimoo_npu.train.schedule import learning_rate
from dimoo_npu.train.shards import Sample, write_shard
from dimoo_npu.train.trainer import DistEnv, Trainer, build_optimizer

SPECIAL = {"newline": 3000, "boa": 3001, "eoa": 3002, "boi": 3003, "eoi": 3004, "uncondition": 3005, "eos": 3006,
           "answer_pad": 3007, "mask": 3008, "image_offset": 3072, "codebook_size": 1024, "vocab": 4096}  # fmt: skip
MODEL = {"d_model": 256, "n_layers": 4, "n_heads": 4, "mlp_hidden_size": 704, "embedding_size": 4096,
         "max_sequence_length": 1024, "special_tokens": SPECIAL}  # fmt: skip


def write_shards(folder: Path, count: int, seq: int) -> None:
    """Text-to-image-like samples of exactly ``seq`` tokens: prompt, then an 8-column grid of codes."""
    generator = torch.Generator().manual_seed(0)
    rows = (seq - 24 - 4) // 9
    prompt_length = seq - 4 - rows * 9
    samples = []
    for _ in range(count):
        prompt = torch.randint(0, 3000, (prompt_length,), generator=generator)
        codes = torch.randint(0, 1024, (rows, 8), generator=generator) + SPECIAL["image_offset"]
        grid = torch.cat([codes, torch.full((rows, 1), SPECIAL["newline"])], dim=1).reshape(-1)
        tokens = torch.cat([prompt, torch.tensor([SPECIAL["boa"], SPECIAL["boi"]]), grid,
                            torch.tensor([SPECIAL["eoi"], SPECIAL["eoa"]])])  # fmt: skip
        cells = torch.cat([torch.ones(rows, 8, dtype=torch.bool), torch.zeros(rows, 1, dtype=torch.bool)], dim=1)
        loss_mask = torch.zeros(len(tokens), dtype=torch.bool)
        loss_mask[prompt_length + 2 : prompt_length + 2 + rows * 9] = cells.reshape(-1)  # codes, not end-of-line
        samples.append(Sample(tokens, loss_mask, (2, prompt_length - 1), "t2i"))
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / "shard-000000.safetensors", samples, [str(i) for i in range(count)], digest="bench")


class PlainLoop:
    """The baseline: the same model, data, optimizer, schedule, accumulation and clipping, nothing else."""

    def __init__(self, trainer: Trainer):
        torch.manual_seed(trainer.config.gpt_args.seed)
        self.model = DiMOOModel(trainer.model_config).train()
        self.config = trainer.config
        self.optimizer = build_optimizer([self.model], self.config)
        self.batches = trainer.batches
        self.microbatches = trainer.options.microbatches
        self.step = 0

    def train_step(self) -> tuple[float, int]:
        g = self.config.gpt_args
        batch = self.batches.batch(self.step * g.global_batch_size, g.global_batch_size)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.config)
        total = (batch.labels != -100).sum()
        step_loss = 0.0
        chunks = [t.chunk(self.microbatches) for t in (batch.input_ids, batch.labels, batch.attention_mask)]
        pieces = zip(*chunks, strict=True)
        for ids, labels, mask in pieces:
            share = (labels != -100).sum() / total  # the micro-batch's share of the step's labelled tokens
            loss = masked_diffusion_loss(self.model(ids, mask), labels) * share
            loss.backward()
            step_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), g.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return step_loss, batch.real_tokens


def run_config(folder: Path, seq: int, iters: int) -> TrainConfig:
    config = TrainConfig(
        gpt_args=GptArgs(micro_batch_size=4, global_batch_size=8, lr=1e-3, lr_warmup_iters=2, train_iters=iters,
                         clip_grad=1.0, bf16=False, save_interval=0),
        model=ModelArgs(config=MODEL),
        data=DataArgs(shards=str(folder / "shards"), seq_length=seq, cond_drop_prob=0.1),
        output_dir=str(folder / "run"), device="cpu", resume="never", peak_tflops=1.0,
    )  # fmt: skip
    config.check()
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved blocks per loop")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per block")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sample")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_shards(folder / "shards", 64, args.seq)
        trainer = Trainer(run_config(folder, args.seq, 10**6), DistEnv())
        plain = PlainLoop(trainer)
        results = {name: ([], [], [], []) for name in ("trainer", "plain")}  # losses, wall s, CPU s, tokens
        for loop, name in ((trainer, "trainer"), (plain, "plain")):  # one warm-up step each, not timed
            _measure(loop, results[name], timed=False)
        for _ in range(args.rounds):
            for loop, name in ((trainer, "trainer"), (plain, "plain")):
                for _ in range(args.steps):
                    _measure(loop, results[name], timed=True)
        peak = measure_peak_flops(torch.device("cpu"), torch.float32, clock=time.process_time)
    report(results, trainer, args, peak)


def _measure(loop, sink: tuple[list, list, list, list], timed: bool) -> None:
    """One step of either loop, timed from outside (the trainer's metrics line included): wall and CPU seconds."""
    start, cpu_start = time.perf_counter(), time.process_time()
    if isinstance(loop, Trainer):
        record = loop.train_step()
        loop.metrics.write(record)
        loss, tokens = record["loss"], record["tokens"]
    else:
        loss, tokens = loop.train_step()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    sink[0].append(loss)
    if timed:
        sink[1].append(seconds)
        sink[2].append(cpu_seconds)
        sink[3].append(tokens)


def report(results: dict, trainer: Trainer, args: argparse.Namespace, peak: float) -> None:
    losses = {name: values[0] for name, values in results.items()}
    steps = min(len(v) for v in losses.values())
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["trainer"][:steps], losses["plain"][:steps], strict=True))
    flops = flops_per_token(trainer.model_config, args.seq)
    tokens = trainer.config.gpt_args.global_batch_size * args.seq
    print(
        f"model: d_model 256, 4 layers, vocab 4096; {tokens} tokens/step (8 x {args.seq}, 2 micro-batches of 4), "
        f"fp32, {args.threads} threads; {args.rounds} x {args.steps} timed steps per loop, interleaved"
    )
    print(f"peak (fp32 1024^3 matmul, per CPU-second): {peak / 1e9:.1f} GFLOP/s; model FLOPs/token {flops / 1e6:.2f} M")
    print(f"losses agree over {steps} steps: max relative difference {worst:.1e}")
    print("| loop | wall ms/step | CPU ms/step | tokens/s (wall) | tokens per CPU-s | MFU (CPU time) |")
    print("|---|---|---|---|---|---|")
    wall, cpu = {}, {}
    for name, (_, seconds, cpu_seconds, counts) in results.items():
        wall[name], cpu[name] = statistics.median(seconds), statistics.median(cpu_seconds)
        real = statistics.median(counts)
        mfu = flops * tokens / cpu[name] / peak
        print(
            f"| {name} | {wall[name] * 1e3:.1f} | {cpu[name] * 1e3:.1f} | {real / wall[name]:,.0f} | "
            f"{real / cpu[name]:,.0f} | {mfu:.1%} |"
        )
    print(
        f"trainer overhead vs plain loop (medians): {wall['trainer'] / wall['plain'] - 1:+.1%} wall time, "
        f"{cpu['trainer'] / cpu['plain'] - 1:+.1%} CPU time (goal < 10%)"
    )


if __name__ == "__main__":
    main()
