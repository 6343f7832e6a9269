"""Harness for running the *official* HY-WorldPlay WAN pipeline next to ours (parity, benchmarks).

The official code is never part of this package: :class:`OfficialLeg` imports it at run time from
a checkout path. Importing ``worldplay.official`` needs neither that code nor its pinned
dependency versions. See ``worldplay/official/leg.py`` and ``scripts/official_rollout.py``.
"""

from .leg import (
    LAUNCH_HINT,
    OFFICIAL_COMMIT,
    STUB_DIR,
    ChunkResult,
    OfficialLeg,
    OfficialLegError,
    export_weights,
    official_sys_path,
    read_official_commit,
    set_compile,
)

__all__ = [
    "LAUNCH_HINT",
    "OFFICIAL_COMMIT",
    "STUB_DIR",
    "ChunkResult",
    "OfficialLeg",
    "OfficialLegError",
    "export_weights",
    "official_sys_path",
    "read_official_commit",
    "set_compile",
]
