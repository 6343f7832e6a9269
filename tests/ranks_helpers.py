"""Model builders and worker functions the rank tests hand to spawned processes (a module of
its own so that the children import it without the test modules' fixtures)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from worldplay.checkpoint import build_on_device, random_init_
from worldplay.config import DIT_PRESETS
from worldplay.models import LoadedModels, random_models
from worldplay.nn.dit import WanDiT

# 12 heads (the tiny preset has 2): divisible by 2, 3, 4 and 6 ranks, as wan5b's 24 are.
TWELVE_HEADS = dataclasses.replace(DIT_PRESETS["tiny"], num_attention_heads=12, attention_head_dim=8)


def tiny(dtype, device) -> LoadedModels:
    return random_models("tiny", 0, device=device, dtype=dtype)


def twelve_heads(dtype, device) -> LoadedModels:
    models = random_models("tiny", 0, device=device, dtype=dtype)
    dit = build_on_device(lambda: WanDiT(TWELVE_HEADS, worldplay=True), device, dtype).eval()
    identity = random_init_(dit, 5)
    return LoadedModels(dit=dit, vae=models.vae, identity={"dit": identity.to_dict(), "vae": models.identity["vae"]})


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def fails_on_rank_one(dtype, device) -> LoadedModels:
    if _rank() == 1:
        raise FileNotFoundError("no weights at /nowhere on rank 1 (test)")
    return tiny(dtype, device)


def dies_on_rank_one(dtype, device) -> LoadedModels:
    """Rank 1's process ends without a word at its third DiT call (chunk 1's prefill)."""
    models = tiny(dtype, device)
    if _rank() == 1:
        calls = {"n": 0}
        forward = models.dit.forward

        def dying(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 6:
                os._exit(9)
            return forward(*args, **kwargs)

        models.dit.forward = dying
    return models


def other_weights_on_rank_one(dtype, device) -> LoadedModels:
    return random_models("tiny", _rank(), device=device, dtype=dtype)


def exchange_checks(rank: int, size: int, port: int, results, transport: str = "direct",
                    compiled: bool = False) -> None:
    """The collectives of worldplay.ranks against their one-rank meaning (run by test_ranks).
    ``compiled``: also the DiT's exchange inside a torch.compile'd function (how the GPU legs
    call it: host-staged collectives are graph breaks)."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    from worldplay.ranks.group import HostStagedRankGroup
    from worldplay.ranks.launch import join

    group = join(rank, size, torch.device("cpu"), transport=transport)
    assert isinstance(group, HostStagedRankGroup) == (transport == "host"), type(group)
    gen = torch.Generator().manual_seed(0)
    frames, per_frame, heads, head_dim = 3, 7, 6, 4  # 7 tokens: uneven pieces for 2 and 3 ranks
    full = [torch.randn(2, frames * per_frame, heads * head_dim, generator=gen) for _ in range(3)]
    shards = group.token_shards(per_frame, heads)
    mine = [shards.shard(t) for t in full]
    got = shards.to_heads(mine, heads)
    hs = heads // size
    for g, t in zip(got, full, strict=True):
        want = t.unflatten(-1, (heads, head_dim))[:, :, rank * hs:(rank + 1) * hs].flatten(2)
        assert torch.equal(g, want), "to_heads"
    o = torch.randn(4, frames * per_frame, heads, head_dim, generator=gen)
    back = shards.to_tokens(o[:, :, rank * hs:(rank + 1) * hs])
    assert torch.equal(back, shards.shard(o)), "to_tokens"
    out = torch.randn(2, frames * per_frame, 5, generator=gen)
    assert torch.equal(shards.gather(shards.shard(out)), out), "gather"
    # The VAE's columns: 7 latent columns, halo of 1 at level 1 (14 columns).
    columns = group.column_shards(7)
    x = torch.randn(1, 3, 2, 4, 14, generator=gen)
    a, b = columns.offsets[rank] * 2, columns.offsets[rank + 1] * 2
    padded = torch.nn.functional.pad(x, (1, 1))
    assert torch.equal(columns.halo(x[..., a:b], 1), padded[..., a:b + 2]), "halo"
    assert torch.equal(columns.gather(x[..., a:b], 4, 1), x), "columns gather"
    if compiled:
        def exchange(tensors):  # work on both sides of the exchange; scaling by 2 is exact
            return [t * 0.5 for t in shards.to_heads([t * 2 for t in tensors], heads)]

        fn = torch.compile(exchange, dynamic=False)
        for g, c in zip(got, fn(mine), strict=True):
            assert torch.equal(c, g), "to_heads, compiled"
    group.barrier()
    import torch.distributed as dist

    dist.destroy_process_group()


class FakeOfficialRunner:
    """Stands in for worldplay.experiments.official_leg.OfficialRunner in a rank of the official
    leg's launch: checks the environment torchrun would set, joins the group through it (as the
    official code does) and yields one LegChunk per chunk that says which rank made it."""

    def __init__(self, root, weights, device, compile):
        import torch.distributed as dist

        self.rank, self.size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        assert os.environ["LOCAL_RANK"] == str(self.rank) and "MASTER_PORT" in os.environ
        if self.rank == 1 and "fail" in str(root):
            raise RuntimeError("the official code failed on rank 1 (test)")
        dist.init_process_group("gloo")  # env://, as the official _init_distributed
        self.dist = dist

    def rollout(self, cfg, image_path, text, trajectory, progress=True):
        from worldplay.experiments.legs import LegChunk

        for index in range(cfg.num_chunk):
            total = torch.tensor([float(self.rank)])
            self.dist.all_reduce(total)  # every rank takes part in every chunk
            yield LegChunk(index, frames=np.zeros((16, 4, 4, 3), np.uint8), latents=torch.zeros(1),
                           timings_ms={"dit": 1.0, "decode": 1.0, "total": 2.0, "ranks_sum": float(total)})

    def close(self):
        self.dist.destroy_process_group()
