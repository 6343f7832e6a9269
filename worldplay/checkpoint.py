"""Checkpoint formats, strict loading, hub download and seeded random init.

Formats read:

* diffusers model directories: ``config.json`` + ``diffusion_pytorch_model.safetensors``, or
  sharded ``*.safetensors`` with ``diffusion_pytorch_model.safetensors.index.json`` (or a
  variant's, e.g. ``...safetensors.index.fp16.json``);
* single weight files: ``.safetensors``; pickles (``.pt``/``.pth``/``.bin``) only through
  ``torch.load(weights_only=True)``, never a full unpickle;
* HY-WorldPlay's distilled ``model.pt`` (a dict with ``generator`` / ``generator_ema`` whose
  keys carry ``model.`` and ``_fsdp_wrapped_module.`` wrapper prefixes).

Every load is strict: a missing, unexpected or mis-shaped tensor is an error that names the
tensor and the file, because a partially loaded video model still produces plausible noise.
(Keys under DDP's ``module.`` or torch.compile's ``_orig_mod.`` are stripped first, with a note.)
"""

from __future__ import annotations

import fnmatch
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
from .files import sha256_file as hash_file_bytes

log = logging.getLogger(__name__)

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(RuntimeError):
    """A checkpoint file or directory cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------
# reading files


_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# (real path, size, mtime_ns) -> sha256: a run names the same multi-GB file several times (the
# hub identity, the DiT's and the VAE's own identities); it is read once per process.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """A weights file's sha256, computed once per process and file version (worldplay.files does
    the hashing). A file of the Hugging Face cache that links to ``blobs/<64 hex>`` is an LFS
    object that the hub stores under its sha256 (and checks on download): that name is the
    digest, and the file is not read. Results and manifests use the uncached
    ``worldplay.files.sha256_file``: an edit there must always show."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and _SHA256_HEX.match(real.name):
        return real.name
    stat = real.stat()
    key = (str(real), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _hash_file(real, chunk)
    return _DIGESTS[key]


def _hash_file(path: Path, chunk: int) -> str:
    return hash_file_bytes(path, block=chunk)


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

    index_path = _weights_index(directory)
    single = directory / SAFETENSORS_NAME
    if index_path is not None:
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


def _weights_index(directory: Path) -> Path | None:
    """The shard index of a sharded diffusers directory: the plain one, else the one variant
    index there is (diffusers' ``save_pretrained(variant="fp16")`` writes
    ``diffusion_pytorch_model.safetensors.index.fp16.json`` next to
    ``diffusion_pytorch_model.fp16-00001-of-0000N.safetensors``); None when not sharded."""
    plain = directory / SAFETENSORS_INDEX
    if plain.is_file():
        return plain
    if (directory / SAFETENSORS_NAME).is_file():
        return None  # the unsharded default weights win over any variant, as in diffusers
    variants = sorted({*directory.glob("diffusion_pytorch_model.safetensors.index.*.json"),
                       *directory.glob("diffusion_pytorch_model.*.safetensors.index.json")})
    if len(variants) > 1:
        raise CheckpointError(f"{directory}: several variant indexes {[v.name for v in variants]}; keep one "
                              "variant in the directory (or pass the directory of the one you mean)")
    return variants[0] if variants else None


# Prefixes that training wrappers put on every key: DistributedDataParallel (``module.``) and
# torch.compile (``_orig_mod.``, also per compiled block). The weights under them are the
# model's own, so they are stripped (with a note in the log) rather than refused.
_TRAINING_PREFIXES = re.compile(r"^module\.|(?:^|(?<=\.))_orig_mod\.")


def strip_training_prefixes(state: Mapping[str, torch.Tensor], expected: Iterable[str],
                            source: str) -> dict[str, torch.Tensor]:
    """``state`` with DDP/torch.compile prefixes removed when that makes its keys the model's
    (``expected``); otherwise ``state`` unchanged, for the strict check to report."""
    expected = set(expected)
    if set(state) <= expected or not any(_TRAINING_PREFIXES.search(k) for k in state):
        return dict(state)
    stripped = {}
    for key, value in state.items():
        new = key if key in expected else _TRAINING_PREFIXES.sub("", key)
        if new in stripped:
            raise CheckpointError(f"{source}: two checkpoint keys map to {new!r} after stripping module./_orig_mod.")
        stripped[new] = value
    log.warning("%s: stripped the training-wrapper prefixes module. / _orig_mod. (DDP, torch.compile) from the "
                "checkpoint's keys", source)
    return stripped


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


def dtype_family(dtype: torch.dtype) -> str:
    """The kind of number a dtype holds; loading may change the width, never the kind."""
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating point"
    if dtype == torch.bool:
        return "bool"
    try:
        torch.iinfo(dtype)
    except TypeError:
        return str(dtype).removeprefix("torch.")  # quantized and other exotic dtypes: only themselves
    return "integer"


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` listing every missing, unexpected, mis-shaped and
    wrong-dtype key. Loading casts floating point to the run's dtype, so a tensor must hold the
    kind of number its slot declares: parameters floating point, buffers the family the module
    gives them. An integer, bool or complex tensor in a weight slot is a wrong or corrupt file,
    not something to cast."""
    declared = module.state_dict()
    parameters = {name for name, _ in module.named_parameters()}
    expected = {k: tuple(v.shape) for k, v in declared.items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    common = sorted(set(expected) & set(state))
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
                 for k in common if tuple(state[k].shape) != expected[k]]
    wrong_dtype = []
    for k in common:
        want = "floating point" if k in parameters else dtype_family(declared[k].dtype)
        got = state[k].dtype
        if dtype_family(got) != want:
            wrong_dtype.append(f"{k}: checkpoint {str(got).removeprefix('torch.')} vs model {want}")
    if missing or unexpected or misshaped or wrong_dtype:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                             ("wrong dtype", wrong_dtype)):
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
    each tensor to ``device``/``dtype`` as it goes so that at most one copy exists at a time.
    Keys saved through DDP or torch.compile (``module.``, ``_orig_mod.``) are stripped first."""
    state = strip_training_prefixes(state, module.state_dict().keys(), source)
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
HUB_ACCESS_HINT = ("download it once with network (HF_HUB_OFFLINE unset; a gated or private repo also needs "
                   "HF_TOKEN), or pass a local directory instead")


def check_hub_spec(repo_id: str, revision: str) -> None:
    """A valid repo id and a pinned 40-hex commit, checked before any network or disk access."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise CheckpointError(
            f"hf://{repo_id}@{revision}: {repo_id!r} is not a Hugging Face repo id; write "
            "hf://<owner>/<name>@<commit>, e.g. hf://tencent/HY-WorldPlay@<40-hex commit>"
        ) from None
    if not _COMMIT.match(revision or ""):
        raise CheckpointError(
            f"{repo_id}: revision {revision!r} is not a commit hash; pin the 40-hex commit "
            "(the 'Files' tab of the model page shows it) so that results stay reproducible"
        )


def _snapshot_download(repo_id: str, revision: str, allow_patterns, cache_dir) -> str:
    """``huggingface_hub.snapshot_download`` with its failures as one-line CheckpointErrors that
    name the repo and commit and say what to do."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"hf://{repo_id}@{revision}"
    try:
        return snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns,
                                 cache_dir=cache_dir)
    except LocalEntryNotFoundError as exc:
        cause = exc.__cause__ or exc.__context__
        why = "the Hub cannot be reached" + (f" ({type(cause).__name__})" if cause is not None else "")
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE=1 forbids downloads"
        raise CheckpointError(f"{where}: not in the local Hugging Face cache and {why}; {HUB_ACCESS_HINT}") from None
    except GatedRepoError:
        raise CheckpointError(f"{where}: the repo is gated; accept its terms on the model page and set "
                              "HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{where}: no such repo, or it is private; check the name, or set HF_TOKEN "
                              "for a private repo") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{where}: the repo has no commit {revision}; copy the 40-hex commit from the "
                              "model page's history") from None
    except HfHubHTTPError as exc:
        raise CheckpointError(f"{where}: the Hub refused the download ({str(exc).splitlines()[0]}); "
                              f"{HUB_ACCESS_HINT}") from None
    except OSError as exc:  # the cache folder
        raise CheckpointError(f"{where}: cannot write the Hugging Face cache {exc.filename or ''}: "
                              f"{exc.strerror or exc}; set HF_HOME to a writable folder") from None


def hub_download(
    repo_id: str,
    revision: str,
    allow_patterns: list[str] | None = None,
    expected_sha256: Mapping[str, str] | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Path, WeightsIdentity]:
    """Download (or reuse from the cache) a pinned snapshot of a Hugging Face repo.

    ``revision`` must be a 40-hex commit, so that a moved branch can never change the weights
    under a published result. The sha256 of every file the patterns select is recorded (other
    files an earlier download left in the snapshot are not this run's); where
    ``expected_sha256`` names a file, a mismatch is an error.
    """
    check_hub_spec(repo_id, revision)
    root = Path(_snapshot_download(repo_id, revision, allow_patterns, cache_dir))
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and (allow_patterns is None
                        or any(fnmatch.fnmatch(p.relative_to(root).as_posix(), pat) for pat in allow_patterns)))
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


def _weights_source(directory: Path, weight_files: list[Path]) -> str:
    """What an error names: the one weights file, or the index that maps keys to shards."""
    if len(weight_files) == 1:
        return str(weight_files[0])
    return str(_weights_index(directory) or directory / SAFETENSORS_INDEX)


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
        source = _weights_source(directory, weight_files)
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
    load_into(model, state, _weights_source(directory, weight_files), device=device, dtype=dtype)
    del state
    return model.eval(), files_identity([directory / "config.json", *weight_files])
