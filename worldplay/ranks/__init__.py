"""One session over N ranks (``torch.distributed``: NCCL on GPUs, gloo on the CPU).

* :mod:`~worldplay.ranks.group`: a process's rank and the collectives (identities on one rank);
* :mod:`~worldplay.ranks.sequence`: the DiT's tokens over the ranks (Ulysses all-to-all);
* :mod:`~worldplay.ranks.columns`: the VAE decode's latent columns over the ranks (halo exchange);
* :mod:`~worldplay.ranks.launch`: ``torchrun``'s environment, joining, the watchdog that ends
  every rank when one fails, the agreement check;
* :mod:`~worldplay.ranks.spawn`: N ranks spawned from this process (benches, tests);
* :mod:`~worldplay.ranks.traffic`: the bytes a chunk moves between ranks, counted.
"""

from .group import RankGroup

__all__ = ["RankGroup"]
