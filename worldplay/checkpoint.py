"""Checkpoint formats, strict loading, hub download and seeded random init.

Formats read:

* diffusers model directories: ``config.json`` + ``diffusion_pytorch_model.safetensors``, or
  sharded ``*.safetensors`` with ``diffusion_pytorch_model.safetensors.index.json``;
* single weight files: ``.safetensors``; pickles (``.pt``/``.pth``/``.bin``) only through
  ``torch.load(weights_only=True)``, never a full unpickle;
* HY-WorldPlay's distilled ``model.pt`` (a dict with ``generator`` / ``generator_ema`` whose
  keys carry ``model.`` and ``_fsdp_wrapped_module.`` wrapper prefixes).

Every load is strict: a missing, unexpected or mis-shaped tensor is an error that names the
tensor and the file, because a partially loaded video model still produces plausible noise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .config import ConfigError, DiTConfig, VAEConfig

log = logging.getLogger(__name__)

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(RuntimeError):
    """A checkpoint file or directory cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------
# reading files


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); it may be truncated or corrupt — "
            "download it again and compare its sha256"
        ) from exc


def read_pickle_weights(path: str | Path) -> dict:
    """``torch.load(weights_only=True)``: tensors and plain containers only, no code execution."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load — the pickle holds objects other than tensors and plain "
            f"containers, and only weights_only loading is allowed ({str(exc).splitlines()[0]}). "
            "Convert it to safetensors with a trusted tool, or re-save only the state dict."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc}); it may be truncated") from exc


def read_weights_file(path: str | Path, device: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path, device)
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle_weights(path)
    raise CheckpointError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors or .pt")


def read_model_dir(directory: str | Path, device: str | torch.device = "cpu") -> tuple[dict, dict[str, torch.Tensor], list[Path]]:
    """A diffusers model directory -> (config dict, state dict, weight files read)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json — is this a diffusers model directory?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from exc

    index_path = directory / SAFETENSORS_INDEX
    single = directory / SAFETENSORS_NAME
    if index_path.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index_path}: not a safetensors index (needs a 'weight_map')") from exc
        files = [directory / name for name in sorted(set(weight_map.values()))]
        state: dict[str, torch.Tensor] = {}
        for shard in files:
            part = read_safetensors(shard, device)
            expected = {k for k, v in weight_map.items() if directory / v == shard}
            if set(part) != expected:
                raise CheckpointError(
                    f"{shard}: holds {sorted(set(part) - expected)[:5]} not listed for it in {index_path.name} "
                    f"and lacks {sorted(expected - set(part))[:5]}"
                )
            state.update(part)
    elif single.is_file():
        files = [single]
        state = read_safetensors(single, device)
    else:
        candidates = sorted(directory.glob("*.safetensors"))
        if len(candidates) != 1:
            raise CheckpointError(
                f"{directory}: expected {SAFETENSORS_NAME} or {SAFETENSORS_INDEX}, found "
                f"{[c.name for c in candidates] or 'no .safetensors files'}"
            )
        files = candidates
        state = read_safetensors(candidates[0], device)
    return config, state, files


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove training-wrapper prefixes: a leading ``model.`` and any ``_fsdp_wrapped_module.``
    (the official loader strips them at the start only; FSDP can also nest them per block)."""
    out = {}
    for key, value in state.items():
        new = key[len("model.") :] if key.startswith("model.") else key
        new = new.replace("_fsdp_wrapped_module.", "")
        if new in out:
            raise CheckpointError(f"two checkpoint keys map to {new!r} after stripping wrapper prefixes")
        out[new] = value
    return out


def read_worldplay_model_pt(path: str | Path, which: str = "generator") -> dict[str, torch.Tensor]:
    """HY-WorldPlay's ``wan_distilled_model/model.pt`` -> a plain diffusers-named state dict."""
    blob = read_pickle_weights(path)
    if not isinstance(blob, Mapping) or which not in blob:
        keys = sorted(blob)[:8] if isinstance(blob, Mapping) else type(blob).__name__
        raise CheckpointError(f"{path}: expected a dict with a {which!r} entry (HY-WorldPlay model.pt), found {keys}")
    state = blob[which]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: entry {which!r} is a {type(state).__name__}, not a state dict")
    return strip_wrapper_prefixes(state)


