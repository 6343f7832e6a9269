"""FP8 (e4m3) linear layers for the DiT blocks: a fast approximation, never the default.

On an H100 the DiT's GEMM shapes run at 654-1060 TFLOP/s in fp8 against 596-757 in bf16
(notes/perf.md, probe 1); the linear layers are ~44 % of a steady chunk's FLOPs. Weights are
quantised once per output channel, activations per token at every call (absmax scaling to the
e4m3 range, float32 scales); ``torch._scaled_mm`` multiplies with float32 accumulation and adds
the bf16 bias. Its deviation from the bf16 pipeline is measured by a drift experiment
(``drift-fp8-vs-bf16``), never assumed.

The shared DiT is never changed: :class:`Fp8Linears` holds the fp8 copies of its block linears
and a structural copy of the DiT that runs them (every other module and parameter shared), for a
runner to call (:class:`worldplay.accel.DiTRunner`), so one set of models serves exact and fp8
legs in any order. The text keys/values of cross-attention are computed once per prompt and stay
in bf16.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
# Rows quantised per pass: bounds the float32 quotient (a 16-latent prefill's FFN input,
# 14,080 x 14,336, would be 0.75 GiB at once).
_ROWS_PER_PASS = 4096


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [N, K]`` -> (``x8 [N, K]`` e4m3, ``scale [N, 1]`` float32) with ``x ~ x8 * scale``.

    No float32 copy of ``x`` and no ``|x|`` tensor is made (at a 16-latent prefill the FFN's
    down projection quantises 14,080 x 14,336 activations: 0.75 GiB per float32 copy): the
    max-norm reduces ``|x|`` on the fly and the division promotes ``x`` to float32 inside its
    kernel, a few thousand rows at a time; the same values as ``x.abs().amax()`` and
    ``(x.float() / scale).to(e4m3)``."""
    if torch.compiler.is_compiling():
        # Inside a compiled block inductor fuses the quotient into one kernel (no float32 copy is
        # made), and the eager form below does not compile: its row slices make inductor pad an
        # e4m3 tensor with NaN, which Triton 3.6 cannot build (no ``get_fp8e4nv``; seen on the
        # H200, torch 2.11). The same values either way.
        amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
        scale = amax / E4M3_MAX
        return (x.float() / scale).to(E4M3), scale
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    if x.shape[0] <= _ROWS_PER_PASS:
        return (x / scale).to(E4M3), scale
    x8 = torch.empty(x.shape, dtype=E4M3, device=x.device)
    for r in range(0, x.shape[0], _ROWS_PER_PASS):  # row by row work: the passes change no value
        x8[r : r + _ROWS_PER_PASS] = (x[r : r + _ROWS_PER_PASS] / scale[r : r + _ROWS_PER_PASS]).to(E4M3)
    return x8, scale


class Fp8Linear(nn.Module):
    """``y = x W^T + b`` with W and x in e4m3 (per-row scales), output in x's dtype."""

    def __init__(self, linear: nn.Linear, quantize_on: torch.device | None = None):
        super().__init__()
        # ``quantize_on``: where the quantisation runs (a DiT in host memory is quantised on the
        # GPU, one weight at a time; per-row IEEE arithmetic, the same bytes on either); the fp8
        # weight is kept next to the original.
        weight = linear.weight.detach()
        w8, w_scale = quantize_rows(weight.to(quantize_on or weight.device))
        w8, w_scale = w8.to(weight.device), w_scale.to(weight.device)
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


def _sites(dit: nn.Module) -> list[str]:
    """Dotted paths of every block linear layer that runs per token."""
    sites = []
    for i, block in enumerate(dit.blocks):
        b = f"blocks.{i}"
        sites += [f"{b}.attn1.to_q", f"{b}.attn1.to_k", f"{b}.attn1.to_v", f"{b}.attn1.to_out.0", f"{b}.attn2.to_q",
                  f"{b}.attn2.to_out.0", f"{b}.ffn.net.0.proj", f"{b}.ffn.net.2"]
        if block.attn1.to_out_prope is not None:
            sites.append(f"{b}.attn1.to_out_prope.0")
    return sites


def replace_submodules(root: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``root`` with the submodules at the dotted paths of ``replacements`` swapped.
    Only the modules on those paths are copied (shallowly); every other module, and every
    parameter and buffer, is shared with ``root``, which is left exactly as it was."""
    if not replacements:
        return root
    clone = copy.copy(root)
    # copy.copy shares the registries: give the clone its own, so that nothing set on it lands in root.
    clone._modules = dict(root._modules)
    clone._parameters = dict(root._parameters)
    clone._buffers = dict(root._buffers)
    below: dict[str, dict[str, nn.Module]] = {}
    for path, module in replacements.items():
        head, _, rest = path.partition(".")
        if head not in root._modules:
            raise KeyError(f"{type(root).__name__} has no submodule {head!r} (path {path!r})")
        if rest:
            below.setdefault(head, {})[rest] = module
        else:
            clone._modules[head] = module
    for head, sub in below.items():
        clone._modules[head] = replace_submodules(root._modules[head], sub)
    return clone


class Fp8Linears:
    """fp8 copies of ``dit``'s block linears, quantised once and again whenever a weight changed
    (loading weights bumps the tensors' versions); :meth:`model` is the DiT that runs them. The
    quantisation runs on ``quantize_on`` (default: where each weight is), e.g. the GPU for a DiT
    kept in host memory (``RolloutSettings.dit_on_host``); the copies stay next to the originals."""

    def __init__(self, dit: nn.Module, quantize_on: torch.device | str | None = None):
        self.dit = dit
        self.quantize_on = None if quantize_on is None else torch.device(quantize_on)
        self._versions: list | None = None
        self._model: nn.Module | None = None

    def model(self) -> nn.Module:
        """``dit`` with its block linears in fp8: a structural copy sharing every other module and
        parameter with ``dit`` (see ``replace_submodules``)."""
        sites = _sites(self.dit)
        originals = [self.dit.get_submodule(path) for path in sites]
        versions = [(id(m.weight), m.weight._version) for m in originals]
        if self._model is None or versions != self._versions:
            with torch.no_grad():
                fp8 = {path: Fp8Linear(m, self.quantize_on) for path, m in zip(sites, originals, strict=True)}
            self._model, self._versions = replace_submodules(self.dit, fp8), versions
        return self._model
