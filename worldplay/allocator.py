"""The CUDA caching allocator's configuration, chosen before CUDA starts.

With the default allocator the fastest settings reserved 70.5 GiB for a 48.6 GiB peak (the H200
bench of issue 14): blocks cached for one stage's shapes (a DiT forward's, a 16-frame decoder
call's) are not reusable for the other's. ``expandable_segments:True`` maps memory into segments
that grow and whose freed pages serve any later size, so reserved stays near allocated. It must
be set before the first CUDA allocation; a user's own setting always wins. The provenance of
every result records the variable (``worldplay.experiments.provenance``).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

EXPANDABLE = "expandable_segments:True"
# PYTORCH_ALLOC_CONF is the newer name of the same setting (torch >= 2.9 reads both).
_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def configure_allocator(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Turn on expandable segments unless the allocator is configured already (either variable
    set, even to an empty value). Returns what was set, or None. Call it before CUDA starts."""
    if any(name in environ for name in _VARIABLES):
        return None
    environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE
    return EXPANDABLE


def reset_peaks(device) -> None:
    """Start a fresh peak measurement on ``device`` (CUDA: after the queued work is done)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def read_peaks(device) -> dict:
    """The peak memory since :func:`reset_peaks`: the CUDA allocator's peak allocated and
    reserved (GiB), or on the CPU the process's peak RSS so far (it only ever grows)."""
    import resource

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3)}
    return {"host_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
