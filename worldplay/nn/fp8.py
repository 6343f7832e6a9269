"""FP8 (e4m3) linear layers for the DiT blocks: a fast approximation, never the default.

On an H100 the DiT's GEMM shapes run at 654-1060 TFLOP/s in fp8 against 596-757 in bf16
(notes/perf.md, probe 1); the linear layers are ~44 % of a steady chunk's FLOPs. Weights are
quantised once per output channel, activations per token at every call (absmax scaling to the
e4m3 range, float32 scales); ``torch._scaled_mm`` multiplies with float32 accumulation and adds
the bf16 bias. Its deviation from the bf16 pipeline is measured by a drift experiment
(``drift-fp8-vs-bf16``), never assumed.

:func:`fp8_linears` swaps the blocks' linear layers for their fp8 versions for the duration of a
rollout and puts the originals back afterwards, so one set of models serves exact and fp8 legs.
The text keys/values of cross-attention are computed once per prompt and stay in bf16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [N, K]`` -> (``x8 [N, K]`` e4m3, ``scale [N, 1]`` float32) with ``x ~ x8 * scale``."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (x.float() / scale).to(E4M3), scale


class Fp8Linear(nn.Module):
    """``y = x W^T + b`` with W and x in e4m3 (per-row scales), output in x's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w8, w_scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("weight_scale", w_scale.t().contiguous())  # [1, out]
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        x8, x_scale = quantize_rows(rows)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale, bias=bias,
                             out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def _sites(dit: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every block linear layer that runs per token."""
    sites = []
    for block in dit.blocks:
        a1, a2, ffn = block.attn1, block.attn2, block.ffn
        sites += [(a1, "to_q"), (a1, "to_k"), (a1, "to_v"), (a1.to_out, "0"), (a2, "to_q"), (a2.to_out, "0"),
                  (ffn.net[0], "proj"), (ffn.net, "2")]
        if a1.to_out_prope is not None:
            sites.append((a1.to_out_prope, "0"))
    return sites


@contextlib.contextmanager
def fp8_linears(dit: nn.Module) -> Iterator[None]:
    """Run the DiT's block linears in fp8 inside the ``with`` (quantised once, cached on the DiT)."""
    sites = _sites(dit)
    originals = [getattr(parent, name) for parent, name in sites]
    # Re-quantise when any weight changed since (loading weights bumps the tensors' versions).
    versions = [(id(m.weight), m.weight._version) for m in originals]
    cache = getattr(dit, "_fp8_linears", None)
    if cache is None or cache[0] != versions:
        with torch.no_grad():
            cache = (versions, [Fp8Linear(m) for m in originals])
        dit._fp8_linears = cache
    try:
        for (parent, name), fp8 in zip(sites, cache[1], strict=True):
            setattr(parent, name, fp8)
        yield
    finally:
        for (parent, name), original in zip(sites, originals, strict=True):
            setattr(parent, name, original)
