"""Reconstituted-context memory: which earlier latent frames a chunk attends to.

Behaviour of the official WAN pipeline (``select_mem_frames_wan`` and
``calculate_fov_overlap_similarity``; spec ``dit.md`` section 4), re-implemented vectorised:

* chunk ``c`` generates latents ``cur = 4c .. 4c+3``;
* for ``cur < 16`` (chunks 1-3) the memory is simply every earlier latent, ``range(cur)``;
* from ``cur >= 16`` on it is the 12 most recent latents plus the one 4-latent clip (start
  ``h`` in ``range(0, cur - 12, 4)``) whose camera frusta best overlap the frusta of the 4
  latents about to be generated: exactly 16 frames.

Clip score, ``ov`` being the Monte-Carlo field-of-view overlap of :func:`fov_overlap`::

    D(h) = mean_{q in cur..cur+3} ((1 - ov(q, h)) + (1 - ov(q, h + 2))) / 2

Candidates are sorted by ``D`` ascending with a stable sort (ties go to the older clip).

Numerics. The overlap ratios are computed in float32 from float32 poses and a float32 point
cloud, with the same formulas and the same operation order as the official code (which runs
them on the GPU, one pair at a time, and reads each ratio back with ``.item()``). The clip
scores are then accumulated in float64, as the official code does with Python floats. The
ratios are Monte-Carlo estimates: near-ties between clips (e.g. 0.7285 vs 0.7290) are decided
by the particular point cloud and, for points sitting on a frustum boundary, by float rounding
(GPU vs CPU ``atan2``, batched vs single 4x4 matmuls). Bit-identical selections therefore need
the identical cloud (:func:`memory_point_cloud` after the same ``torch.manual_seed``) and fp32
poses; agreement in rare near-ties is not guaranteed across devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .constants import CHUNK_LATENTS, MEMORY_SLOTS

__all__ = [
    "CLIP_SIZE",
    "CONTEXT_WINDOW_LENGTH",
    "FOV_H_DEG",
    "FOV_V_DEG",
    "HISTORY_RADIUS",
    "MemorySelection",
    "fov_overlap",
    "memory_point_cloud",
    "select_memory",
    "select_memory_frames",
]

#: Below this frame index the pipeline uses all earlier latents instead of the FOV selection.
CONTEXT_WINDOW_LENGTH = MEMORY_SLOTS  # the official name
#: Candidate clips are 4-latent aligned (hard-coded in the official code).
CLIP_SIZE = CHUNK_LATENTS  # the official name
#: Selection field of view (much narrower than the rendering intrinsics, about 89 x 58 degrees).
FOV_H_DEG = 60.0
FOV_V_DEG = 35.0
#: A history camera only "sees" points closer than this (same as the sampling-ball radius).
HISTORY_RADIUS = 8.0

_RAD2DEG = 180.0 / math.pi


def memory_point_cloud(
    num_points: int = 50_000,
    radius: float = 8.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Points uniform in a ball, drawn exactly as the official ``generate_points_in_sphere``.

    Three ``torch.rand(num_points)`` draws on the CPU (radius, azimuth, polar), in that order,
    turned into ``r = radius * u**(1/3)``, ``phi = 2 pi u``, ``theta = acos(1 - 2u)``. With
    ``generator=None`` the CPU global RNG is used, so ``torch.manual_seed(seed)`` followed by
    this call reproduces the official cloud bit for bit (the official pipeline draws it once, at
    chunk 0). A CPU ``torch.Generator`` seeded with ``seed`` gives the same numbers.

    Returns a float32 CPU tensor ``[num_points, 3]``; move it to the device yourself.
    """
    kw = dict(generator=generator, device="cpu", dtype=torch.float32)
    samples_r = torch.rand(num_points, **kw)
    samples_phi = torch.rand(num_points, **kw)
    samples_u = torch.rand(num_points, **kw)

    r = radius * torch.pow(samples_r, 1 / 3)
    phi = 2 * math.pi * samples_phi
    theta = torch.acos(1 - 2 * samples_u)

    x = r * torch.sin(theta) * torch.cos(phi)
    y = r * torch.sin(theta) * torch.sin(phi)
    z = r * torch.cos(theta)
    return torch.stack((x, y, z), dim=1)


# --------------------------------------------------------------------------------------------
# FOV overlap
# --------------------------------------------------------------------------------------------


