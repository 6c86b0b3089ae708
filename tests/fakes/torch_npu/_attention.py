"""Fake ``torch_npu.npu_fusion_attention`` on CPU tensors, written from the op's documentation.

Doc: Ascend/op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_fusion_attention.md (commit 517f2e7d).
Schema: Ascend/op-plugin op_plugin/config/op_plugin_functions.yaml (``npu_fusion_attention``, newest superset).
Argument checks and output shapes: op_plugin/ops/opapi/FlashAttentionKernelNpuOpApi.cpp and
op_plugin/python/meta/_meta_registrations.py (``npu_fusion_attention_forward``).

Formula (doc): ``out = Dropout(Softmax(Mask(scale * (pse + Q·Kᵀ), atten_mask)), keep_prob) · V``; pse is added
BEFORE scaling (the v1 op passes pse_type 1). The doc's own pse example adds it after scaling; the formula and the
pse_type constant win. ``atten_mask`` True/1 = not computed.
"""

from __future__ import annotations

import torch

from torch_npu._checks import check

LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
COMPRESSED_MASK = 2048  # sparse modes 2, 3, 4 take the optimised (2048, 2048) triu(ones, 1) mask
SOFTMAX_LANES = 8  # softmax_max / softmax_sum repeat each row's value over 8 fp32 lanes


def _to_bnsd(t: torch.Tensor, layout: str, head_dim: int | None) -> torch.Tensor:
    """(B, N, S, D) view of a BSH / SBH / BSND / BNSD tensor; BSH/SBH split H into N heads of ``head_dim``."""
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    if layout == "BSH":
        return t.unflatten(-1, (-1, head_dim)).transpose(1, 2)  # (B, S, N, D) -> (B, N, S, D)
    return t.unflatten(-1, (-1, head_dim)).permute(1, 2, 0, 3)  # SBH: (S, B, N, D) -> (B, N, S, D)


