"""The DiT's memory-bound steps in their PyTorch form, and fused versions of them
(``RolloutSettings.fused_kernels``).

The PyTorch form is the one home of their numerics: ``rms_norm`` (q/k RMSNorm),
``rotate_branches`` (RoPE, and PRoPE's per-frame transforms of q, k and v) and ``store_kv``
(the copy of both branches' keys/values into a memory buffer) serve the unfused DiT and are the
reference the kernels are held to (:func:`rotate_and_store_reference`).

Profiled at 704x1280 (notes/perf.md), the work between the q/k/v GEMMs and the attention took
~75 ms per steady chunk in three passes at a quarter of the memory bandwidth.
:func:`rotate_and_store` does it in one pass (a Triton kernel on CUDA), writing keys/values
straight into the buffer. ``linear_gelu_tanh`` moves the FFN's GELU into the GEMM epilogue
(cuBLASLt) instead of a separate pass over its output.

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


def rotate_branches(q, k, v, rope, prope: PRoPE | None):
    """Normalised ``q`` (or None), ``k`` and ``v`` ``[B, L, H, d]`` -> per-branch lists: the RoPE
    branch (q, k rotated; v as is) and, with ``prope``, the camera branch of the *un-rotated*
    q, k, v. Both branches share the keys' positions and the softmax scale, so they run as one
    batch-``2B`` attention."""
    qs = None if q is None else [apply_rope(q, *rope)]
    ks, vs = [apply_rope(k, *rope)], [v]
    if prope is not None:
        if qs is not None:
            qs.append(apply_per_frame(q, prope.q))
        ks.append(apply_per_frame(k, prope.kv))
        vs.append(apply_per_frame(v, prope.kv))
    return qs, ks, vs


def stack_branches(ts: list[torch.Tensor]) -> torch.Tensor:
    """Per-branch ``[B, ...]`` tensors -> ``[branches*B, ...]`` (no copy for one branch)."""
    return torch.cat(ts) if len(ts) > 1 else ts[0]


def store_kv(ks, vs, kv_buffer, write: slice | torch.Tensor) -> None:
    """Copy each branch's keys/values ``[B, L, H, d]`` into its batch rows of the fixed buffers,
    in place, at the token range ``write`` or at the token indices ``write`` (a LongTensor)."""
    k_buf, v_buf = kv_buffer
    batch = ks[0].shape[0]
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
    after writing the keys/values to tokens ``write`` of ``kv_buffer``. ``norm_q``/``norm_k``
    None: q and k come normalised already (a DiT over several ranks normalises across all heads
    before handing each rank its heads, :mod:`worldplay.ranks.sequence`)."""

    def heads_of(t):
        return t.unflatten(-1, (heads, -1))

    def normed(t, weight):
        return t if weight is None else rms_norm(t, weight, eps)

    qn = None if q is None else heads_of(normed(q, norm_q))
    qs, ks, vs = rotate_branches(qn, heads_of(normed(k, norm_k)), heads_of(v), rope, prope)
    store_kv(ks, vs, kv_buffer, write)
    return None if qs is None else stack_branches(qs)


def rotate_and_store(
    q, k, v, norm_q, norm_k, eps, rope, prope: PRoPE | None, kv_buffer, write, heads: int, *, kernel=None
) -> torch.Tensor | None:
    """:func:`rotate_and_store_reference` in one Triton pass on CUDA (or with ``kernel``, e.g.
    the interpreted kernel in tests); the reference elsewhere. ``norm_q``/``norm_k`` None: no
    RMSNorm pass in the kernel (q and k come normalised)."""
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
    launch(k, norm_k, m_kv, k_buf, batch * buf_rows, buf_rows, buf_tok, norm_k is not None, True, indexed, start)
    launch(v, None, m_kv, v_buf, batch * buf_rows, buf_rows, buf_tok, False, False, indexed, start)
    if q is None:
        return None
    branches = 1 if prope is None else 2
    q_all = torch.empty(branches * batch, length, heads, head_dim, device=q.device, dtype=q.dtype)
    launch(q, norm_q, m_q, q_all, batch * length * width, length * width, width, norm_q is not None, True,
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
