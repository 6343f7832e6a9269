"""Triton kernels of :mod:`worldplay.nn.fused` (imported only where they run: a CUDA device, or
the tests, which run them in Triton's interpreter on the CPU).

One program handles one token of one of q, k, v: the whole ``heads x head_dim`` row (3072
features at full size) sits in registers, so the RMSNorm statistic, the normalisation, the
RoPE rotation of feature pairs and PRoPE's 4x4 transform of feature groups are done in one
read of the GEMM output, and both branches are written straight to their destination (the
batched queries, or the layer's K/V buffer at the call's token slots).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_bf16(x):
    """float32 -> the nearest bfloat16 (ties to even), kept in float32. Written out in integer
    ops so that Triton's CPU interpreter (which truncates in casts) rounds like the GPU."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


def _rotate_store_body(
    src_ptr, src_batch_stride, src_tok_stride,  # [B, L, H*d] rows of a GEMM output
    w_ptr,  # RMSNorm weight [H*d] (NORM)
    cos_ptr, sin_ptr,  # RoPE tables [L, d/2] float32, contiguous (ROPE)
    m_ptr,  # PRoPE matrices [B, F, 4, 4] contiguous (PROPE)
    dst_ptr, dst_branch_stride, dst_batch_stride, dst_tok_stride,  # branch 0 / branch 1 rows
    idx_ptr, dst_start,  # destination token of call token t: idx[t] (INDEXED) or dst_start + t
    L, S, F, eps,
    NORM: tl.constexpr, ROPE: tl.constexpr, PROPE: tl.constexpr, INDEXED: tl.constexpr,
    HEADS: tl.constexpr, HEADS_P2: tl.constexpr, D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // L
    t = pid % L
    h = tl.arange(0, HEADS_P2)[:, None]
    f = tl.arange(0, D)[None, :]
    mask = h < HEADS
    feat = h * D + f
    out_ty = dst_ptr.dtype.element_ty  # bfloat16 (the caller checks)
    x = tl.load(src_ptr + b * src_batch_stride + t * src_tok_stride + feat, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        # The official RMSNorm: float32 statistic, normalised value rounded to the model dtype,
        # times the weight in the model dtype (rounded again).
        mean_sq = tl.sum(tl.sum(x * x, axis=1), axis=0) / (HEADS * D)
        x = _round_bf16(x * tl.rsqrt(mean_sq + eps))
        w = _round_bf16(tl.load(w_ptr + feat, mask=mask, other=0.0).to(tl.float32))
        x = _round_bf16(x * w)
    if INDEXED:
        dst_t = tl.load(idx_ptr + t)
    else:
        dst_t = dst_start + t
    dst = dst_ptr + b * dst_batch_stride + dst_t * dst_tok_stride + feat

    # Feature 4j + 2p + r is element r of RoPE pair 2j + p and element 2p + r of PRoPE group j.
    even, odd = tl.split(tl.reshape(x, (HEADS_P2, D // 4, 2, 2)))  # [H, d/4, 2 (p)] each
    if ROPE:
        half = tl.arange(0, D // 2)
        c = tl.reshape(tl.load(cos_ptr + t * (D // 2) + half), (1, D // 4, 2))
        s = tl.reshape(tl.load(sin_ptr + t * (D // 2) + half), (1, D // 4, 2))
        rotated = tl.join(even * c - odd * s, even * s + odd * c)  # [H, d/4, 2 (p), 2 (r)]
        tl.store(dst, _round_bf16(tl.reshape(rotated, (HEADS_P2, D))).to(out_ty), mask=mask)
    else:
        tl.store(dst, x.to(out_ty), mask=mask)
    if PROPE:
        g0, g2 = tl.split(even)
        g1, g3 = tl.split(odd)
        m = m_ptr + (b * F + t // S) * 16
        o0 = tl.load(m + 0).to(tl.float32) * g0 + tl.load(m + 1).to(tl.float32) * g1 \
            + tl.load(m + 2).to(tl.float32) * g2 + tl.load(m + 3).to(tl.float32) * g3
        o1 = tl.load(m + 4).to(tl.float32) * g0 + tl.load(m + 5).to(tl.float32) * g1 \
            + tl.load(m + 6).to(tl.float32) * g2 + tl.load(m + 7).to(tl.float32) * g3
        o2 = tl.load(m + 8).to(tl.float32) * g0 + tl.load(m + 9).to(tl.float32) * g1 \
            + tl.load(m + 10).to(tl.float32) * g2 + tl.load(m + 11).to(tl.float32) * g3
        o3 = tl.load(m + 12).to(tl.float32) * g0 + tl.load(m + 13).to(tl.float32) * g1 \
            + tl.load(m + 14).to(tl.float32) * g2 + tl.load(m + 15).to(tl.float32) * g3
        grouped = tl.join(tl.join(o0, o2), tl.join(o1, o3))  # [H, d/4, 2 (p), 2 (r)]
        tl.store(dst + dst_branch_stride, _round_bf16(tl.reshape(grouped, (HEADS_P2, D))).to(out_ty), mask=mask)


rotate_store_kernel = triton.jit(_rotate_store_body)


def interpreted_rotate_store_kernel():
    """The same kernel for Triton's CPU interpreter (tests)."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(_rotate_store_body)