# ---------------------------------------------------------------------------------------
# strict loading


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` listing every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")
                parts.append(f"{len(items)} {label}: {shown}")
        raise CheckpointError(
            f"{source}: checkpoint does not match the model — " + "; ".join(parts)
            + ". Check that the files belong to this model and preset."
        )


def load_into(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Strictly load ``state`` into ``module`` (which may live on the meta device), converting
    each tensor to ``device``/``dtype`` as it goes so that at most one copy exists at a time."""
    check_state_dict(module, state, source)
    converted = {}
    for key, value in module.state_dict().items():
        target_device = device if device is not None else (value.device if value.device.type != "meta" else "cpu")
        target_dtype = dtype if (dtype is not None and value.is_floating_point()) else value.dtype
        converted[key] = state[key].to(device=target_device, dtype=target_dtype)
    module.load_state_dict(converted, strict=True, assign=True)
    leftover = [name for name, b in module.named_buffers() if b.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{source}: buffers {leftover} were not materialised (not in the checkpoint)")
    return module


# ---------------------------------------------------------------------------------------
# identities and hub download


@dataclass(frozen=True)
class WeightsIdentity:
    """What was loaded: files with sha256, or a seeded random init; recorded in every result."""

    kind: str  # "files" | "random-init"
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256
    seed: int | None = None
    repo_id: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        if self.kind == "random-init":
            return f"random-init:{self.seed}"
        where = f"{self.repo_id}@{self.revision}" if self.repo_id else "local files"
        return f"{where} ({len(self.files)} files)"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "files": dict(self.files), "seed": self.seed,
                "repo_id": self.repo_id, "revision": self.revision, "describe": self.describe()}


def files_identity(paths: Iterable[str | Path], **extra) -> WeightsIdentity:
    return WeightsIdentity(kind="files", files={str(p): sha256_file(p) for p in paths}, **extra)


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_download(
    repo_id: str,
    revision: str,
    allow_patterns: list[str] | None = None,
    expected_sha256: Mapping[str, str] | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Path, WeightsIdentity]:
    """Download (or reuse from the cache) a pinned snapshot of a Hugging Face repo.

    ``revision`` must be a 40-hex commit, so that a moved branch can never change the weights
    under a published result. Every file's sha256 is computed and recorded; where
    ``expected_sha256`` names a file, a mismatch is an error.
    """
    if not _COMMIT.match(revision or ""):
        raise CheckpointError(
            f"{repo_id}: revision {revision!r} is not a commit hash; pin the 40-hex commit "
            "(the 'Files' tab of the model page shows it) so that results stay reproducible"
        )
    from huggingface_hub import snapshot_download

    root = Path(
        snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns, cache_dir=cache_dir)
    )
    files = sorted(p for p in root.rglob("*") if p.is_file())
    digests = {str(p.relative_to(root)): sha256_file(p) for p in files}
    for rel, want in (expected_sha256 or {}).items():
        got = digests.get(rel)
        if got is None:
            raise CheckpointError(f"{repo_id}@{revision}: expected file {rel} was not downloaded")
        if got != want:
            raise CheckpointError(f"{repo_id}@{revision}: {rel} has sha256 {got}, expected {want}; refusing to use it")
    return root, WeightsIdentity(kind="files", files=digests, repo_id=repo_id, revision=revision)


# ---------------------------------------------------------------------------------------
# random init


@torch.no_grad()
def random_init_(module: nn.Module, seed: int, scale: float = 1.0) -> WeightsIdentity:
    """Fill every parameter in place with seeded random values, on its own device and dtype.

    A stand-in for real weights in benchmarks (speed does not depend on the values) and for
    parity checks (both legs load the same random weights). Weights ~ N(0, 1/fan_in) so that
    activations stay O(1) through the depth; norms' gains ~ 1; biases and AdaLN tables small.
    Every tensor is drawn from its own generator seeded from (seed, name), so the result does
    not depend on iteration order; values differ between CPU and CUDA generators.
    """
    for name, p in module.named_parameters():
        if p.device.type == "meta":
            raise CheckpointError(f"random_init_: {name} is on the meta device; call to_empty() first")
        gen = torch.Generator(device=p.device)
        gen.manual_seed((seed * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)) % (2**63))
        noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim >= 2 and "scale_shift_table" not in name:
            fan_in = p[0].numel()
            values = noise * (scale / fan_in**0.5)
        elif leaf in ("gamma",) or (leaf == "weight" and p.ndim == 1):
            values = 1.0 + 0.1 * noise  # norm gains
        elif "scale_shift_table" in name:
            values = noise / p.shape[-1] ** 0.5
        else:
            values = 0.02 * noise  # biases
        p.copy_(values.to(p.dtype))
    return WeightsIdentity(kind="random-init", seed=seed)


def build_on_device(factory, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """Build a module on the meta device and materialise it directly in ``dtype`` on ``device``:
    the 5B model never takes a float32 detour (20 GB) through host memory."""
    with torch.device("meta"):
        module = factory()
    module = module.to(dtype=dtype)
    return module.to_empty(device=device)


# ---------------------------------------------------------------------------------------
# model-level helpers


def dit_config_from_dir(directory: str | Path) -> DiTConfig:
    path = Path(directory) / "config.json"
    try:
        return DiTConfig.from_dict(json.loads(path.read_text()), source=str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no config.json") from None
    except (json.JSONDecodeError, ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def vae_config_from_dict(config: dict, source: str) -> VAEConfig:
    try:
        return VAEConfig.from_dict(config, source=source)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


def load_dit(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    worldplay_weights: str | Path | None = None,
    worldplay: bool | None = None,
) -> tuple[nn.Module, WeightsIdentity]:
    """Load a Wan DiT from a diffusers directory.

    With ``worldplay_weights`` (HY-WorldPlay's ``model.pt``) only the directory's ``config.json``
    is used and every parameter comes from ``model.pt`` (as in the official loader, which
    overwrites the directory's weights entirely), so the directory's big safetensors are not read.
    """
    from .nn.dit import WanDiT

    directory = Path(directory)
    config = dit_config_from_dir(directory)
    if worldplay_weights is not None:
        state = read_worldplay_model_pt(worldplay_weights)
        files = [Path(worldplay_weights), directory / "config.json"]
        source = str(worldplay_weights)
        worldplay = True if worldplay is None else worldplay
    else:
        _, state, weight_files = read_model_dir(directory)
        files = [directory / "config.json", *weight_files]
        source = str(directory)
        worldplay = any(".to_out_prope." in k for k in state) if worldplay is None else worldplay
    with torch.device("meta"):
        model = WanDiT(config, worldplay=worldplay)
    load_into(model, state, source, device=device, dtype=dtype)
    del state
    return model.eval(), files_identity(files)


def load_vae(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, WeightsIdentity]:
    """Load the Wan 2.2 VAE from a diffusers ``vae/`` directory."""
    from .nn.vae import WanVAE

    directory = Path(directory)
    raw_config, state, weight_files = read_model_dir(directory)
    config = vae_config_from_dict(raw_config, str(directory / "config.json"))
    with torch.device("meta"):
        model = WanVAE(config)
    # to_empty materialises the VAE's float32 latent statistics (non-persistent, rebuilt from
    # the config) on the device; the weights are then assigned from the checkpoint.
    model = model.to_empty(device=device)
    load_into(model, state, str(directory), device=device, dtype=dtype)
    del state
    return model.eval(), files_identity([directory / "config.json", *weight_files])