def _pitch_yaw(rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pitch and yaw (degrees) of the camera z axis of w2c rotations ``[..., 3, 3]``.

    The camera z axis in world coordinates is the third column of ``R^T``; roll is ignored.
    """
    fwd = rot.transpose(-1, -2)[..., :, 2]
    x, y, z = fwd[..., 0], fwd[..., 1], fwd[..., 2]
    yaw = torch.atan2(x, z) * _RAD2DEG
    pitch = torch.atan2(y, torch.sqrt(x**2 + z**2)) * _RAD2DEG
    return pitch, yaw


def _in_window(
    vectors: torch.Tensor,
    pitch: torch.Tensor,
    yaw: torch.Tensor,
    half_h: float,
    half_v: float,
) -> torch.Tensor:
    """Whether direction ``vectors [..., 3]`` lie in the azimuth/elevation window of a camera.

    ``pitch``/``yaw`` broadcast against ``vectors[..., 0]``; differences are wrapped to
    [-180, 180) degrees. The component views are taken from the ``[..., 3]`` tensor exactly as the
    official code does (same strides, hence the same CPU kernels and rounding).
    """
    x, y, z = vectors[..., 0], vectors[..., 1], vectors[..., 2]
    azimuth = torch.atan2(x, z) * _RAD2DEG
    elevation = torch.atan2(y, torch.sqrt(x**2 + z**2)) * _RAD2DEG
    d_az = torch.remainder(azimuth - yaw + 180, 360) - 180
    d_el = torch.remainder(elevation - pitch + 180, 360) - 180
    return (d_az.abs() < half_h) & (d_el.abs() < half_v)


def _centre(w2c: torch.Tensor) -> torch.Tensor:
    """Camera centres ``-R^T t`` of w2c matrices ``[..., 4, 4]`` -> ``[..., 3]``."""
    rot, t = w2c[..., :3, :3], w2c[..., :3, 3]
    return (-rot.transpose(-1, -2) @ t.unsqueeze(-1)).squeeze(-1)


def fov_overlap(
    query_w2c: torch.Tensor,
    history_w2c: torch.Tensor,
    points: torch.Tensor,
    *,
    fov_h_deg: float = FOV_H_DEG,
    fov_v_deg: float = FOV_V_DEG,
    history_radius: float = HISTORY_RADIUS,
    compact: bool | None = None,
    max_block_elems: int = 1 << 21,
) -> torch.Tensor:
    """Monte-Carlo FOV overlap of every (query, history) camera pair, ``[Q, K]`` float32.

    For one pair (official ``calculate_fov_overlap_similarity``): both cameras are re-expressed
    in the query camera frame (``inv(Wq @ inv(W))``), the sample points are the cloud centred on
    the query camera, and::

        ov = |in_q AND in_h| / |in_q|        (0 when in_q is empty)

    where ``in_q`` is the query's ``fov_h_deg x fov_v_deg`` azimuth/elevation window and
    ``in_h`` the history camera's window restricted to points closer than ``history_radius``.

    Args:
        query_w2c: ``[Q, 4, 4]`` world-to-camera matrices of the frames about to be generated.
        history_w2c: ``[K, 4, 4]`` world-to-camera matrices of earlier frames.
        points: ``[N, 3]`` sample cloud (:func:`memory_point_cloud`); its device is used.
        compact: test history frusta only on the points inside each query frustum (about 5% of
            the cloud at 60 x 35 degrees). Gives identical numbers (the tests are element-wise),
            costs one host sync to size the gather. ``None``: on for CPU, off elsewhere (on a
            GPU the full batched test is cheap and stays sync-free).
        max_block_elems: bound on ``Q * K_block * points`` evaluated at once (memory bound;
            the K axis is processed in blocks).

    All pairs are evaluated in batched tensor ops; the only loop is over blocks of the K axis.
    """
    device = points.device
    points = points.to(torch.float32)
    wq = torch.as_tensor(query_w2c).to(device=device, dtype=torch.float32)
    wh = torch.as_tensor(history_w2c).to(device=device, dtype=torch.float32)
    if wq.ndim != 3 or wq.shape[-2:] != (4, 4) or wh.ndim != 3 or wh.shape[-2:] != (4, 4):
        raise ValueError(
            f"expected query [Q,4,4] and history [K,4,4] matrices, got {tuple(wq.shape)} "
            f"and {tuple(wh.shape)}"
        )
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"expected points [N,3], got {tuple(points.shape)}")
    num_q, num_k = wq.shape[0], wh.shape[0]
    if num_q == 0 or num_k == 0:
        return torch.zeros(num_q, num_k, dtype=torch.float32, device=device)
    if compact is None:
        compact = device.type == "cpu"
    half_h, half_v = fov_h_deg / 2.0, fov_v_deg / 2.0

    # Re-express both cameras in the query camera's frame (kept literally, incl. Wq @ inv(Wq)).
    rel_q = torch.linalg.inv(wq @ torch.linalg.inv(wq))  # [Q,4,4], ~identity
    rel_h = torch.linalg.inv(wq[:, None] @ torch.linalg.inv(wh)[None])  # [Q,K,4,4]
    centre_q = _centre(rel_q)  # [Q,3], ~0
    centre_h = _centre(rel_h)  # [Q,K,3]
    pitch_q, yaw_q = _pitch_yaw(rel_q[..., :3, :3])  # [Q]
    pitch_h, yaw_h = _pitch_yaw(rel_h[..., :3, :3])  # [Q,K]

    pts = points[None] + centre_q[:, None, :]  # [Q,N,3] cloud around each query camera
    in_q = _in_window(pts - centre_q[:, None, :], pitch_q[:, None], yaw_q[:, None], half_h, half_v)
    count_q = in_q.sum(dim=1)  # [Q]

    if compact:
        # Gather the in-frustum points of every query to the front (padded to the largest count).
        m = int(count_q.max())
        order = torch.argsort(in_q.to(torch.uint8), dim=1, descending=True, stable=True)[:, :m]
        pts = torch.gather(pts, 1, order[..., None].expand(-1, -1, 3))  # [Q,M,3]
        valid = torch.arange(m, device=device)[None, :] < count_q[:, None]  # [Q,M]
    else:
        valid = in_q
    num_pts = pts.shape[1]

    overlap = torch.zeros(num_q, num_k, dtype=torch.int64, device=device)
    block = max(1, max_block_elems // max(1, num_q * num_pts))
    for k0 in range(0, num_k, block):
        k1 = min(num_k, k0 + block)
        vec = pts[:, None, :, :] - centre_h[:, k0:k1, None, :]  # [Q,Kb,M,3]
        in_h = _in_window(vec, pitch_h[:, k0:k1, None], yaw_h[:, k0:k1, None], half_h, half_v)
        in_h &= torch.norm(vec, dim=-1) < history_radius
        overlap[:, k0:k1] = (in_h & valid[:, None, :]).sum(dim=-1)

    count = count_q.to(torch.float32)[:, None]
    ratio = overlap.to(torch.float32) / count
    return torch.where(count == 0, torch.zeros_like(ratio), ratio)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySelection:
    """Result of :func:`select_memory`.

    Attributes:
        indices: selected latent frames, ascending (``range(cur)`` below the threshold, else
            exactly ``memory_frames``).
        current_frame_idx: first latent of the chunk being generated.
        context: the recent frames kept unconditionally (``[]`` below the threshold, where all
            of ``indices`` is plain history).
        candidate_starts: start latent of every candidate clip, ascending (``[]`` below the
            threshold).
        candidate_scores: ``D(h)`` of each candidate, same order (lower = more overlap).
        chosen_start: start of the retrieved clip, or ``None`` below the threshold.
    """

    indices: list[int]
    current_frame_idx: int
    context: list[int] = field(default_factory=list)
    candidate_starts: list[int] = field(default_factory=list)
    candidate_scores: list[float] = field(default_factory=list)
    chosen_start: int | None = None

    @property
    def retrieved(self) -> list[int]:
        """Frames taken by retrieval (not in the recent context)."""
        ctx = set(self.context)
        return [i for i in self.indices if i not in ctx] if self.chosen_start is not None else []


def _clip_scores(ov: torch.Tensor) -> torch.Tensor:
    """``D(h)`` from overlaps ``[Q, C, 2]`` (frames h, h+2), float64 like the official floats.

    Same arithmetic order as the official Python loop: per query ``((1-a) + (1-b)) / 2``, summed
    over the queries in order, divided by the number of queries.
    """
    ov = ov.to(torch.float64)
    per_query = ((1.0 - ov[..., 0]) + (1.0 - ov[..., 1])) / 2.0  # [Q,C]
    total = torch.zeros(ov.shape[1], dtype=torch.float64, device=ov.device)
    for q in range(ov.shape[0]):  # Q <= 4: a sequential sum, not a pair loop
        total = total + per_query[q]
    return total / ov.shape[0]


def select_memory(
    viewmats_w2c: torch.Tensor,
    current_frame_idx: int,
    points: torch.Tensor,
    memory_frames: int = 16,
    temporal_context_size: int = 12,
    pred_latent_size: int = 4,
    context_window_length: int = CONTEXT_WINDOW_LENGTH,
    **overlap_kwargs,
) -> MemorySelection:
    """Memory frames for the chunk starting at latent ``current_frame_idx``, with clip scores.

    Args:
        viewmats_w2c: ``[T, 4, 4]`` world-to-camera matrices of the trajectory (tensor or
            array; cast to float32 like the official fp32 pose buffer). From the threshold on,
            ``T >= current_frame_idx + pred_latent_size`` is required; only frames
            ``< current_frame_idx + pred_latent_size`` are read.
        current_frame_idx: ``cur = 4 * chunk``.
        points: ``[N, 3]`` sample cloud (:func:`memory_point_cloud`); computation runs on its
            device.
        memory_frames: total memory size (16).
        temporal_context_size: recent frames always kept (12).
        pred_latent_size: latents per chunk; the query clip is ``cur .. cur+pred-1`` (4).
        context_window_length: below this ``cur`` the memory is ``range(cur)`` (the pipeline's
            rule for chunks 1-3; 16). It is load-bearing: below 16 the candidate list can be
            empty and the 16-frame assertion would fail.
        overlap_kwargs: forwarded to :func:`fov_overlap` (``compact``, ``max_block_elems``).
    """
    cur = int(current_frame_idx)
    if cur < 0:
        raise ValueError(f"current_frame_idx must be >= 0, got {cur}")
    if cur < context_window_length:
        return MemorySelection(indices=list(range(cur)), current_frame_idx=cur)

    w2c = torch.as_tensor(viewmats_w2c)
    if w2c.ndim != 3 or w2c.shape[-2:] != (4, 4):
        raise ValueError(f"viewmats_w2c must be [T,4,4], got {tuple(w2c.shape)}")
    num_poses = w2c.shape[0]
    if num_poses < cur + pred_latent_size:
        raise ValueError(
            f"memory selection at current_frame_idx={cur} needs the poses of frames "
            f"0..{cur + pred_latent_size - 1} (the chunk being generated is the query), "
            f"but only {num_poses} poses were given"
        )

    context = list(range(max(0, cur - temporal_context_size), cur))
    starts = list(range(0, cur - temporal_context_size, CLIP_SIZE))
    budget = memory_frames - temporal_context_size

    scores: list[float] = []
    if starts:
        device = points.device
        w2c = w2c.to(device=device, dtype=torch.float32)
        start_t = torch.tensor(starts, device=device)
        hist_idx = torch.stack((start_t, start_t + 2), dim=1).reshape(-1)  # h, h+2 per clip
        ov = fov_overlap(w2c[cur : cur + pred_latent_size], w2c[hist_idx], points, **overlap_kwargs)
        scores = _clip_scores(ov.reshape(ov.shape[0], len(starts), 2)).tolist()

    ranked = sorted(zip(starts, scores, strict=True), key=lambda hs: hs[1])  # stable: ties -> older
    retrieved: list[int] = []
    chosen: int | None = None
    for h, _ in ranked:  # official order: take a clip, then check the budget
        if h not in retrieved:
            retrieved.extend(range(h, h + CLIP_SIZE))
            chosen = h if chosen is None else chosen
        if len(retrieved) >= budget:
            break

    indices = sorted(set(context) | set(retrieved))
    if len(indices) != memory_frames:
        raise AssertionError(
            f"memory selection at current_frame_idx={cur} produced {len(indices)} frames, "
            f"expected exactly {memory_frames} ({temporal_context_size} recent + {budget} "
            f"retrieved from {len(starts)} candidate clips); current_frame_idx must be a "
            f"multiple of {CLIP_SIZE} and >= {memory_frames}"
        )
    return MemorySelection(
        indices=indices,
        current_frame_idx=cur,
        context=context,
        candidate_starts=starts,
        candidate_scores=scores,
        chosen_start=chosen,
    )


def select_memory_frames(*args, **kwargs) -> list[int]:
    """Selected memory frame indices, ascending: :func:`select_memory` (same arguments) without
    the scores."""
    return select_memory(*args, **kwargs).indices
