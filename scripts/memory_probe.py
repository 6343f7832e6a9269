"""GPU memory of one rollout (issue 14), measured against its plan (worldplay.memory_plan), in
one device call.

    PYTHONPATH=. python scripts/memory_probe.py --out DIR [--variant NAME ...] [--attention cudnn]

Each variant runs in its own process (one variant's cached blocks never inflate another's
reserved figure), over w-31 x 8 chunks at 704x1280 with random wan5b weights:

* ``base``: the fastest settings, the default allocator (``expandable_segments:False``): per-stage
  peaks (a synchronising hook around each prefill, step and chunk decode) and the peak's live
  blocks attributed to the code that allocated them (``torch.cuda.memory._record_memory_history``);
* ``expandable``: the same with ``expandable_segments:True`` (reserved should approach allocated);
* ``lean``: the fastest settings + the exact memory levers (worldplay.lowvram.EXACT_LEVERS),
  expandable segments, per-stage peaks and attribution: the target of <= 32 GiB reserved;
* ``decode``: the steady decode alone (compiled, channels-last) per latent group, frame slice
  and weight copy: time (CUDA events, median), transient over what was allocated before, and
  whether the frames equal the 4-latent call's bit for bit;
* ``lowvram-24``, ``lowvram-24-exact``, ``lowvram-16``: the profiles under their caps
  (``set_per_process_memory_fraction``), per-stage peaks and times; the streamed profiles also
  report the H2D bytes per forward and the rate they reached;
* ``lean-g2``, ``lean-g4t8``, ``lean-g4t4``: candidates for the lean leg: the K/V's memory lent
  to the decode under CUDA graphs (``release_kv_for_decode``, ``MemoryKV.lent``) with decoder
  configurations whose transient fits in or near the K/V (latents per call, frames per top slice);
* ``pool``, ``pool-default-alloc``: the lending itself, with and without expandable segments: the
  store comes back at its address and a graph captured over it reads it right;
* ``h2d``: pinned and pageable host -> device copy rates, alone and next to a running matmul.

Writes ``DIR/<variant>.json`` as each finishes and ``DIR/summary.json`` (predicted next to
measured per variant) at the end; a variant that fails records its error and the others go on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's worldplay

GIB = 2**30
HEIGHT, WIDTH, NUM_CHUNK, POSE = 704, 1280, 8, "w-31"
# Candidates for the lean leg (issue 14 target 1): the K/V's memory lent to the decode under CUDA
# graphs, with decoder configurations whose transient fits in or near the K/V's 12.1 GiB.
LEAN_CANDIDATES = {
    "lean-g2": {"release_kv_for_decode": True, "decode_group": 2, "decode_top_frames": 0, "decoder_copy": True},
    "lean-g4t8": {"release_kv_for_decode": True, "decode_group": 4, "decode_top_frames": 8, "decoder_copy": True},
    "lean-g4t4": {"release_kv_for_decode": True, "decode_group": 4, "decode_top_frames": 4, "decoder_copy": True},
}
ROLLOUT_VARIANTS = ("base", "expandable", "lean", *LEAN_CANDIDATES, "lowvram-24", "lowvram-24-exact", "lowvram-16")
VARIANTS = (*ROLLOUT_VARIANTS, "decode", "h2d", "pool", "pool-default-alloc")
ALLOC = {"base": "expandable_segments:False", "pool-default-alloc": "expandable_segments:False"}  # every other variant: expandable segments


def _gib(x: float) -> float:
    return round(x / GIB, 3)


def _settings(name: str, attention: str):
    from worldplay.lowvram import EXACT_LEVERS, profile_settings
    from worldplay.rollout import RolloutSettings, fastest_settings

    base = {**fastest_settings("cuda"), "attention_backend": attention}
    if name == "lean":
        base = {**base, **EXACT_LEVERS}
    elif name in LEAN_CANDIDATES:
        base = {**base, **LEAN_CANDIDATES[name]}
    elif name.startswith("lowvram-"):
        base = profile_settings(name.removeprefix("lowvram-"), base, "cuda")
    return RolloutSettings(num_chunk=NUM_CHUNK, seed=0, **base)


class StagePeaks:
    """Synchronising wrappers recording allocated-before, the peak and reserved of each stage."""

    def __init__(self):
        self.rows: list[dict] = []
        self.chunk = 0

    def wrap(self, owner, name: str, label: str):
        import torch

        original = getattr(owner, name)
        peaks = self

        def wrapped(*args, **kwargs):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = original(*args, **kwargs)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            peaks.rows.append({"chunk": peaks.chunk, "stage": label, "allocated_before_gib": _gib(before),
                               "peak_allocated_gib": _gib(peak), "transient_gib": _gib(peak - before),
                               "reserved_gib": _gib(torch.cuda.memory_reserved()),
                               "peak_reserved_gib": _gib(torch.cuda.max_memory_reserved())})
            return out

        setattr(owner, name, wrapped)

    def summary(self) -> dict:
        by_stage = defaultdict(list)
        for r in self.rows:
            by_stage[r["stage"]].append(r)
        return {s: {"max_transient_gib": max(r["transient_gib"] for r in rows),
                    "max_peak_allocated_gib": max(r["peak_allocated_gib"] for r in rows),
                    "max_peak_reserved_gib": max(r["peak_reserved_gib"] for r in rows)} for s, rows in by_stage.items()}


def _category(frames: list[dict]) -> str:
    """The innermost worldplay frame of an allocation's Python stack, else a coarse label."""
    for f in frames:
        name = f.get("filename", "")
        if "/worldplay/" in name and "memory_probe" not in name:
            return f"{name.split('/worldplay/')[-1]}:{f.get('line')}:{f.get('name')}"
    for f in frames:
        name = f.get("filename", "")
        if "torchinductor" in name or "_inductor" in name:
            return "inductor generated code"
    return "other"


