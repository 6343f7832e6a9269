"""Fused versions of the DiT's memory-bound steps (``RolloutSettings.fused_kernels``).

Profiled at 704x1280 (notes/perf.md), the work between the q/k/v GEMMs and the attention —
RMSNorm of q and k, RoPE, PRoPE's per-frame transforms of q, k and v, and the copies of both
branches' keys/values into the memory buffer — took ~75 ms per steady chunk in three passes at
a quarter of the memory bandwidth. :func:`rotate_and_store` does it in one pass (a Triton
kernel on CUDA), writing keys/values straight into the buffer. ``linear_gelu_tanh`` moves
the FFN's GELU into the GEMM epilogue (cuBLASLt) instead of a separate pass over its output.

Both compute what the unfused code computes, with float32 intermediates rounded at the same
points; only the order of float32 additions may differ (the RMSNorm sum, PRoPE's four
products), which can move a result by one bf16 rounding step. Everywhere else — a CPU, or no
Triton — the reference PyTorch code runs, so a CPU rollout with ``fused_kernels`` equals one
without.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .prope import PRoPE, apply_per_frame
from .rope import apply_rope


@functools.cache
def triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _kernel_shape_ok(head_dim: int) -> bool:
    return head_dim >= 4 and head_dim & (head_dim - 1) == 0  # Triton block shapes: powers of two


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the official model computes it: statistics in float32, the normalised value
    rounded to the input dtype, then multiplied by the weight in that dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight.to(x.dtype)


def store_kv(ks, vs, kv_buffer, write: slice | torch.Tensor, batch: int) -> None:
    """Copy each branch's keys/values into its batch rows of the fixed buffers, in place, at
    the token range ``write`` or at the token indices ``write`` (a LongTensor)."""
    k_buf, v_buf = kv_buffer
    for i, (kb, vb) in enumerate(zip(ks, vs, strict=True)):
        rows = slice(i * batch, (i + 1) * batch)
        if isinstance(write, torch.Tensor):
            k_buf[rows].index_copy_(1, write, kb)
            v_buf[rows].index_copy_(1, write, vb)
        else:
            k_buf[rows, write].copy_(kb)
            v_buf[rows, write].copy_(vb)


def rotate_and_store_reference(
    q, k, v, norm_q, norm_k, eps, rope, prope: PRoPE | None, kv_buffer, write, heads: int
) -> torch.Tensor | None:
    """The unfused computation (and the CPU path). ``q`` (or None), ``k``, ``v``: GEMM outputs
    ``[B, L, H*d]``; returns the queries of both branches ``[branches*B, L, H, d]`` (or None)
    after writing the keys/values to tokens ``write`` of ``kv_buffer``."""
    batch = k.shape[0]

    def heads_of(t):
        return t.unflatten(-1, (heads, -1))

    kn = heads_of(rms_norm(k, norm_k, eps))
    vh = heads_of(v)
    ks, vs = [apply_rope(kn, *rope)], [vh]
    if prope is not None:
        ks.append(apply_per_frame(kn, prope.kv))
        vs.append(apply_per_frame(vh, prope.kv))
    store_kv(ks, vs, kv_buffer, write, batch)
    if q is None:
        return None
    qn = heads_of(rms_norm(q, norm_q, eps))
    qs = [apply_rope(qn, *rope)]
    if prope is not None:
        qs.append(apply_per_frame(qn, prope.q))
    return torch.cat(qs) if len(qs) > 1 else qs[0]


def rotate_and_store(
    q, k, v, norm_q, norm_k, eps, rope, prope: PRoPE | None, kv_buffer, write, heads: int, *, kernel=None
) -> torch.Tensor | None:
    """:func:`rotate_and_store_reference` in one Triton pass on CUDA (or with ``kernel``, e.g.
    the interpreted kernel in tests); the reference elsewhere."""
    if kernel is None:
        if not (k.is_cuda and k.dtype == torch.bfloat16 and _kernel_shape_ok(k.shape[-1] // heads) and triton_usable()):
            return rotate_and_store_reference(q, k, v, norm_q, norm_k, eps, rope, prope, kv_buffer, write, heads)
        from .triton_kernels import rotate_store_kernel as kernel
    if k.dtype != torch.bfloat16:
        raise ValueError(f"the fused rotate/store kernel rounds to bfloat16; got {k.dtype}")
    batch, length, width = k.shape
    head_dim = width // heads
    k_buf, v_buf = kv_buffer
    if not _kernel_shape_ok(head_dim) or k_buf.stride(-1) != 1 or k_buf.stride(-2) != head_dim or v_buf.stride() != k_buf.stride():
        raise ValueError("the fused rotate/store kernel needs a power-of-two head_dim >= 4 and K/V buffers [rows, tokens, H, d] "
                         "with contiguous (H, d)")
    cos, sin = (t.float().contiguous() for t in rope)
    indexed = isinstance(write, torch.Tensor)
    idx = write if indexed else cos  # unused pointer when not indexed
    start = 0 if indexed else write.start
    frames = 1 if prope is None else prope.kv.shape[1]
    per_frame = length // frames
    heads_p2 = 1 << (heads - 1).bit_length()

    def launch(src, weight, matrices, dst, branch_stride, batch_stride, tok_stride, norm, rope_on, indexed_on, dst_start):
        kernel[(batch * length,)](
            src, src.stride(0), src.stride(1),
            weight if weight is not None else cos,
            cos, sin,
            matrices if matrices is not None else cos,
            dst, branch_stride, batch_stride, tok_stride,
            idx, dst_start,
            length, per_frame, frames, eps,
            NORM=norm, ROPE=rope_on, PROPE=matrices is not None, INDEXED=indexed_on,
            HEADS=heads, HEADS_P2=heads_p2, D=head_dim,
        )

    m_kv = None if prope is None else prope.kv.contiguous()
    m_q = None if prope is None else prope.q.contiguous()
    buf_rows, buf_tok = k_buf.stride(0), k_buf.stride(1)
    launch(k, norm_k, m_kv, k_buf, batch * buf_rows, buf_rows, buf_tok, True, True, indexed, start)
    launch(v, None, m_kv, v_buf, batch * buf_rows, buf_rows, buf_tok, False, False, indexed, start)
    if q is None:
        return None
    branches = 1 if prope is None else 2
    q_all = torch.empty(branches * batch, length, heads, head_dim, device=q.device, dtype=q.dtype)
    launch(q, norm_q, m_q, q_all, batch * length * width, length * width, width, True, True,
           False, 0)
    return q_all


# -- the FFN's first linear with the GELU (tanh) in the GEMM epilogue -----------------------------


@torch.library.custom_op("worldplay::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(x @ weight.T + bias)``; on CUDA one cuBLASLt GEMM with the bias+GELU epilogue
    (cuBLASLt's GELU is the tanh approximation, the model's). An opaque op to ``torch.compile``,
    so inductor keeps the epilogue instead of decomposing it into a GEMM and a pointwise pass."""
    flat = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        out = torch._addmm_activation(bias, flat, weight.t(), use_gelu=True)
    else:
        out = F.gelu(F.linear(flat, weight, bias), approximate="tanh")
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
