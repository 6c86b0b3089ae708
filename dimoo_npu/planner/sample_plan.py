"""Memory of image sampling for a size, batch and CFG setting, and the largest batch an accelerator takes.

A row is one CFG branch of one prompt (the samplers batch every branch as rows of one forward). Per row:

- ML-Cache (``--use-cache``): every layer's K and V at every position, in the compute dtype, and the cached
  image-code logits of every position and their max, in the compute dtype;
- step logits: the image-code logits of the still-masked cells (all of them on the first step) in fp32,
  their softmax, and the raw compute-dtype logits; on a cache refresh also the full-length logits being
  replaced;
- forward working set: the most a no-grad forward holds at once besides the cache (one block at a time:
  residual, norm intermediates, gate/up/silu/product, rotary tables), measured on CPU with the torch kernels:
  18 bytes per d_model element, 8 per MLP element and 8 per head-dim element, per token.

A row's peak is its cache plus the larger of the working set and the step logits (the logits come after the
last block). Weights are the whole model in the compute dtype. The VQ decoder runs after sampling, one image at a time,
when the cache and the logits are freed, so it is not added.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.planner.hardware import GIB, Accelerator

PATCH = 16  # pixels per image code
IMAGE_MARKERS = 4  # BOA BOI ... EOI EOA around the code rows


@dataclass(frozen=True)
class SampleSettings:
    width: int = 1024
    height: int = 1024
    cfg_scale: float = 4.0
    use_cache: bool = True
    prompt_tokens: int = 64  # system text, template and prompt
    batch: int | None = None  # None: report the largest that fits
    dtype_bytes: int = 2  # bf16
    quantize: str | None = None  # w8a8 | w8a16: the blocks' matmul weights in int8 (`dimoo_npu.quantization`)

    @property
    def branches(self) -> int:
        return 1 + (self.cfg_scale > 0)

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // PATCH, self.width // PATCH

    @property
    def cells(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def sequence_length(self) -> int:
        rows, cols = self.grid
        return self.prompt_tokens + IMAGE_MARKERS + rows * (cols + 1)  # a newline token ends every code row


@dataclass
class SamplePlan:
    model: DiMOOConfig
    settings: SampleSettings
    accelerator: Accelerator
    weights: float
    per_row: dict[str, float]
    largest_batch: int
    batch: int

    @property
    def rows(self) -> int:
        return self.batch * self.settings.branches

    @property
    def total(self) -> float:
        return self.weights + self.rows * row_peak(self.per_row) + self.accelerator.reserve_gib * GIB

    @property
    def fits(self) -> bool:
        return self.total <= self.accelerator.memory_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "accelerator": self.accelerator.to_dict(),
            "sequence_length": self.settings.sequence_length,
            "weights": self.weights,
            "per_row": self.per_row,
            "per_row_peak": row_peak(self.per_row),
            "rows": self.rows,
            "batch": self.batch,
            "total": self.total,
            "fits": self.fits,
            "largest_batch": self.largest_batch,
        }

    def format(self, model_name: str) -> str:
        s, acc = self.settings, self.accelerator
        lines = [
            f"sampling plan: {model_name}, {s.width}x{s.height} ({s.cells} codes, {s.sequence_length} tokens per row "
            f"with a {s.prompt_tokens}-token prompt), cfg_scale {s.cfg_scale:g} ({s.branches} row(s) per image), "
            f"ML-Cache {'on' if s.use_cache else 'off'}, on {acc.name} ({acc.memory_bytes / GIB:.1f} GiB)",
            f"  {weights_label(s):44} {self.weights / GIB:8.2f} GiB",
        ]
        for name, value in self.per_row.items():
            lines.append(f"  {name + ' per row':44} {value / GIB:8.3f} GiB")
        lines.append(f"  {'per row at the peak (cache + the larger other)':44} {row_peak(self.per_row) / GIB:8.3f} GiB")
        lines.append(f"  {RESERVE_LINE:44} {acc.reserve_gib:8.2f} GiB")
        lines.append(
            f"batch {self.batch} = {self.rows} rows: {self.total / GIB:.1f} GiB "
            f"({'fits' if self.fits else 'does not fit'}); the largest batch that fits is {self.largest_batch}"
        )
        if s.sequence_length > self.model.max_sequence_length:
            lines.append(
                f"note: {s.sequence_length} tokens is past the config's max_sequence_length "
                f"{self.model.max_sequence_length} (a training length; sampling warns and runs)"
            )
        lines.append(
            "assumptions: flash attention (no L x L scores); the working set as measured with the torch kernels; "
            "the first step's logits (every cell masked) are the largest; the VQ decode runs after the cache is freed"
        )
        return "\n".join(lines)


RESERVE_LINE = "runtime reserve"


def parameter_count(model: DiMOOConfig) -> int:
    d, h, vocab = model.d_model, model.mlp_hidden_size, model.embedding_size
    return 2 * vocab * d + model.n_layers * (4 * d * d + 3 * d * h + 2 * d) + d


def weight_bytes(model: DiMOOConfig, settings: SampleSettings) -> int:
    """The whole model in the compute dtype; quantized: the blocks' matmuls in int8 with an fp32 scale per output
    channel, the rest in the compute dtype, and under w8a16 one matmul weight widened to the compute dtype at a
    time (its kernel dequantises in the matmul)."""
    if settings.quantize is None:
        return parameter_count(model) * settings.dtype_bytes
    d, h = model.d_model, model.mlp_hidden_size
    matmuls = model.n_layers * (4 * d * d + 3 * d * h)
    scales = model.n_layers * (5 * d + 2 * h) * 4
    widened = 2 * d * h * settings.dtype_bytes if settings.quantize == "w8a16" else 0  # the fused [gate; up]
    return (parameter_count(model) - matmuls) * settings.dtype_bytes + matmuls + scales + widened


def weights_label(settings: SampleSettings) -> str:
    if settings.quantize is None:
        return "weights (whole model, compute dtype)"
    return f"weights ({settings.quantize}: int8 block matmuls + scales)"


def per_row_terms(model: DiMOOConfig, settings: SampleSettings) -> dict[str, float]:
    """Bytes of one row (see the module docstring), by term."""
    length, cells, dtype = settings.sequence_length, settings.cells, settings.dtype_bytes
    d, h = model.d_model, model.mlp_hidden_size
    codes = model.special_tokens["codebook_size"]  # the head is asked for these logits only
    terms: dict[str, float] = {}
    if settings.use_cache:
        terms["ML-Cache K/V"] = 2 * model.n_layers * length * d * dtype
        terms["ML-Cache logits"] = length * (codes + 1) * dtype  # and each position's max
    step_logits = cells * codes * (4 + 4 + dtype)  # fp32 logits, their softmax, the raw ones
    if settings.use_cache:
        step_logits += length * codes * dtype  # a refresh's full-length logits beside the cached ones
    terms["step logits"] = step_logits
    terms["forward working set"] = length * (9 * dtype * d + 4 * dtype * h + 8 * model.head_dim)
    return terms


def row_peak(per_row: dict[str, float]) -> float:
    """A row's bytes at the peak: the cache always, and the larger of the forward's working set and the step's
    logits, which do not coexist (the logits come after the last block)."""
    cache = sum(v for k, v in per_row.items() if k.startswith("ML-Cache"))
    return cache + max(per_row["forward working set"], per_row["step logits"])


def plan_sampling(model: DiMOOConfig, settings: SampleSettings, accelerator: Accelerator) -> SamplePlan:
    weights = weight_bytes(model, settings)
    per_row = per_row_terms(model, settings)
    free = accelerator.usable_bytes - weights
    largest = max(0, int(free // (settings.branches * row_peak(per_row))))
    batch = settings.batch if settings.batch is not None else max(largest, 1)
    return SamplePlan(model, settings, accelerator, weights, per_row, largest, batch)
