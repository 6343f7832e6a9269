"""How a length is cut into one piece per rank: as evenly as integers allow.

The DiT's tokens of a latent frame (880 at 704x1280) and the VAE decoder's latent columns (80)
are each cut into N consecutive pieces whose sizes differ by at most one, the larger ones first.
880 and 80 divide evenly for N in {1, 2, 4, 8}; for N = 3 and 6 the pieces differ by one token
(0.3 %) or one latent column (1.2 %), which costs less than padding to a multiple of N would.
"""

from __future__ import annotations


def balanced_split(total: int, parts: int) -> tuple[int, ...]:
    """Sizes of ``parts`` consecutive pieces of ``total``: ``total // parts`` each, the first
    ``total % parts`` pieces one larger. Every piece is non-empty (``total >= parts``)."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be a positive integer, got {parts!r}")
    if isinstance(total, bool) or not isinstance(total, int) or total < parts:
        raise ValueError(f"{total!r} cannot be cut into {parts} non-empty pieces")
    base, extra = divmod(total, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def starts(sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Offset of every piece (``len(sizes) + 1`` entries, the last one the total)."""
    out = [0]
    for size in sizes:
        out.append(out[-1] + size)
    return tuple(out)
