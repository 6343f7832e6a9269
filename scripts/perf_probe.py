"""One device call of performance measurements for the notes (issue 6), written as it goes.

    PYTHONPATH=. python scripts/perf_probe.py --out probe.json [--sections attn,gemm,rollouts,profile]

* ``attn``: every attention shape of a steady chunk on each available kernel (cuDNN, flash,
  FA4 if ``flash-attn-4`` imports), TFLOP/s and the error of each against cuDNN;
* ``gemm``: the DiT's GEMM shapes in bf16 (``F.linear``) and fp8 e4m3 (``torch._scaled_mm``,
  row-wise scales), TFLOP/s, plus the bf16 8192^3 ceiling;
* ``rollouts``: w-27, 7 chunks, steady chunks 4-6 (medians), fastest settings with each
  attention backend and memory mode, with accel counters and latent error vs the first;
* ``fused``: worldplay.nn.fused at the steady chunk's shapes (agreement with the reference,
  time against the unfused work, the GELU epilogue);
* ``decode``: the steady VAE decode alone with each fast-decode option (graphs, coordinate-descent
  tuning, a widened head conv), its kernel profile, and the head conv's shape alone;
* ``profile``: kernel time of one steady chunk, compiled blocks without graphs (so the
  kernels are visible), grouped into attention / GEMM / fused elementwise / copies / other.

Random weights (seeded), wan5b, 704x1280. The JSON is rewritten after every section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")

from backbone_h100 import cuda_time_ms  # noqa: E402  (scripts/ is on sys.path when run as a script)

from worldplay.nn.attention import attention  # noqa: E402

RESULTS: dict = {}


def save(path: str) -> None:
    with open(path, "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def cuda_ms(fn, reps: int = 10, warmup: int = 3) -> float:
    return statistics.median(cuda_time_ms(fn, warmup=warmup, reps=reps))


def fa4_available() -> str | None:
    try:
        from importlib.metadata import version

        import flash_attn.cute.interface  # noqa: F401

        return version("flash-attn-4")
    except Exception as exc:  # noqa: BLE001
        RESULTS["fa4_import_error"] = repr(exc)
        return None


def section_attn(backends: list[str]) -> dict:
    heads, d = 24, 128
    shapes = {  # name: (batch = branches, Lq, Lk)
        "step (chunk vs 16 memory + chunk)": (2, 3520, 17600),
        "prefill (16 memory frames)": (2, 14080, 14080),
        "reuse partial (4 new vs 16 memory)": (2, 3520, 14080),
        "one branch, step": (1, 3520, 17600),
    }
    out = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (b, lq, lk) in shapes.items():
        q = torch.randn(b, lq, heads, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(b, lk, heads, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(b, lk, heads, d, device="cuda", dtype=torch.bfloat16, generator=g)
        flop = 4 * b * heads * d * lq * lk
        ref = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend="cudnn").float()
        row = {}
        for be in backends:
            try:
                def fn(be=be, q=q, k=k, v=v):
                    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend=be)

                ms = cuda_ms(fn)
                o = fn().float()
                row[be] = {"ms": round(ms, 3), "tflops": round(flop / ms / 1e9, 1),
                           "rel_err_vs_cudnn": float((o - ref).norm() / ref.norm())}
            except Exception as exc:  # noqa: BLE001
                row[be] = {"error": repr(exc)[:500]}
        out[name] = row
        print("attn", name, json.dumps(row), flush=True)
    return out


def section_gemm() -> dict:
    out = {}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = cuda_ms(lambda: a @ a, reps=20)
    out["bf16 8192^3"] = {"ms": round(ms, 3), "tflops": round(2 * 8192**3 / ms / 1e9, 1)}
    shapes = {  # (M tokens, K in, N out)
        "step q/k/v/o (3520x3072x3072)": (3520, 3072, 3072),
        "step fused qkv (3520x3072x9216)": (3520, 3072, 9216),
        "step ffn up (3520x3072x14336)": (3520, 3072, 14336),
        "step ffn down (3520x14336x3072)": (3520, 14336, 3072),
        "prefill q/k/v/o (14080x3072x3072)": (14080, 3072, 3072),
        "prefill ffn up (14080x3072x14336)": (14080, 3072, 14336),
        "prefill ffn down (14080x14336x3072)": (14080, 14336, 3072),
    }
    for name, (m, k, n) in shapes.items():
        out[name] = _gemm_row(m, k, n)
        print("gemm", name, json.dumps(out[name]), flush=True)
    return out


def _gemm_row(m: int, k: int, n: int) -> dict:
    fp8 = torch.float8_e4m3fn
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    flop = 2 * m * k * n
    row = {"bf16": cuda_ms(lambda: F.linear(x, w, bias))}
    try:
        x8, w8 = x.to(fp8), w.to(fp8)
        sx = torch.ones(m, 1, device="cuda", dtype=torch.float32)
        sw = torch.ones(1, n, device="cuda", dtype=torch.float32)
        row["fp8_rowwise"] = cuda_ms(lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, bias=bias,
                                                              out_dtype=torch.bfloat16))

        def quant():  # dynamic per-row activation quantisation, as a fast mode would do it
            s = x.abs().amax(-1, keepdim=True).float() / 448.0
            return (x / s).to(fp8), s

        row["fp8_act_quant_eager"] = cuda_ms(quant)
    except Exception as exc:  # noqa: BLE001
        row["fp8_error"] = repr(exc)[:300]
    res = {k2: (round(v, 3) if isinstance(v, float) else v) for k2, v in row.items()}
    res["tflops"] = {k2: round(flop / v / 1e9, 1) for k2, v in row.items()
                     if isinstance(v, float) and "quant" not in k2}
    return res


def section_fused() -> dict:
    """worldplay.nn.fused at the steady chunk's shapes: the Triton rotate/store kernel against
    the eager reference (agreement) and against inductor's fusion of the same work plus the
    eager stores (time), and the GELU epilogue GEMM against GEMM + GELU."""
    g = torch.Generator(device="cuda").manual_seed(0)
    out: dict = {}
    for name, frames in (("prefill", 16), ("step", 4)):
        out[name] = _rotate_case(frames, g)
        print("fused", name, json.dumps(out[name]), flush=True)
    for name, m in (("prefill", 14080), ("step", 3520)):
        out[f"gelu_{name}"] = _gelu_case(m, g)
        print("fused", f"gelu_{name}", json.dumps(out[f"gelu_{name}"]), flush=True)
    return out


def _rotate_case(frames: int, g, slots: int = 20) -> dict:
    from worldplay.nn.fused import rms_norm, rotate_and_store, rotate_and_store_reference
    from worldplay.nn.prope import PRoPE, apply_per_frame
    from worldplay.nn.rope import apply_rope, rope_tables

    heads, d, width, per_frame, bf16 = 24, 128, 3072, 880, torch.bfloat16
    length = frames * per_frame
    q, k, v = (torch.randn(1, length, width, device="cuda", dtype=bf16, generator=g) * 2 for _ in range(3))
    w_q = (1 + 0.1 * torch.randn(width, device="cuda", generator=g)).to(bf16)
    w_k = torch.ones(width, device="cuda", dtype=bf16)
    cos, sin = rope_tables(torch.arange(frames, dtype=torch.float64), 22, 40, d)
    rope = (cos.cuda(), sin.cuda())
    view = torch.eye(4, device="cuda").repeat(1, frames, 1, 1)
    view[..., :3, 3] = torch.randn(1, frames, 3, device="cuda", generator=g)
    intr = torch.tensor([[0.9, 0, 0.5], [0, 1.6, 0.5], [0, 0, 1]], device="cuda").expand(1, frames, 3, 3)
    prope = PRoPE.from_cameras(view, intr, bf16)
    write = slice((slots - frames) * per_frame, slots * per_frame)

    def buffers():
        return tuple(torch.zeros(2, slots * per_frame, heads, d, device="cuda", dtype=bf16) for _ in range(2))

    ref_buf, fused_buf, buf = buffers(), buffers(), buffers()
    ref_q = rotate_and_store_reference(q, k, v, w_q, w_k, 1e-6, rope, prope, ref_buf, write, heads)
    fused_q = rotate_and_store(q, k, v, w_q, w_k, 1e-6, rope, prope, fused_buf, write, heads)
    agree = {}
    for label, a, b in (("q", ref_q, fused_q), ("k", ref_buf[0], fused_buf[0]), ("v", ref_buf[1], fused_buf[1])):
        diff = (a.float() - b.float()).abs()
        agree[label] = {"frac_differ": float((diff > 0).float().mean()), "max_abs": float(diff.max()),
                        "rel_err": float(diff.norm() / a.float().norm())}

    def unfused_math(q, k, v):  # what the compiled blocks fuse today (both branches)
        qn, kn = rms_norm(q, w_q, 1e-6).unflatten(-1, (heads, -1)), rms_norm(k, w_k, 1e-6).unflatten(-1, (heads, -1))
        vh = v.unflatten(-1, (heads, -1))
        q_all = torch.cat([apply_rope(qn, *rope), apply_per_frame(qn, prope.q)])
        return q_all, (apply_rope(kn, *rope), apply_per_frame(kn, prope.kv)), (vh, apply_per_frame(vh, prope.kv))

    compiled = torch.compile(unfused_math, dynamic=False)

    def unfused():
        _, ks, vs = compiled(q, k, v)
        for i in range(2):
            buf[0][i:i + 1, write].copy_(ks[i])
            buf[1][i:i + 1, write].copy_(vs[i])

    t_unfused = cuda_ms(unfused, reps=20)
    t_fused = cuda_ms(lambda: rotate_and_store(q, k, v, w_q, w_k, 1e-6, rope, prope, fused_buf, write, heads), reps=20)
    nbytes = 9 * length * width * 2
    return {"tokens": length, "unfused_ms": round(t_unfused, 3), "fused_ms": round(t_fused, 3),
            "fused_GBps": round(nbytes / t_fused / 1e6, 1), "unfused_GBps": round(nbytes / t_unfused / 1e6, 1),
            "agreement": agree}


def _gelu_case(m: int, g) -> dict:
    from worldplay.nn.fused import linear_gelu_tanh

    bf16 = torch.bfloat16
    x = torch.randn(m, 3072, device="cuda", dtype=bf16, generator=g)
    w = torch.randn(14336, 3072, device="cuda", dtype=bf16, generator=g) / 3072**0.5
    b = torch.randn(14336, device="cuda", dtype=bf16, generator=g) * 0.1
    ref32 = F.gelu(x.float() @ w.float().t() + b.float(), approximate="tanh")

    def err(y):
        return float((y.float() - ref32).norm() / ref32.norm())

    return {
        "linear_then_gelu_ms": round(cuda_ms(lambda: F.gelu(F.linear(x, w, b), approximate="tanh"), reps=20), 3),
        "epilogue_ms": round(cuda_ms(lambda: linear_gelu_tanh(x, w, b), reps=20), 3),
        "linear_only_ms": round(cuda_ms(lambda: F.linear(x, w, b), reps=20), 3),
        "rel_err_two_pass": err(F.gelu(F.linear(x, w, b), approximate="tanh")),
        "rel_err_epilogue": err(linear_gelu_tanh(x, w, b)),
        "rel_err_erf_gelu": err(F.gelu(F.linear(x, w, b))),
    }


def _padded_conv_out(vae, channels: int) -> None:
    """Probe-only: give the decoder's head conv (256 -> 12 channels) ``channels`` output
    channels, the extra ones zero, and slice them off again (a different cuDNN kernel)."""
    from worldplay.nn.vae import CausalConv3d

    inner = vae.decoder.conv_out
    wide = CausalConv3d(inner.in_channels, channels).to(inner.weight.device, inner.weight.dtype)
    with torch.no_grad():
        wide.weight.zero_()
        wide.bias.zero_()
        wide.weight[: inner.out_channels].copy_(inner.weight)
        wide.bias[: inner.out_channels].copy_(inner.bias)
    wide.cache_slot = inner.cache_slot

    class Sliced(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = wide

        def forward(self, x, state):
            return self.inner(x, state)[:, : inner.out_channels]

    vae.decoder.conv_out = Sliced()


def section_head_conv() -> dict:
    """The decoder's head conv shape alone (256 channels at 18x352x640 in, 16 frames out) with
    12 (the real width) or more output channels, per memory format."""
    out = {}
    g = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(1, 256, 18, 352, 640, device="cuda", dtype=torch.bfloat16, generator=g)
    for fmt_name, fmt in (("channels_last", torch.channels_last_3d), ("contiguous", torch.contiguous_format)):
        xf = x.contiguous(memory_format=fmt)
        for n in (12, 16, 32, 64):
            w = torch.randn(n, 256, 3, 3, 3, device="cuda", dtype=torch.bfloat16, generator=g)
            w = (w / 83).contiguous(memory_format=fmt)
            b = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
            ms = cuda_ms(lambda w=w, b=b, xf=xf: F.conv3d(xf, w, b, padding=(0, 1, 1)), reps=10, warmup=2)
            out[f"{fmt_name}/{n}"] = round(ms, 3)
            print("head conv", fmt_name, n, out[f"{fmt_name}/{n}"], flush=True)
    return out


def section_decode(vae) -> dict:
    """The steady VAE decode alone (16 frames at 704x1280): its time with each fast-decode
    option (compiled, channels-last; with CUDA graphs; with inductor's coordinate-descent
    tuning; with the head conv widened), agreement with the first, and a kernel profile."""
    from torch.profiler import ProfilerActivity, profile

    from worldplay.decode_runner import DecodeOptions, DecodeRunner

    g = torch.Generator(device="cuda").manual_seed(5)
    latents = torch.randn(1, 48, 4, 44, 80, device="cuda", dtype=torch.bfloat16, generator=g)
    out: dict = {}
    cl = {"compile": True, "channels_last": True}
    variants = {"compile+channels_last": (cl, {}, 0),  # first: the reference and the profile
                "compile+channels_last+graphs": ({**cl, "graphs": True}, {}, 0),
                "compile+channels_last+coordinate_descent": (cl, {"coordinate_descent_tuning": True}, 0),
                "compile+channels_last+head16": (cl, {}, 16),
                "compile+channels_last+head32": (cl, {}, 32)}
    original_head = vae.decoder.conv_out
    reference = None
    for name, (opts, inductor, head) in variants.items():
        try:
            vae.decoder.conv_out = original_head
            if head:
                _padded_conv_out(vae, head)
            runner = DecodeRunner(vae, DecodeOptions(**opts))  # copies the (widened) channels-last decoder
            state = runner.new_decode_state(1, 44, 80)
            t0 = time.perf_counter()
            with torch._inductor.config.patch(**inductor):
                for _ in range(3):  # the fresh call, then steady calls (compile)
                    video = runner.decode(latents, state)
            torch.cuda.synchronize()
            warm_s = time.perf_counter() - t0
            if reference is None:
                reference = video.float()
            err = float((video.float() - reference).abs().max())
            ms = round(cuda_ms(lambda state=state, runner=runner: runner.decode(latents, state), reps=7, warmup=1), 2)
            out[name] = {"ms": ms, "max_abs_diff_vs_first": err, "warm_s": round(warm_s, 1)}
            print("decode", name, json.dumps(out[name]), flush=True)
            if name == "compile+channels_last":
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    runner.decode(latents, state)
                    torch.cuda.synchronize()
                kernels: dict[str, list] = {}
                for evt in prof.events():
                    if evt.device_type == torch.autograd.DeviceType.CUDA:
                        rec = kernels.setdefault(evt.name, [0.0, 0])
                        rec[0] += evt.device_time / 1e3
                        rec[1] += 1
                top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:60]
                out["profile_total_ms"] = round(sum(ms for ms, _ in kernels.values()), 2)
                out["top_kernels"] = [{"name": n[:160], "ms": round(ms, 2), "calls": c} for n, (ms, c) in top]
                for row in out["top_kernels"][:40]:
                    print(f"  {row['ms']:9.2f} ms {row['calls']:6d}  {row['name'][:120]}", flush=True)
        except Exception:  # noqa: BLE001
            out[name] = {"error": traceback.format_exc()[-3000:]}
            print(name, out[name]["error"], flush=True)
        save(ARGS.out)
    vae.decoder.conv_out = original_head
    return out


def build():
    from worldplay.models import random_models, random_text_states

    t0 = time.perf_counter()
    models = random_models("wan5b", 0, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(3)
    image = torch.rand(3, 704, 1280, device="cuda", generator=g) * 2 - 1
    text = random_text_states("wan5b", 0)
    RESULTS["build_s"] = round(time.perf_counter() - t0, 1)
    return models, image, text


def run_rollout(pipe, image, text, traj, num_chunk, decode_options=None, **settings):
    from worldplay.rollout import RolloutSettings

    rows, latents = [], []
    t0 = time.perf_counter()
    allocs = {}
    for out in pipe.rollout(image, text, traj, RolloutSettings(num_chunk=num_chunk, **settings),
                            decode_options=decode_options):
        rows.append({k: round(v, 2) for k, v in out.timings_ms.items()})
        latents.append(out.latents)
        if out.index in (3, num_chunk - 1):  # the allocator's device allocations over the steady chunks
            stats = torch.cuda.memory_stats()
            allocs[out.index] = {k: stats.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}
    wall = time.perf_counter() - t0
    steady = rows[4:]
    med = lambda key: statistics.median(r.get(key, 0.0) for r in steady)  # noqa: E731
    steps = statistics.median(sum(r[f"step{i}"] for i in range(4)) for r in steady)
    return {
        "settings": settings, "wall_s": round(wall, 1), "chunks": rows,
        "steady_prefill_ms": med("prefill"), "steady_steps_ms": steps, "steady_dit_ms": med("dit"),
        "steady_decode_ms": med("decode"), "steady_kv_move_ms": med("kv_move"), "steady_total_ms": med("dit") + med("decode") + med("select"),
        "accel": pipe.last_accel_stats.to_dict(),
        "allocator_steady": {k: allocs[num_chunk - 1][k] - allocs[3][k] for k in allocs.get(3, {})},
    }, latents


def section_rollouts(pipe, image, text, variants: list[dict]) -> dict:
    from worldplay.decode_runner import DecodeOptions
    from worldplay.pose import trajectory_from_pose_string

    traj = trajectory_from_pose_string("w-27")
    out, base = {}, None
    for v in variants:
        name = "/".join(f"{k}={val}" for k, val in v.items())
        name = name if name not in out else f"{name} (again)"
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        settings = dict(v)
        torch.backends.cudnn.benchmark = settings.pop("cudnn_benchmark", False)  # a probe-only switch
        # probe-only: the fast decode with CUDA graphs (the pipeline keeps one decode runner per
        # options, so switching back and forth compiles each decoder once)
        graphs = settings.pop("decode_graphs", False)
        decode_options = DecodeOptions(compile=True, channels_last=True, graphs=graphs)
        try:
            res, lat = run_rollout(pipe, image, text, traj, 7, decode_options=decode_options, accel="compile+graphs",
                                   fast_decode=True, **settings)
            if base is None:
                base = lat
            res["latent_rel_err_vs_first"] = [float((a - b).norm() / b.norm()) for a, b in zip(lat, base, strict=True)]
            out[name] = res
            print("rollout", name, json.dumps({k: val for k, val in res.items() if k != "chunks"}), flush=True)
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": traceback.format_exc()[-3000:]}
            print("rollout", name, "FAILED", repr(exc), flush=True)
        RESULTS["rollouts"] = out
        save(ARGS.out)
    return out


CATEGORIES = (
    ("attention", ("fmha", "flash", "attention", "sdpa", "cudnn", "fprop_sm90")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "gmma")),
    ("fused elementwise (triton)", ("triton",)),
    ("copies", ("copy", "cat", "elementwise_kernel_manual_unroll", "direct_copy")),
)


def categorise(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def section_profile(pipe, image, text, backend: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from worldplay.pose import trajectory_from_pose_string
    from worldplay.rollout import RolloutSettings

    traj = trajectory_from_pose_string("w-27")
    settings = RolloutSettings(num_chunk=6, accel="compile", attention_backend=backend, fast_decode=True,
                               fused_kernels=ARGS.profile_fused)
    gen = pipe.rollout(image, text, traj, settings)
    for _ in range(5):
        next(gen)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        chunk = next(gen)
        torch.cuda.synchronize()
    gen.close()  # frees the rollout's buffers before the next section
    kernels: dict[str, list] = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        rec = kernels.setdefault(evt.name, [0.0, 0])
        rec[0] += evt.device_time / 1e3
        rec[1] += 1
    cats: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        cats[categorise(name)] = cats.get(categorise(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:40]
    res = {"chunk_timings_ms": chunk.timings_ms, "categories_ms": {k: round(v, 1) for k, v in cats.items()},
           "top_kernels": [{"name": n[:160], "ms": round(ms, 2), "calls": c, "category": categorise(n)}
                           for n, (ms, c) in top]}
    print("profile", json.dumps(res["categories_ms"]), json.dumps(chunk.timings_ms), flush=True)
    for row in res["top_kernels"][:25]:
        print(f"  {row['ms']:9.2f} ms {row['calls']:6d}  {row['category']:28s} {row['name'][:110]}", flush=True)
    return res


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", default="attn,gemm,rollouts,profile")
    ap.add_argument("--profile-backend", default="cudnn")
    ap.add_argument("--profile-fused", action="store_true", help="profile with fused_kernels")
    ap.add_argument("--rollout-set", choices=("all", "decode"), default="all", help="which rollout variants")
    ARGS = ap.parse_args()
    sections = ARGS.sections.split(",")
    RESULTS["gpu"] = torch.cuda.get_device_name()
    RESULTS["torch"] = torch.__version__
    RESULTS["cudnn"] = torch.backends.cudnn.version()
    fa4 = fa4_available()
    RESULTS["fa4"] = fa4
    print("env", json.dumps(RESULTS), flush=True)
    backends = ["cudnn", "flash"] + (["fa4"] if fa4 else [])
    if "attn" in sections:
        RESULTS["attn"] = section_attn(backends)
        save(ARGS.out)
    if "gemm" in sections:
        RESULTS["gemm"] = section_gemm()
        save(ARGS.out)
    if "fused" in sections:
        try:
            RESULTS["fused"] = section_fused()
        except Exception:  # noqa: BLE001
            RESULTS["fused"] = {"error": traceback.format_exc()[-3000:]}
            print(RESULTS["fused"]["error"], flush=True)
        save(ARGS.out)
    if "rollouts" in sections or "profile" in sections or "decode" in sections:
        from worldplay.rollout import WorldPlayPipeline

        models, image, text = build()
        if "decode" in sections:
            try:
                RESULTS["head_conv"] = section_head_conv()
            except Exception:  # noqa: BLE001
                RESULTS["head_conv"] = {"error": traceback.format_exc()[-3000:]}
            try:
                RESULTS["decode"] = section_decode(models.vae)
            except Exception:  # noqa: BLE001
                RESULTS["decode"] = {"error": traceback.format_exc()[-3000:]}
                print(RESULTS["decode"]["error"], flush=True)
            save(ARGS.out)
        pipe = WorldPlayPipeline(models.dit, models.vae, device="cuda")
        if "profile" in sections:
            try:
                RESULTS["profile"] = section_profile(pipe, image, text, ARGS.profile_backend)
            except Exception:  # noqa: BLE001
                RESULTS["profile"] = {"error": traceback.format_exc()[-3000:]}
                print(RESULTS["profile"]["error"], flush=True)
            save(ARGS.out)
        if "rollouts" in sections:
            best = "fa4" if fa4 else "cudnn"
            fused = {"attention_backend": best, "fused_kernels": True}
            reuse = {**fused, "memory_mode": "reuse"}
            variants = {"all": [{"attention_backend": best}, fused, {**fused, "cudnn_benchmark": True}, reuse,
                                {**fused, "linear_dtype": "fp8"}, {**reuse, "linear_dtype": "fp8"}],
                        # why the reuse leg decodes slower: the order, the allocator, graphs
                        "decode": [fused, reuse, {**reuse, "decode_graphs": True},
                                   {**fused, "decode_graphs": True}, fused]}[ARGS.rollout_set]
            section_rollouts(pipe, image, text, variants)
    save(ARGS.out)
    print("\nvariant | prefill | 4 steps | DiT | decode | total | replays/captures/recompiles | max latent err")
    for name, r in RESULTS.get("rollouts", {}).items():
        if "error" in r:
            print(name, "| error")
            continue
        a = r["accel"]
        print(f"{name} | {r['steady_prefill_ms']:.1f} | {r['steady_steps_ms']:.1f} | {r['steady_dit_ms']:.1f} | "
              f"{r['steady_decode_ms']:.1f} | {r['steady_total_ms']:.1f} | {a['replays']}/{a['captures']}/"
              f"{a['recompiles']} | {max(r['latent_rel_err_vs_first']):.4f}")


if __name__ == "__main__":
    main()