def _from_bnsd(out: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return out
    if layout == "BSND":
        return out.transpose(1, 2)
    if layout == "BSH":
        return out.transpose(1, 2).flatten(2)  # (B, S, N*D)
    return out.permute(2, 0, 1, 3).flatten(2)  # SBH: (S, B, N*D)


def _check_shapes(query, key, value, head_num: int, layout: str) -> int | None:
    """The doc's shape rules; returns D for the H-packed layouts (BSH/SBH), else None."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check(
            t.dim() in (3, 4),
            f"The shapes of the input {name} should be 3 or 4 dimensional, but got {t.dim()}-dimensional",
        )
        check(t.dtype in FLOAT_DTYPES, f"{name} dtype must be float16, bfloat16 or float32, got {t.dtype}")
    check(query.dtype == key.dtype == value.dtype, "query, key, value must share one dtype")
    expected_dim = 3 if layout in ("BSH", "SBH", "TND") else 4
    check(
        query.dim() == key.dim() == value.dim() == expected_dim, f"input_layout {layout} needs {expected_dim}-D q/k/v"
    )
    head_dim = None
    if layout in ("BSH", "SBH"):
        check(query.shape[2] % head_num == 0, f"H={query.shape[2]} of query is not a multiple of head_num={head_num}")
        head_dim = query.shape[2] // head_num
        check(key.shape[2] % head_dim == 0, f"H={key.shape[2]} of key is not a multiple of D={head_dim}")
    else:
        heads_axis = {"BNSD": 1, "BSND": 2, "TND": 1}[layout]
        check(
            query.shape[heads_axis] == head_num,
            f"head_num={head_num} but query has {query.shape[heads_axis]} heads on the N axis of {layout}",
        )
        check(query.shape[-1] == key.shape[-1], "Dq must equal Dk")
    check(key.shape[:-1] == value.shape[:-1], "key and value must have the same shape (Dv may be smaller)")
    check(key.shape[-1] >= value.shape[-1], "Dk must be >= Dv")
    return head_dim


def _check_mask_shape(mask: torch.Tensor, batch: int, heads: int, sq: int, skv: int, sparse_mode: int) -> None:
    check(mask.dtype in (torch.bool, torch.uint8), f"atten_mask must be bool or uint8, got {mask.dtype}")
    if sparse_mode in (2, 3, 4):
        check(
            tuple(mask.shape[-2:]) == (COMPRESSED_MASK, COMPRESSED_MASK) and all(s == 1 for s in mask.shape[:-2]),
            f"sparse_mode {sparse_mode} takes the compressed (2048, 2048) mask, got {tuple(mask.shape)}",
        )
        expected = torch.triu(torch.ones(COMPRESSED_MASK, COMPRESSED_MASK, dtype=torch.bool), diagonal=1)
        check(
            torch.equal(mask.reshape(COMPRESSED_MASK, COMPRESSED_MASK).bool(), expected),
            f"sparse_mode {sparse_mode} needs atten_mask = triu(ones(2048, 2048), 1)",
        )
        return
    allowed = {(batch, heads, sq, skv): "BNSS", (batch, 1, sq, skv): "B1SS", (1, 1, sq, skv): "11SS", (sq, skv): "SS"}
    check(
        tuple(mask.shape) in allowed,
        f"atten_mask shape {tuple(mask.shape)} is none of BNSS/B1SS/11SS/SS for B={batch} N={heads} Sq={sq} Skv={skv}",
    )


def _hidden(mask, batch, heads, sq, skv, sparse_mode, pre_tockens, next_tockens) -> torch.Tensor | None:
    """(B or 1, N or 1, Sq, Skv) bool, True = not computed; None = full attention."""
    if mask is None:
        return None  # doc: without atten_mask, sparse_mode and the tockens have no effect
    rows = torch.arange(sq)[:, None]
    cols = torch.arange(skv)[None, :]
    if sparse_mode in (0, 1):
        hidden = mask.bool()
        hidden = hidden[None, None] if hidden.dim() == 2 else hidden
        if sparse_mode == 0:  # defaultMask: only the band pre_tockens/next_tockens around the diagonal is computed
            hidden = hidden | (cols - rows > next_tockens) | (rows - cols > pre_tockens)
        return hidden
    if sparse_mode == 2:  # leftUpCausal
        return (cols > rows)[None, None]
    shift = skv - sq  # right-down origin
    if sparse_mode == 3:  # rightDownCausal
        return (cols > rows + shift)[None, None]
    return ((cols - rows - shift > next_tockens) | (rows + shift - cols > pre_tockens))[None, None]  # 4: band


def _scores_to_output(q, k, v, hidden, pse, scale, keep_prob, sink, invalid_rows_defined, generator):
    """q (B,N,Sq,D), k/v (B,Nkv,Skv,D) -> out (B,N,Sq,Dv) fp32, row max and row sum (B,N,Sq) fp32."""
    groups = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(groups, dim=1)  # GQA: query head i reads kv head i // groups
    v = v.float().repeat_interleave(groups, dim=1)
    scores = q.float() @ k.transpose(-1, -2)  # (B, N, Sq, Skv)
    if pse is not None:
        scores = scores + pse.float()
    scores = scores * scale
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    if sink is not None:
        sink_col = sink.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink_col], dim=-1)
    row_max = scores.amax(dim=-1, keepdim=True)
    invalid = torch.isinf(row_max) & (row_max < 0)  # every key masked: an "invalid row"
    exp = torch.exp(scores - torch.where(invalid, 0.0, row_max))
    row_sum = exp.sum(dim=-1, keepdim=True)
    probs = exp / torch.where(invalid, 1.0, row_sum)
    if sink is not None:
        probs = probs[..., :-1]
    if keep_prob < 1.0:
        probs = probs * (torch.rand(probs.shape, generator=generator) < keep_prob) / keep_prob
    out = probs @ v
    # Doc: whole masked rows lose precision unless inner_precise=2 ("invalid-row computation", zero rows); the op
    # turns it on itself where the sparse mode makes such rows (sparse_mode 3, Sq > Skv). Otherwise the result is
    # unspecified: the fake makes it NaN so a caller that relies on it fails loudly.
    out = torch.where(invalid, 0.0 if invalid_rows_defined else float("nan"), out)
    return out, row_max.squeeze(-1), row_sum.squeeze(-1)


def _softmax_stats(row_stat: torch.Tensor) -> torch.Tensor:
    return row_stat.float()[..., None].expand(*row_stat.shape, SOFTMAX_LANES).contiguous()


def _check_scalars(head_num, input_layout, keep_prob, sparse_mode, softmax_layout, padding_mask, dropout_mask):
    check(isinstance(head_num, int) and head_num > 0, f"head_num must > 0, but got {head_num}")
    check(0 < keep_prob <= 1, f"The keep_prob value must be in range of (0, 1], but got {keep_prob}")
    check(isinstance(input_layout, str) and input_layout != "", "input_layout is empty")
    layout = input_layout.upper()  # op-plugin upper-cases the layout (case-insensitive)
    check(
        layout in LAYOUTS, f"The input_layout should be BSH/SBH/BNSD/BSND/TND(case-insensitive), but got {input_layout}"
    )
    check(softmax_layout in ("", "TND"), "only supported softmax_layout=TND")
    check(
        not (softmax_layout == "TND" and layout != "TND"), "softmax_layout=TND only supported when input_layout_str=TND"
    )
    if layout == "TND":
        check(
            0 <= sparse_mode <= 8 and sparse_mode != 5,
            f"The sparse_mode value must be in range of [0,5) or (5,8], but got {sparse_mode}",
        )
    else:
        check(0 <= sparse_mode <= 6, f"The sparse_mode value must be in range of [0,6], but got {sparse_mode}")
    check(padding_mask is None, "padding_mask is not supported yet (doc: 暂不支持该传参)")
    if dropout_mask is not None:
        raise NotImplementedError("the fake torch_npu does not model the packed dropout_mask bit layout")
    return layout


def _generator(keep_prob: float, seed: int, offset: int) -> tuple[torch.Generator | None, int, int]:
    if keep_prob >= 1.0:
        return None, 0, 0
    seed = seed or int(torch.randint(1, 2**31 - 1, ()).item())
    return torch.Generator().manual_seed(seed + offset), seed, offset


def _varlen_bounds(cumulative: list[int], total: int, name: str) -> list[tuple[int, int]]:
    """Cumulative end offsets without a leading 0 -> [(start, end)] per batch; trailing zeros drop batches."""
    bounds, start = [], 0
    for end in cumulative:
        if end == 0 and start > 0:
            break  # doc: trailing zeros mark batches that do not take part
        check(end >= start, f"{name} must be cumulative (non-decreasing), got {cumulative}")
        bounds.append((start, end))
        start = end
    check(start <= total, f"{name} ends at {start} but the tensor has T={total}")
    return bounds


def npu_fusion_attention(
    query,
    key,
    value,
    head_num,
    input_layout,
    pse=None,
    padding_mask=None,
    atten_mask=None,
    scale=1.0,
    keep_prob=1.0,
    pre_tockens=2147483647,
    next_tockens=2147483647,
    inner_precise=0,
    prefix=None,
    actual_seq_qlen=None,
    actual_seq_kvlen=None,
    sparse_mode=0,
    gen_mask_parallel=True,
    sync=False,
    softmax_layout="",
    sink=None,
    dropout_mask=None,
    seed=0,
    offset=0,
):
    """Doc: Ascend/op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_fusion_attention.md.

    Returns (attention_out, softmax_max, softmax_sum, reserved [0]-tensor, seed, offset, numels).
    """
    layout = _check_scalars(head_num, input_layout, keep_prob, sparse_mode, softmax_layout, padding_mask, dropout_mask)
    if prefix is not None or sparse_mode >= 5:
        raise NotImplementedError(f"the fake torch_npu does not model sparse_mode {sparse_mode} (prefix, varlen split)")
    if sink is not None:
        check(
            sink.dtype == torch.float32 and tuple(sink.shape) == (head_num,), "sink must be float32 of shape [head_num]"
        )
    head_dim = _check_shapes(query, key, value, head_num, layout)
    generator, seed, offset = _generator(keep_prob, seed, offset)
    invalid_rows_defined = inner_precise == 2 or sparse_mode == 3
    if layout == "TND":
        return _varlen(
            query,
            key,
            value,
            head_num,
            atten_mask,
            pse,
            scale,
            keep_prob,
            pre_tockens,
            next_tockens,
            actual_seq_qlen,
            actual_seq_kvlen,
            sparse_mode,
            softmax_layout,
            sink,
            generator,
            seed,
            offset,
            invalid_rows_defined,
        )
    q, k, v = (_to_bnsd(t, layout, head_dim) for t in (query, key, value))
    batch, heads, sq, _ = q.shape
    skv = k.shape[2]
    check(k.shape[0] == batch, "query, key and value must have the same batch size")
    check(heads % k.shape[1] == 0, f"Nq={heads} must be a multiple of Nkv={k.shape[1]}")
    check(1 <= q.shape[-1] <= 768, f"head dim must be in 1..768, got {q.shape[-1]}")
    if atten_mask is not None:
        _check_mask_shape(atten_mask, batch, heads, sq, skv, sparse_mode)
    if pse is not None:
        check(pse.dtype == query.dtype, "pse must have the dtype of query")
        check(
            tuple(pse.shape) in {(batch, heads, sq, skv), (batch, heads, 1, skv), (1, heads, sq, skv)},
            f"pse shape {tuple(pse.shape)} is none of BNSS/BN1Skv/1NSS",
        )
    hidden = _hidden(atten_mask, batch, heads, sq, skv, sparse_mode, pre_tockens, next_tockens)
    out, row_max, row_sum = _scores_to_output(
        q, k, v, hidden, pse, scale, keep_prob, sink, invalid_rows_defined, generator
    )
    numels = batch * heads * sq * skv
    reserved = torch.empty(0, dtype=query.dtype)
    return (
        _from_bnsd(out.to(query.dtype), layout),
        _softmax_stats(row_max),
        _softmax_stats(row_sum),
        reserved,
        seed,
        offset,
        numels,
    )


def _varlen(
    query,
    key,
    value,
    head_num,
    atten_mask,
    pse,
    scale,
    keep_prob,
    pre_tockens,
    next_tockens,
    actual_seq_qlen,
    actual_seq_kvlen,
    sparse_mode,
    softmax_layout,
    sink,
    generator,
    seed,
    offset,
    invalid_rows_defined,
):
    """TND: q (T, N, D), k/v (Tkv, Nkv, D); each batch is a slice given by cumulative actual_seq_qlen/kvlen."""
    check(
        bool(actual_seq_qlen) and bool(actual_seq_kvlen) and len(actual_seq_qlen) == len(actual_seq_kvlen),
        "the size of actual_seq_qlen and actual_seq_kvlen must be the same and cannot be empty.",
    )
    check(pse is None, "the fake torch_npu does not model pse in varlen (TND) mode")
    q_bounds = _varlen_bounds(list(actual_seq_qlen), query.shape[0], "actual_seq_qlen")
    kv_bounds = _varlen_bounds(list(actual_seq_kvlen), key.shape[0], "actual_seq_kvlen")
    check(len(q_bounds) == len(kv_bounds), "actual_seq_qlen and actual_seq_kvlen describe different batch counts")
    max_sq = max(e - s for s, e in q_bounds)
    max_skv = max(e - s for s, e in kv_bounds)
    if atten_mask is not None:
        if sparse_mode in (0, 1):
            check(
                tuple(atten_mask.shape) == (max_sq, max_skv),
                f"varlen mode takes only an SS atten_mask of (maxSq, maxSkv) = ({max_sq}, {max_skv})",
            )
        _check_mask_shape(atten_mask, 1, head_num, max_sq, max_skv, sparse_mode)
    out = torch.zeros(query.shape[0], head_num, value.shape[-1], dtype=torch.float32)  # (T, N, Dv)
    row_max = torch.zeros(head_num, query.shape[0])  # (N, T): the default NTD softmax layout
    row_sum = torch.zeros(head_num, query.shape[0])
    for (qs, qe), (ks, ke) in zip(q_bounds, kv_bounds, strict=True):
        sq, skv = qe - qs, ke - ks
        if sq == 0:
            continue
        # Modes 0/1 read the top-left (sq, skv) corner of the SS mask; modes 2-4 derive it from the sequence geometry.
        mask = atten_mask[:sq, :skv] if atten_mask is not None and sparse_mode in (0, 1) else atten_mask
        hidden = _hidden(mask, 1, head_num, sq, skv, sparse_mode, pre_tockens, next_tockens)
        if hidden is not None:
            check(not bool(hidden.all(dim=-1).any()), "varlen mode: atten_mask must not mask a whole row")
        q = query[qs:qe].transpose(0, 1)[None]  # (1, N, sq, D)
        k = key[ks:ke].transpose(0, 1)[None]
        v = value[ks:ke].transpose(0, 1)[None]
        o, m, s = _scores_to_output(q, k, v, hidden, None, scale, keep_prob, sink, invalid_rows_defined, generator)
        out[qs:qe] = o[0].transpose(0, 1)
        row_max[:, qs:qe], row_sum[:, qs:qe] = m[0], s[0]
    # The adaptor allocates (T, N, 8); by default the kernel writes it in NTD order, with softmax_layout="TND" in TND.
    as_tnd = softmax_layout == "TND"
    stats = [
        (_softmax_stats(r.transpose(0, 1)) if as_tnd else _softmax_stats(r).reshape(query.shape[0], head_num, -1))
        for r in (row_max, row_sum)
    ]
    numels = head_num * sum((qe - qs) * (ke - ks) for (qs, qe), (ks, ke) in zip(q_bounds, kv_bounds, strict=True))
    return (out.to(query.dtype), stats[0], stats[1], torch.empty(0, dtype=query.dtype), seed, offset, numels)
