"""The DiMOO / LLaDA transformer: a plain nn.Module that calls `dimoo_npu.ops` and nothing vendor-specific.

Bidirectional attention (a key is visible iff it is a real token of the same row), rotary embeddings
on the full head dim ("rotate half"), RMSNorm, SwiGLU MLP, untied head. Parameter names equal the
public checkpoint's (``model.transformer.…``). Backends and parallelism are applied from outside.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.ops import OpSet, resolve_ops
from dimoo_npu.tokens.lengths import length_cap
from dimoo_npu.utils.errors import InputError


class KVCacheLike(Protocol):
    """What a block needs from a cache (see `dimoo_npu.sampling.cache`)."""

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (B, 1, L, D) in fp32 for integer positions (B, L), as LLaDA computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, L, D/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, L, D)
    return angles.cos(), angles.sin()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: OpSet):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class DiMOOBlock(nn.Module):
    """One pre-norm transformer block. Head count is read from the projection's (possibly TP-local) width."""

    def __init__(self, config: DiMOOConfig, ops: OpSet, layer_id: int):
        super().__init__()
        d, hidden = config.d_model, config.mlp_hidden_size
        self.layer_id = layer_id
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.ops = ops
        self.attn_norm = RMSNorm(d, config.rms_norm_eps, ops)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps, ops)
        self.ff_proj = nn.Linear(d, hidden, bias=False)  # gate
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.ff_out = nn.Linear(hidden, d, bias=False)
        # The fused inference layout (`fuse_projections`): [q; k; v] and [gate; up] weights, None when not fused.
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("gate_up_weight", None, persistent=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, H, L, D)

    def _qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_weight is None:
            return self.q_proj(h), self.k_proj(h), self.v_proj(h)
        widths = [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features]
        return F.linear(h, self.qkv_weight).split(widths, dim=-1)

    def _mlp(self, n: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is None:
            return self.ff_out(self.ops.swiglu(self.ff_proj(n), self.up_proj(n)))
        return self.ff_out(self.ops.swiglu_packed(F.linear(n, self.gate_up_weight)))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        cache: KVCacheLike | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """key_padding_mask: what ``ops.attention_mask`` made of the (B, Lk) mask (or the mask itself), or None."""
        h = self.attn_norm(x)
        q, k, v = self._qkv(h)
        q = self.ops.rotary(self._heads(q), cos, sin)
        k = self.ops.rotary(self._heads(k), cos, sin)
        v = self._heads(v)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v, positions)  # full-length (B, H, Lk, D)
        attn = self.ops.attention(q, k, v, key_padding_mask, self.scale)  # (B, H, L, D)
        # Length from attn, not x: under sequence parallelism x holds only this rank's slice of the sequence.
        out = self.attn_out(attn.transpose(1, 2).flatten(2))  # (B, L, H*D)
        if self.gate_up_weight is None:  # training layout: separate ops (add_rms_norm has no backward on npu)
            x = x + out
            n = self.ff_norm(x)
        else:
            n, x = self.ops.add_rms_norm(x, out, self.ff_norm.weight, self.ff_norm.eps)
        return x + self._mlp(n)


class DiMOOTransformer(nn.Module):
    """Embedding, blocks, final norm and head. Pipeline stages set the parts they do not own to None."""

    def __init__(self, config: DiMOOConfig, ops: OpSet):
        super().__init__()
        self.wte = nn.Embedding(config.embedding_size, config.d_model)
        # A dict keyed by layer index keeps parameter names stable when a pipeline stage drops blocks.
        self.blocks = nn.ModuleDict({str(i): DiMOOBlock(config, ops, i) for i in range(config.n_layers)})
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps, ops)
        self.ff_out = nn.Linear(config.d_model, config.embedding_size, bias=False)


