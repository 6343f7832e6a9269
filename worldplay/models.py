"""Assemble the models of one run: from real checkpoints, from the hub, or seeded random init.

Real-weight layouts (what the published repositories hold):

* ``--checkpoint DIR``: a snapshot of ``tencent/HY-WorldPlay`` with ``wan_transformer/config.json``
  and ``wan_distilled_model/model.pt``;
* ``--base DIR``: a snapshot of ``Wan-AI/Wan2.2-TI2V-5B-Diffusers`` with ``vae/``,
  ``text_encoder/`` and ``tokenizer/``.

Either may be given as ``hf://<repo_id>@<40-hex commit>``: the files are downloaded through
huggingface_hub at that pinned commit and every file's sha256 is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import (
    CheckpointError,
    WeightsIdentity,
    build_on_device,
    check_hub_spec,
    hub_download,
    load_dit,
    load_vae,
    random_init_,
)
from .config import dit_preset, vae_preset
from .nn.dit import WanDiT
from .nn.vae import WanVAE

WORLDPLAY_FILES = ["wan_transformer/config.json", "wan_distilled_model/model.pt"]
BASE_FILES = ["vae/*", "text_encoder/*", "tokenizer/*"]


@dataclass
class LoadedModels:
    dit: WanDiT
    vae: WanVAE
    identity: dict[str, dict] = field(default_factory=dict)  # component -> WeightsIdentity.to_dict()


@dataclass(frozen=True)
class HubLocation:
    repo_id: str
    revision: str  # a 40-hex commit


def parse_location(spec: str) -> Path | HubLocation:
    """``--checkpoint``/``--base``: an existing local directory, or ``hf://<repo_id>@<commit>``
    (a valid repo id and a pinned commit). Checked without network, before any model work."""
    if spec.startswith("hf://"):
        body = spec[len("hf://") :]
        if "@" not in body:
            raise CheckpointError(f"{spec}: give a pinned commit, e.g. hf://tencent/HY-WorldPlay@<40-hex commit>")
        repo_id, revision = body.rsplit("@", 1)
        check_hub_spec(repo_id, revision)
        return HubLocation(repo_id, revision)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{spec}: no such directory")
    return path


# (repo, commit, patterns) -> what hub_download gave: a run names the same hf:// location at
# several steps (the early file check, the prompt, the models); the snapshot is resolved and its
# identity computed once per process (a pinned commit cannot change under it).
_RESOLVED: dict[tuple[str, str, tuple[str, ...]], tuple[Path, WeightsIdentity]] = {}


def resolve_location(spec: str, allow_patterns: list[str]) -> tuple[Path, WeightsIdentity | None]:
    """A local directory, or ``hf://repo@commit`` downloaded (pinned) into the HF cache, once per
    process for the same files."""
    location = parse_location(spec)
    if isinstance(location, HubLocation):
        key = (location.repo_id, location.revision, tuple(allow_patterns))
        if key not in _RESOLVED:
            _RESOLVED[key] = hub_download(location.repo_id, location.revision, allow_patterns=allow_patterns)
        return _RESOLVED[key]
    return location, None


def load_real_models(checkpoint: str, base: str, *, device, dtype=torch.bfloat16) -> LoadedModels:
    """The published weights: the HY-WorldPlay DiT from ``checkpoint`` and the Wan 2.2 VAE from
    ``base`` (local directories or ``hf://repo@commit``), with the identity of every file."""
    ckpt_dir, ckpt_hub = resolve_location(checkpoint, WORLDPLAY_FILES)
    base_dir, base_hub = resolve_location(base, BASE_FILES)
    dit, dit_id = load_dit(
        ckpt_dir / "wan_transformer",
        worldplay_weights=ckpt_dir / "wan_distilled_model" / "model.pt",
        device=device,
        dtype=dtype,
    )
    vae, vae_id = load_vae(base_dir / "vae", device=device, dtype=dtype)
    identity = {"dit": (ckpt_hub or dit_id).to_dict(), "vae": (base_hub or vae_id).to_dict()}
    return LoadedModels(dit=dit, vae=vae, identity=identity)


def random_models(preset: str, seed: int, *, device, dtype=torch.bfloat16) -> LoadedModels:
    """Seeded random weights built directly on ``device`` in ``dtype`` (benchmarks, tests)."""
    dcfg, vcfg = dit_preset(preset), vae_preset(preset)
    dit = build_on_device(lambda: WanDiT(dcfg, worldplay=True), device, dtype).eval()
    dit_id = random_init_(dit, seed)
    vae = build_on_device(lambda: WanVAE(vcfg), device, dtype).eval()
    random_init_(vae, seed + 1)
    return LoadedModels(dit=dit, vae=vae, identity={"dit": dit_id.to_dict(), "vae": {**dit_id.to_dict(), "seed": seed + 1, "describe": f"random-init:{seed + 1}"}})


def random_text_states(preset: str, seed: int, length: int | None = None) -> torch.Tensor:
    """Stand-in prompt embeddings for random-weight runs (shape of the umT5 output, zero padding
    past a 'prompt' of 32 tokens, as real embeddings have)."""
    cfg = dit_preset(preset)
    length = length or (512 if preset == "wan5b" else 16)
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(1, length, cfg.text_dim, generator=gen)
    states[:, min(32, length // 2) :] = 0
    return states
