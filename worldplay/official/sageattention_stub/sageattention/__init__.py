"""Stand-in for the ``sageattention`` package, used only by the official-leg harness.

The official HY-WorldPlay DiT does ``from sageattention import sageattn`` and calls
``sageattn(q, k, v, tensor_layout="HND", is_causal=False)``. SageAttention (quantised INT8/FP8
attention kernels) is not installable on the lent machines, so this module answers with
PyTorch's ``scaled_dot_product_attention`` instead: the official leg then runs exact (not
quantised) attention, whichever SDPA backend PyTorch picks (the official code disables cuDNN).

Kept free of Python side effects on purpose (no counters, no prints, no globals written): a
counter here made dynamo recompile the official ``@torch.compile`` block on every call.
This directory is put first on ``sys.path`` by ``worldplay.official.leg`` before the official
code is imported; it is not part of the ``worldplay`` package API.
"""

import torch.nn.functional as F

__all__ = ["sageattn"]


def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, **kwargs):
    """Attention of ``q, k, v`` in layout ``"HND"`` ([B, H, N, D]) or ``"NHD"`` ([B, N, H, D]).

    ``sm_scale`` (SageAttention's name for the softmax scale) maps to SDPA's ``scale``; other
    SageAttention tuning keywords (``smooth_k``, ``pv_accum_dtype``, ...) are accepted and
    ignored, since they only select among quantised kernels.
    """
    if tensor_layout == "HND":
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=sm_scale)
    if tensor_layout == "NHD":
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=is_causal, scale=sm_scale
        )
        return out.transpose(1, 2)
    raise ValueError(f"sageattn stub: tensor_layout must be 'HND' or 'NHD', got {tensor_layout!r}")
