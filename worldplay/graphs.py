"""One CUDA-graph helper for the DiT runner (:mod:`worldplay.accel`) and the VAE decoder."""

from __future__ import annotations

import torch


class CapturedCall:
    """``fn()`` captured in a CUDA graph over static input tensors ``statics``: calling it with
    new inputs copies them into the statics, replays, and returns the one static output.

    ``warmups`` calls run first on a side stream, outside the capture (compilation, cuBLAS and
    cuDNN handles); ``restore``, if given, then undoes what they did to state that ``fn``
    updates in place (capture itself runs no kernels)."""

    def __init__(self, fn, statics: dict[str, torch.Tensor], pool=None, warmups: int = 2, restore=None):
        self.statics = statics
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        if restore is not None:
            restore()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn()

    def __call__(self, **inputs: torch.Tensor):
        for name, value in inputs.items():
            self.statics[name].copy_(value)
        self.graph.replay()
        return self.output
