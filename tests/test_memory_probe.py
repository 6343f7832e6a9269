"""scripts/memory_probe.py on the CPU: its settings per variant and its peak attribution."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PROBE = Path(__file__).resolve().parents[1] / "scripts" / "memory_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("memory_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_rollout_variant_has_valid_settings(probe):
    for name in probe.ROLLOUT_VARIANTS:
        settings = probe._settings(name, "cudnn")
        assert settings.num_chunk == probe.NUM_CHUNK
        # the lean variants lend the K/V to the decode with the DiT resident and its graphs kept
        lean = settings.release_kv_for_decode and not settings.dit_on_host and "graphs" in settings.accel
        assert name.startswith("lean") == lean
        if name.startswith("lean-"):
            assert {k: getattr(settings, k) for k in probe.LEAN_CANDIDATES[name]} == probe.LEAN_CANDIDATES[name]


def test_peak_attribution_replays_the_allocator_trace(probe):
    """Live bytes by allocation site at the moment the total is highest (not at the end)."""
    def alloc(addr, size, file):
        return {"action": "alloc", "addr": addr, "size": size,
                "frames": [{"filename": f"/x/worldplay/{file}", "line": 1, "name": "f"}]}

    mib = 2**20
    trace = [alloc(1, 64 * mib, "memory.py"), alloc(2, 128 * mib, "nn/vae.py"),
             {"action": "free_requested", "addr": 2, "size": 128 * mib}, alloc(3, 32 * mib, "nn/dit.py")]
    out = probe.attribute_peak({"device_traces": [trace]})
    assert out["peak_traced_gib"] == round(192 * mib / 2**30, 3)
    assert set(out["by_site_gib"]) == {"memory.py:1:f", "nn/vae.py:1:f"}
