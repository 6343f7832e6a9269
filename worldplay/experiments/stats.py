"""Summary statistics of timing samples: median with p10/p90 spread and the sample count."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def summarize(values: Iterable[float], digits: int = 3) -> dict[str, float | int | None]:
    """``median``, ``p10``, ``p90`` (linear interpolation), ``mean``, ``min``, ``max``, ``n``."""
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    if arr.size == 0:
        return {"n": 0, "median": None, "p10": None, "p90": None, "mean": None, "min": None, "max": None}

    def r(x: float) -> float:
        return round(float(x), digits)

    return {
        "n": int(arr.size),
        "median": r(np.median(arr)),
        "p10": r(np.percentile(arr, 10)),
        "p90": r(np.percentile(arr, 90)),
        "mean": r(arr.mean()),
        "min": r(arr.min()),
        "max": r(arr.max()),
    }