class DiMOOModel(nn.Module):
    """``model(input_ids, attention_mask=None) -> logits (B, L, V)``; see `forward` for sampler options."""

    def __init__(self, config: DiMOOConfig, ops: OpSet | None = None):
        super().__init__()
        self.config = config
        self.ops = ops or resolve_ops("cpu")
        self.model = nn.ModuleDict({"transformer": DiMOOTransformer(config, self.ops)})
        # The longest sequence forward accepts: config.json's max_sequence_length is a training length, not a limit.
        self.max_length = length_cap(config.max_sequence_length)

    @property
    def transformer(self) -> DiMOOTransformer:
        return self.model["transformer"]

    def use_ops(self, ops: OpSet) -> DiMOOModel:
        """Switch every op to another implementation set (numerical checks compare them on one model); every
        submodule that holds an OpSet (layers applied from outside too) follows."""
        for module in self.modules():
            if isinstance(getattr(module, "ops", None), OpSet):
                module.ops = ops
        return self

    def check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, key_length: int, check_ids: bool = True
    ) -> None:
        """Raise `InputError` naming the problem for ids, masks or lengths the model cannot take.

        ``check_ids=False`` skips the id range check, the one check that reads the device back (see
        `check_token_ids`)."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):  # what the embedding takes
            raise InputError(
                f"input_ids must be an integer tensor (int64 or int32) of shape (batch, length); got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}"
            )
        if key_length > self.max_length:
            raise InputError(
                f"sequence of {key_length} tokens is longer than the cap of {self.max_length}: shorten the prompt "
                "or ask for a smaller image, or raise the cap (model.max_length, --max-length, DIMOO_MAX_LENGTH)"
            )
        if check_ids:
            self.check_token_ids(input_ids)
        if attention_mask is not None and tuple(attention_mask.shape) != (input_ids.shape[0], key_length):
            raise InputError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; it must be (batch, keys) = "
                f"({input_ids.shape[0]}, {key_length}), True/1 for real tokens"
            )

    def check_token_ids(self, input_ids: torch.Tensor) -> None:
        """Raise `InputError` when an id is outside the vocabulary: one device-to-host read.

        The samplers call it once on their whole batch and then run `forward` with ``check_ids=False``, so their
        steps never wait on the device for it."""
        if not input_ids.numel():
            return
        low, high = torch.stack(torch.aminmax(input_ids)).tolist()
        vocab = self.config.embedding_size
        if low < 0 or high >= vocab:
            raise InputError(
                f"token id {low if low < 0 else high} is outside the vocabulary [0, {vocab}): the ids were made "
                "by another tokenizer or another model's special-token table"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCacheLike | None = None,
        logits_for: torch.Tensor | None = None,
        vocab_range: tuple[int, int] | None = None,
        check_ids: bool = True,
    ) -> torch.Tensor:
        """Logits for token ids (B, L).

        attention_mask (B, Lk): True/1 = real key (Lk = L, or the cache's length on a cached step).
        positions (B, L): rotary positions; default 0.. over each row's real tokens.
        cache: a K/V cache that blocks write into and read full-length K/V from (ML-Cache).
        logits_for (B, K): only these positions reach the head; vocab_range (lo, hi): only these ids.
        A pipeline stage without ``wte`` takes hidden states instead of ids; one without ``ln_f`` returns them.
        check_ids=False: skip the id range check (a host read); for callers that checked their ids once already.
        """
        tr = self.transformer
        key_mask = None if attention_mask is None else attention_mask.bool()
        if tr.wte is not None:
            key_length = input_ids.shape[1] if cache is None or key_mask is None else key_mask.shape[1]
            if not torch.compiler.is_compiling():  # data-dependent checks break export/compile tracing
                self.check_inputs(input_ids, key_mask, key_length, check_ids)
            x = tr.wte(input_ids)
        else:
            x = input_ids
        if positions is None:
            positions = self._default_positions(x, key_mask)
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
        mask = None if key_mask is None else self.ops.attention_mask(key_mask, x.shape[1])  # once, not per block
        for block in tr.blocks.values():
            x = block(x, cos, sin, mask, cache, positions)
        if tr.ln_f is None:
            return x
        if logits_for is not None:  # the norm is per position: normalise only the K positions the head sees
            x = x.gather(1, logits_for[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, d)
        x = tr.ln_f(x)
        weight = tr.ff_out.weight
        if vocab_range is not None:
            weight = weight[vocab_range[0] : vocab_range[1]]
        return F.linear(x, weight)

    @staticmethod
    def _default_positions(x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length = x.shape[:2]
        if key_mask is None or key_mask.shape[1] != length:
            return torch.arange(length, device=x.device).expand(batch, length)
        return (key_mask.long().cumsum(-1) - 1).clamp(min=0)  # left or right padding alike


def fuse_projections(model: DiMOOModel) -> DiMOOModel:
    """The inference layout, in place: one [q; k; v] and one [gate; up] matmul per block, residual add + norm fused.

    The separate projection weights become views into the fused ones (no second copy), so ``state_dict()`` keeps
    the checkpoint's names and values (export-hf, DCP and ``dimoo check`` see the public layout) and loading a
    state dict writes through to the fused weights. For sampling only: call it after the model has its device and
    dtype (``.to()`` would copy the views apart), and train on an unfused model (its TP plan shards the separate
    projections; npu's add_rms_norm has no backward). Calling it twice is harmless.
    """
    for block in model.transformer.blocks.values():
        if block.qkv_weight is not None:
            continue
        with torch.no_grad():
            block.qkv_weight = _fuse(block.q_proj, block.k_proj, block.v_proj)
            block.gate_up_weight = _fuse(block.ff_proj, block.up_proj)  # gate first: npu_swiglu gates the first half
    return model


def _fuse(*linears: nn.Linear) -> torch.Tensor:
    """cat of the linears' weights along the output dim; each linear's weight becomes a view into it."""
    fused = torch.cat([linear.weight.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(fused[start : start + rows], requires_grad=linear.weight.requires_grad)
        start += rows
    return fused