def attribute_peak(snapshot: dict) -> dict:
    """Replay the allocator trace: the live bytes by allocation site at the highest total."""
    live: dict[int, tuple[int, str]] = {}
    by_site: dict[str, int] = defaultdict(int)
    total = best = 0
    best_sites: dict[str, int] = {}
    for trace in snapshot.get("device_traces", []):
        for ev in trace:
            action, addr, size = ev["action"], ev["addr"], ev["size"]
            if action == "alloc":
                site = _category(ev.get("frames", []))
                live[addr] = (size, site)
                by_site[site] += size
                total += size
                if total > best:
                    best, best_sites = total, dict(by_site)
            elif action == "free_requested" and addr in live:
                size0, site = live.pop(addr)
                by_site[site] -= size0
                total -= size0
    top = sorted(best_sites.items(), key=lambda kv: -kv[1])[:30]
    return {"peak_traced_gib": _gib(best), "by_site_gib": {k: _gib(v) for k, v in top if v > 2**24}}


def run_rollout(name: str, args) -> dict:
    import torch

    from worldplay.accel import DiTRunner
    from worldplay.decode_runner import DecodeRunner
    from worldplay.experiments.legs import memory_cap
    from worldplay.lowvram import PROFILES
    from worldplay.memory_plan import plan_memory
    from worldplay.models import random_models, random_text_states
    from worldplay.offload import place_models
    from worldplay.pose import trajectory_from_pose_string
    from worldplay.rollout import WorldPlayPipeline

    torch._dynamo.config.cache_size_limit = 64
    settings = _settings(name, args.attention)
    plan = plan_memory("wan5b", HEIGHT, WIDTH, settings)
    result: dict = {"variant": name, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                    "settings": {k: v for k, v in vars(settings).items()}, "plan": plan.to_dict()}
    history = name in ("base", "lean", *LEAN_CANDIDATES)
    if history:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    t0 = time.perf_counter()
    models = random_models("wan5b", 0, device="cuda")
    place_models(models, settings, "cuda")
    torch.cuda.synchronize()
    result["build_s"] = round(time.perf_counter() - t0, 1)
    result["after_models_allocated_gib"] = _gib(torch.cuda.memory_allocated())
    peaks = StagePeaks()
    peaks.wrap(DiTRunner, "prefill", "prefill")
    peaks.wrap(DiTRunner, "step", "step")
    peaks.wrap(DecodeRunner, "decode", "decode")
    pipe = WorldPlayPipeline(models.dit, models.vae, device="cuda")
    image = torch.rand(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(2)) * 2 - 1
    text = random_text_states("wan5b", 0)
    traj = trajectory_from_pose_string(POSE)
    cap = PROFILES[name.removeprefix("lowvram-")].cap_gib if name.startswith("lowvram-") else (
        (args.lean_cap or None) if name.startswith("lean") else None)
    result["cap_gib"] = cap
    torch.cuda.reset_peak_memory_stats()
    chunks = []
    with memory_cap(torch.device("cuda"), cap):
        for rep in range(args.repetitions):
            t_rollout = time.perf_counter()
            for out in pipe.rollout(image, text, traj, settings):
                chunks.append({"rep": rep, "chunk": out.index, **{k: round(v, 2) for k, v in out.timings_ms.items()},
                               "allocated_gib": _gib(torch.cuda.memory_allocated()),
                               "reserved_gib": _gib(torch.cuda.memory_reserved())})
                peaks.chunk = out.index + 1
            result.setdefault("rollout_wall_s", []).append(round(time.perf_counter() - t_rollout, 2))
            result.setdefault("accel", []).append({**pipe.last_accel_stats.to_dict(),
                                                   "notes": pipe.last_accel_stats.notes})
    torch.cuda.synchronize()
    # The stage hooks reset the peak counters: the rollout's peak is the largest of theirs.
    result["rollout_peak_allocated_gib"] = max([_gib(torch.cuda.max_memory_allocated())]
                                               + [r["peak_allocated_gib"] for r in peaks.rows])
    result["rollout_peak_reserved_gib"] = max([_gib(torch.cuda.max_memory_reserved())]
                                              + [r["peak_reserved_gib"] for r in peaks.rows])
    stats = torch.cuda.memory_stats()
    result["allocator"] = {k: stats.get(k) for k in ("num_alloc_retries", "num_ooms", "num_device_alloc",
                                                     "inactive_split_bytes.all.peak", "active_bytes.all.peak")}
    result["chunks"] = chunks
    steady = [c for c in chunks if c["chunk"] >= 5]
    for key in ("prefill", "decode", "dit"):
        vals = [c[key] for c in steady if key in c]
        if vals:
            result[f"steady_{key}_ms"] = round(statistics.median(vals), 1)
    placed = pipe.placed_dit(settings)
    if placed is not None and placed.blocks.streamed:
        per_forward = placed.host_nbytes
        result["streamed_gib_per_forward"] = _gib(per_forward)
        if "steady_dit_ms" in result:  # 5 forwards per chunk: a lower bound of the rate reached
            result["h2d_gb_s_needed_at_this_dit_time"] = round(5 * per_forward / (result["steady_dit_ms"] / 1e3) / 1e9, 1)
    result["stage_peaks"] = peaks.summary()
    result["stage_rows"] = peaks.rows
    snap = torch.cuda.memory._snapshot()
    pools = defaultdict(int)
    for seg in snap["segments"]:
        pool = "private pool (CUDA graphs)" if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0) else "default pool"
        pools[pool] += seg["total_size"]
    result["segments_gib"] = {k: _gib(v) for k, v in pools.items()}
    if history:
        result["peak_attribution"] = attribute_peak(snap)
        torch.cuda.memory._record_memory_history(enabled=None)
    return result


