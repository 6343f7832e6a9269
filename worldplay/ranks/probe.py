"""The all-to-all rate between the ranks at the sizes a chunk sends, to set against the counted
traffic (:mod:`worldplay.ranks.traffic`) and the predicted per-chunk times (notes/perf.md):

    torchrun --nproc-per-node 2 -m worldplay.ranks.probe --out rates.json

For each size: the median time of ``--repeats`` timed ``all_to_all_single`` calls (after
warm-ups), in ms, and the rate in GB/s of what one rank sends ((N-1)/N of its buffer). Sizes:
one attention exchange of a step (q, k, v of 3,520/N tokens at 3,072 wide, bf16) and of a prefill
(14,080/N tokens), and a halo column of the decoder's top stage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from ..files import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worldplay.ranks.probe", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file written by rank 0")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    from .launch import from_environment, join

    launch = from_environment()
    if launch is None:
        ap.error("run under torchrun --nproc-per-node N (N >= 2)")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", launch.local_rank) if cuda else torch.device("cpu")
    group = join(launch.rank, launch.size, device)
    n = launch.size
    sizes = {"step q/k/v exchange": 3 * (3520 // n) * 3072, "prefill q/k/v exchange": 3 * (14080 // n) * 3072,
             "decoder top halo column (16 frames)": 256 * 16 * 352 * n}
    results = {}
    for name, elements in sizes.items():
        elements -= elements % n
        send = torch.randn(elements, device=device).to(torch.bfloat16)
        split = [elements // n] * n
        times = []
        for i in range(args.repeats + 3):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            group.all_to_all(send, split, split, "probe")
            if cuda:
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                ms = (time.perf_counter() - t0) * 1e3
            if i >= 3:
                times.append(ms)
        ms = statistics.median(times)
        sent = elements * 2 * (n - 1) / n
        results[name] = {"bytes_sent_per_rank": int(sent), "median_ms": round(ms, 4),
                         "gb_per_s": round(sent / (ms * 1e-3) / 1e9, 2)}
    if group.leader:
        env = {"ranks": n, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
               "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None, "torch": torch.__version__}
        atomic_write_json(args.out, {"environment": env, "all_to_all": results}, indent=1)
        print(json.dumps(results, indent=1))
    group.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