def run_decode(args) -> dict:
    """The steady decode alone, per (latents per call, frames per top-stage slice, weight copy)."""
    import torch

    from worldplay.decode_runner import DecodeOptions, DecodeRunner
    from worldplay.models import random_models

    torch._dynamo.config.cache_size_limit = 64
    vae = random_models("wan5b", 0, device="cuda").vae
    steady = 6  # timed chunks per variant (after chunk 0, fresh, and chunk 1, which compiles)
    z = torch.randn(1, 48, 4 * (steady + 2), HEIGHT // 16, WIDTH // 16, generator=torch.Generator().manual_seed(0)).to(
        "cuda", torch.bfloat16)
    variants = [(4, None, True), (2, None, True), (4, 8, True), (4, 4, True), (2, 4, True), (4, None, True)]
    rows, reference = [], None
    for group, top, copy in variants:
        runner = DecodeRunner(vae, DecodeOptions(compile=True, channels_last=True, copy_weights=copy, group=group,
                                                 top_frames=top))
        state = runner.new_decode_state(1, HEIGHT // 16, WIDTH // 16, device="cuda", dtype=torch.bfloat16)
        frames, times, transients = [], [], []
        for c in range(steady + 2):  # chunk 0 (fresh, eager), chunk 1 (compiles), then the timed ones
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            frames.append(runner.decode(z[:, :, 4 * c : 4 * c + 4], state))
            end.record()
            torch.cuda.synchronize()
            if c >= 2:  # c = 1 compiles
                times.append(start.elapsed_time(end))
                transients.append(torch.cuda.max_memory_allocated() - before)
        video = torch.cat(frames, 2)
        if reference is None:
            reference = video
        rows.append({"group": group, "top_frames": top, "copy_weights": copy,
                     "steady_ms": [round(t, 2) for t in times],
                     "median_ms": round(statistics.median(times), 2), "transient_gib": [_gib(t) for t in transients],
                     "weight_copy_gib": _gib(runner.weight_copy_nbytes),
                     "max_abs_diff_vs_first": float((video.float() - reference.float()).abs().max()),
                     "identical_to_first": bool(torch.equal(video, reference))})
        print(json.dumps(rows[-1]), flush=True)
        del runner, state, frames, video
        torch.cuda.empty_cache()
    return {"variant": "decode", "rows": rows}


def run_h2d(args) -> dict:
    import torch

    def rate(src, dst, busy: bool = False) -> float:
        side = torch.cuda.Stream()
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(2):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            if busy:  # a matmul stream keeps the SMs and HBM busy meanwhile, as the DiT would
                for _ in range(20):
                    a @ a
            with torch.cuda.stream(side):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(side)
                dst.copy_(src, non_blocking=True)
                end.record(side)
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return round(src.numel() / statistics.median(times) / 1e9, 1)

    size = 2 * GIB
    pinned = torch.empty(size, dtype=torch.uint8).pin_memory()
    pageable = torch.empty(size, dtype=torch.uint8)
    dev = torch.empty(size, dtype=torch.uint8, device="cuda")
    return {"variant": "h2d", "pinned_gb_s": rate(pinned, dev), "pageable_gb_s": rate(pageable, dev),
            "pinned_next_to_matmuls_gb_s": rate(pinned, dev, busy=True)}


def run_pool(args) -> dict:
    """The K/V's memory lent to other work (``MemoryKV.lent``) under this allocator setting: the
    store comes back at its address after the lent code allocated more than the store and freed
    it, and a CUDA graph that read the store before reads it right after."""
    import torch

    from worldplay.memory import MemoryKV

    kv = MemoryKV(2, 1, 2, 4096, 24, 128, device="cuda", dtype=torch.bfloat16, lend_pool=True)  # 0.23 GiB
    first = kv.addresses
    out = torch.zeros(1, device="cuda")
    graph = torch.cuda.CUDAGraph()
    kv.k.fill_(1.0)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out.copy_(kv.k.float().sum().reshape(1))
    rounds = []
    for size in (kv.nbytes // 2, kv.nbytes, 3 * kv.nbytes):  # within, equal to, beyond the store
        with kv.lent():
            scratch = [torch.ones(size // 4, device="cuda", dtype=torch.float32) for _ in range(2)]
            inside = [t.data_ptr() for t in scratch]
            del scratch
        kv.k.fill_(2.0)
        graph.replay()
        torch.cuda.synchronize()
        rounds.append({"lent_bytes": 2 * size, "scratch_addresses_in_store": sum(first[0] <= a < first[0] + kv.nbytes
                                                                                for a in inside),
                       "same_address": kv.addresses == first, "graph_reads": float(out.item()),
                       "expected": float(kv.k.numel() * 2.0)})
    return {"variant": "pool", "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "rounds": rounds,
            "moves": kv.moves, "acquisitions": kv.acquisitions}


def run_variant(name: str, args) -> dict:
    if name.startswith("pool"):
        return run_pool(args)
    if name == "decode":
        return run_decode(args)
    if name == "h2d":
        return run_h2d(args)
    return run_rollout(name, args)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--variant", action="append", choices=VARIANTS)
    p.add_argument("--attention", default="cudnn")
    p.add_argument("--repetitions", type=int, default=1)
    p.add_argument("--lean-cap", type=float, default=32.0,
                   help="the lean variant's cap in GiB (0: none, to see where its peak is when it would not fit)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        try:
            res = run_variant(args.child, args)
        except Exception as exc:  # noqa: BLE001 - recorded, and the next variant runs
            res = {"variant": args.child, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        (out / f"{args.child}.json").write_text(json.dumps(res, indent=1, default=str))
        return 0
    summary = {}
    for name in args.variant or VARIANTS:
        env = dict(os.environ)
        env.pop("PYTORCH_ALLOC_CONF", None)
        env["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC.get(name, "expandable_segments:True")
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, __file__, "--out", str(out), "--child", name,
                              "--attention", args.attention, "--repetitions", str(args.repetitions),
                              "--lean-cap", str(args.lean_cap)], env=env)
        path = out / f"{name}.json"
        res = json.loads(path.read_text()) if path.exists() else {}
        keep = ("error", "alloc_conf", "cap_gib", "rollout_peak_allocated_gib", "rollout_peak_reserved_gib",
                "steady_prefill_ms", "steady_dit_ms", "steady_decode_ms", "stage_peaks", "segments_gib",
                "streamed_gib_per_forward", "h2d_gb_s_needed_at_this_dit_time", "pinned_gb_s", "pageable_gb_s",
                "pinned_next_to_matmuls_gb_s", "rows", "rounds", "moves", "accel")
        summary[name] = {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1), **{k: res[k] for k in keep if k in res}}
        if "plan" in res:
            summary[name]["predicted_peak_allocated_gib"] = res["plan"]["peak_allocated_gib"]
            summary[name]["predicted_stage_gib"] = res["plan"]["stage_gib"]
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        print(json.dumps({k: v for k, v in summary[name].items() if k != "rows"}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
