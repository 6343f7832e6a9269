"""Pinned experiment configs (``experiments/<name>.toml``): strict loading, resolution, hashing.

Every key is checked: an unknown key, a value of the wrong type or an impossible combination
is an :class:`ExperimentConfigError` that names the key by its dotted path (``weights.hub``,
``poses[1]``) and says what is allowed. The *resolved* config (every default filled in) is
hashed (sha256 over canonical JSON); results carry that hash, and a result whose hash no
longer matches its pinned config is stale (:func:`worldplay.experiments.results.check_fresh`).

The module needs no torch: listing and validating configs is instant.

Example (``bench``)::

    kind = "bench"
    description = "Per-stage timings of one 8-chunk rollout, native vs official"
    preset = "wan5b"              # "wan5b" | "tiny"
    device = "cuda"               # "cuda" | "cpu" (cpu only with preset "tiny", name *-tiny-cpu)
    legs = ["native-eager", "native-fastest", "official"]
    resolution = [704, 1280]      # default: 704x1280 (wan5b), 64x96 (tiny)
    num_chunk = 8
    pose = "w-31"                 # pose string, or "input:<id>" (a trajectory JSON of inputs.toml)
    image = "synthetic"           # "synthetic" (seeded) or an image id of inputs.toml
    seed = 0
    warmup_chunks = 5
    repetitions = 3
    attention_backend = "sdpa"

    [weights]                     # exactly one of random_init / path / hub
    random_init = 0
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
KINDS = ("bench", "rollouts", "drift", "parity")
PRESET_RESOLUTION = {"wan5b": (704, 1280), "tiny": (64, 96)}
DEVICES = ("cuda", "cpu")
# Names of worldplay.nn.attention.BACKENDS (kept here so that this module needs no torch; a test
# checks that both lists agree).
ATTENTION_BACKENDS = ("sdpa", "fa4", "cudnn", "flash", "efficient", "math")
OFFICIAL_NOISE_LATENTS = 241  # worldplay.rollout.OFFICIAL_NOISE_LATENTS
CHUNK_LATENTS = 4
SPATIAL_MULTIPLE = 32  # VAE stride 16 x DiT patch 2

NATIVE_LEGS = ("native-eager", "native-fastest", "native-float32", "native-compiled", "native-reuse", "native-fp8",
               "native-reuse-fp8")
# Bench only: DiT on GPU 0 and VAE decode on GPU 1, pipelined across chunks (worldplay.pipelined).
PIPELINED_LEGS = ("native-2gpu", "native-2gpu-reuse", "native-2gpu-reuse-fp8")
OFFICIAL_LEG = "official"
LEGS = (*NATIVE_LEGS, *PIPELINED_LEGS, OFFICIAL_LEG)
LEG_HELP = {
    "native-eager": "this package, bf16, eager, the config's attention_backend",
    "native-fastest": "this package with the fastest known settings (worldplay.experiments.legs.fastest_settings)",
    "native-float32": "this package, the same weights cast to float32, float32 RoPE tables",
    "native-compiled": "this package, bf16, torch.compile'd DiT blocks (RolloutSettings.accel='compile')",
    "native-reuse": "the fastest settings with memory_mode='reuse' (a fast approximation: memory K/V kept "
    "across chunks instead of re-prefilled)",
    "native-2gpu": "the fastest settings over two GPUs: DiT on GPU 0, VAE decode of the previous chunk on GPU 1 "
    "(bench only; its total is the pipelined time per chunk)",
    "native-2gpu-reuse": "native-2gpu with memory_mode='reuse'",
    "native-2gpu-reuse-fp8": "native-2gpu with memory_mode='reuse' and linear_dtype='fp8'",
    "native-fp8": "the fastest settings with linear_dtype='fp8' (a fast approximation: the DiT blocks' linear "
    "layers in e4m3 with per-row scales)",
    "native-reuse-fp8": "the fastest settings with memory_mode='reuse' and linear_dtype='fp8'",
    "official": "the official HY-WorldPlay code (needs --official PATH or WORLDPLAY_OFFICIAL)",
}
PARITY_FLOORS = ("repeat", "compile-toggle", "none")
SYNTHETIC_IMAGE = "synthetic"
INPUT_PREFIX = "input:"
TINY_CPU_SUFFIX = "-tiny-cpu"
_HUB_SPEC = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+@[0-9a-f]{40}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_REQUIRED = object()


class ExperimentConfigError(ValueError):
    """A pinned experiment config is invalid; ``key`` is the dotted path of the culprit."""

    def __init__(self, source: str, key: str, message: str):
        self.source = source
        self.key = key
        where = f"key '{key}'" if key else "config"
        super().__init__(f"{source}: {where}: {message}")


# ---------------------------------------------------------------------------------------------
# Config dataclasses
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WeightsSpec:
    """Where the weights come from: exactly one of ``random_init``, ``path``, ``hub``.

    ``path``: a local HY-WorldPlay snapshot (``wan_transformer/``, ``wan_distilled_model/``);
    ``hub``: ``tencent/HY-WorldPlay@<40-hex commit>``. Both need ``base``: the Wan 2.2 TI2V-5B
    diffusers snapshot (``vae/``, ``text_encoder/``, ``tokenizer/``) as a local path or
    ``repo@commit``. Paths may use ``~`` and ``$VARS``; the hash covers the text as written
    (the files' sha256s are recorded in the provenance).
    """

    random_init: int | None = None
    path: str | None = None
    hub: str | None = None
    base: str | None = None

    @property
    def is_random(self) -> bool:
        return self.random_init is not None

    def describe(self) -> str:
        if self.random_init is not None:
            return f"random-init:{self.random_init}"
        return f"{'hub ' + self.hub if self.hub else 'path ' + str(self.path)} + base {self.base}"


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """Keys shared by every kind."""

    name: str
    kind: str
    description: str = ""
    preset: str
    device: str
    weights: WeightsSpec
    resolution: tuple[int, int]
    num_chunk: int
    seed: int = 0
    attention_backend: str = "sdpa"
    noise_latents: int = OFFICIAL_NOISE_LATENTS

    @property
    def device_class(self) -> str:
        """``cpu-tiny`` (CPU, tiny preset), ``gpu`` (CUDA, wan5b) or ``gpu-tiny``."""
        if self.device == "cpu":
            return "cpu-tiny"
        return "gpu" if self.preset == "wan5b" else "gpu-tiny"

    @property
    def legs_used(self) -> tuple[str, ...]:
        return tuple(getattr(self, "legs", ()) or (getattr(self, "leg", None),))

    @property
    def needs_official(self) -> bool:
        return OFFICIAL_LEG in self.legs_used

    def resolved(self) -> dict[str, Any]:
        """Every key with its value (defaults filled in), JSON-ready; ``name`` excluded."""
        out = _jsonable(dataclasses.asdict(self))
        out.pop("name")
        return out

    def hashed_content(self) -> dict[str, Any]:
        """What the hash covers: the resolved config without ``description`` (documentation
        only), plus the schema version (bumped when a key's meaning changes)."""
        out = self.resolved()
        out.pop("description")
        out["schema_version"] = SCHEMA_VERSION
        return out

    @property
    def config_hash(self) -> str:
        return config_hash(self.hashed_content())


@dataclass(frozen=True, kw_only=True)
class BenchConfig(ExperimentConfig):
    legs: tuple[str, ...]
    pose: str
    image: str = SYNTHETIC_IMAGE
    warmup_chunks: int
    repetitions: int = 1
    official_compile: bool = True


@dataclass(frozen=True, kw_only=True)
class RolloutsConfig(ExperimentConfig):
    inputs: tuple[str, ...]
    poses: tuple[str, ...]
    leg: str = "native-eager"


@dataclass(frozen=True, kw_only=True)
class DriftConfig(ExperimentConfig):
    legs: tuple[str, ...]  # (test leg, reference leg)
    pose: str
    image: str = SYNTHETIC_IMAGE
    official_compile: bool = True


@dataclass(frozen=True, kw_only=True)
class ParityConfig(ExperimentConfig):
    legs: tuple[str, ...]  # (native leg, "official")
    pose: str
    image: str = SYNTHETIC_IMAGE
    floor: str = "repeat"
    official_compile: bool = True


CONFIG_CLASSES: dict[str, type[ExperimentConfig]] = {
    "bench": BenchConfig,
    "rollouts": RolloutsConfig,
    "drift": DriftConfig,
    "parity": ParityConfig,
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def config_hash(content: Mapping[str, Any]) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace, ASCII)."""
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Value checks: each takes (value, key) and returns the normalised value or raises _Bad
# ---------------------------------------------------------------------------------------------


class _Bad(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _show(value: Any) -> str:
    text = repr(value)
    return (text if len(text) <= 60 else text[:57] + "...") + f" ({type(value).__name__})"


def _int(minimum: int = 0) -> Callable[[Any, str], int]:
    def check(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _Bad(key, f"expected an integer >= {minimum}, got {_show(value)}")
        return value

    return check


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _Bad(key, f"expected a string, got {_show(value)}")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _Bad(key, f"expected true or false, got {_show(value)}")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[Any, str], str]:
    def check(value: Any, key: str) -> str:
        if not isinstance(value, str) or value not in options:
            raise _Bad(key, f"expected one of {list(options)}, got {_show(value)}")
        return value

    return check


def _str_list(item: Callable[[Any, str], str], *, length: int | None = None) -> Callable[[Any, str], tuple]:
    def check(value: Any, key: str) -> tuple:
        if not isinstance(value, list) or not value:
            raise _Bad(key, f"expected a non-empty list, got {_show(value)}")
        if length is not None and len(value) != length:
            raise _Bad(key, f"expected exactly {length} entries, got {len(value)}")
        items = tuple(item(v, f"{key}[{i}]") for i, v in enumerate(value))
        for i, v in enumerate(items):
            if v in items[:i]:
                raise _Bad(f"{key}[{i}]", f"{v!r} is listed twice")
        return items

    return check


def _resolution(value: Any, key: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2):
        raise _Bad(key, f"expected [height, width], got {_show(value)}")
    out = []
    for i, side in enumerate(value):
        if isinstance(side, bool) or not isinstance(side, int) or side <= 0 or side % SPATIAL_MULTIPLE:
            raise _Bad(f"{key}[{i}]", f"expected a positive multiple of {SPATIAL_MULTIPLE}, got {_show(side)}")
        out.append(side)
    return out[0], out[1]


COMMON_FIELDS: dict[str, tuple[Callable[[Any, str], Any], Any, str]] = {
    # key: (check, default or _REQUIRED, help)
    "kind": (_choice(KINDS), _REQUIRED, f"one of {list(KINDS)}"),
    "description": (_str, "", "free text for the site (not hashed)"),
    "preset": (_choice(tuple(PRESET_RESOLUTION)), _REQUIRED, "model size"),
    "device": (_choice(DEVICES), _REQUIRED, "where the native legs run"),
    "weights": (None, _REQUIRED, "table: exactly one of random_init / path / hub (+ base)"),
    "resolution": (_resolution, None, "[height, width], multiples of 32"),
    "num_chunk": (_int(1), _REQUIRED, "chunks per rollout (4 latents, 16 frames each)"),
    "seed": (_int(0), 0, "sampling seed"),
    "attention_backend": (_choice(ATTENTION_BACKENDS), "sdpa", "attention kernel of the native-eager leg"),
    "noise_latents": (_int(1), OFFICIAL_NOISE_LATENTS, "latents of the seeded noise tensor (official: 241)"),
}
KIND_FIELDS: dict[str, dict[str, tuple[Callable[[Any, str], Any], Any, str]]] = {
    "bench": {
        "legs": (_str_list(_choice(LEGS)), _REQUIRED, f"subset of {list(LEGS)}"),
        "pose": (_str, _REQUIRED, "pose string or input:<id>"),
        "image": (_str, SYNTHETIC_IMAGE, "'synthetic' or an image id of inputs.toml"),
        "warmup_chunks": (_int(0), _REQUIRED, "leading chunks of each rollout left out of the steady state"),
        "repetitions": (_int(1), 1, "rollouts per leg"),
        "official_compile": (_bool, True, "the official code's own torch.compile (as shipped: true)"),
    },
    "rollouts": {
        "inputs": (_str_list(_str), _REQUIRED, "image ids of inputs.toml"),
        "poses": (_str_list(_str), _REQUIRED, "pose strings or input:<id>"),
        "leg": (_choice(NATIVE_LEGS), "native-eager", f"one of {list(NATIVE_LEGS)}"),
    },
    "drift": {
        "legs": (_str_list(_choice(LEGS), length=2), _REQUIRED, "[test leg, reference leg]"),
        "pose": (_str, _REQUIRED, "pose string or input:<id>"),
        "image": (_str, SYNTHETIC_IMAGE, "'synthetic' or an image id of inputs.toml"),
        "official_compile": (_bool, True, "the official code's own torch.compile"),
    },
    "parity": {
        "legs": (_str_list(_choice(LEGS), length=2), _REQUIRED, "[native leg, 'official']"),
        "pose": (_str, _REQUIRED, "pose string or input:<id>"),
        "image": (_str, SYNTHETIC_IMAGE, "'synthetic' or an image id of inputs.toml"),
        "floor": (_choice(PARITY_FLOORS), "repeat", "official vs official: run twice, or toggle its compile"),
        "official_compile": (_bool, True, "the official code's own torch.compile"),
    },
}
WEIGHTS_KEYS = ("random_init", "path", "hub", "base")


def allowed_keys(kind: str) -> list[str]:
    return sorted({*COMMON_FIELDS, *KIND_FIELDS[kind]})


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _weights(value: Any) -> WeightsSpec:
    if not isinstance(value, dict):
        raise _Bad("weights", f"expected a table ([weights]), got {_show(value)}")
    unknown = sorted(set(value) - set(WEIGHTS_KEYS))
    if unknown:
        raise _Bad(f"weights.{unknown[0]}", f"unknown key; allowed keys in [weights]: {list(WEIGHTS_KEYS)}")
    sources = [k for k in ("random_init", "path", "hub") if k in value]
    if len(sources) != 1:
        raise _Bad("weights", f"give exactly one of random_init, path, hub (got {sources or 'none'})")
    spec: dict[str, Any] = {}
    if "random_init" in value:
        spec["random_init"] = _int(0)(value["random_init"], "weights.random_init")
        if "base" in value:
            raise _Bad("weights.base", "only used with path or hub; random_init needs no base")
    else:
        source = sources[0]
        spec[source] = _str(value[source], f"weights.{source}")
        if source == "hub" and not _HUB_SPEC.match(spec[source]):
            raise _Bad("weights.hub", "expected 'owner/name@<40-hex commit>' (pin the commit)")
        if "base" not in value:
            raise _Bad("weights.base", f"required with {source}: the Wan 2.2 TI2V-5B diffusers snapshot "
                                       "(a local path or 'owner/name@<40-hex commit>')")
        spec["base"] = _str(value["base"], "weights.base")
    return WeightsSpec(**spec)


def load_config(path: str | Path, *, input_ids: Mapping[str, str] | None = None) -> ExperimentConfig:
    """Load and validate ``experiments/<name>.toml``.

    ``input_ids`` maps the ids of the input manifest to their kind (``image``, ``pose``,
    ``captions``); when given, image and ``input:`` pose references are checked against it.
    """
    path = Path(path)
    source = str(path)
    name = path.stem
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExperimentConfigError(source, "", "no such experiment config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentConfigError(source, "", f"not valid TOML: {exc}") from None
    try:
        return _build(name, data, input_ids)
    except _Bad as bad:
        raise ExperimentConfigError(source, bad.key, str(bad)) from None


def _build(name: str, data: dict[str, Any], input_ids: Mapping[str, str] | None) -> ExperimentConfig:
    if not _NAME.match(name):
        raise _Bad("", f"experiment name {name!r}: use lower-case letters, digits and '-'")
    if "kind" not in data:
        raise _Bad("kind", f"missing; one of {list(KINDS)}")
    kind = _choice(KINDS)(data["kind"], "kind")
    fields = {**COMMON_FIELDS, **KIND_FIELDS[kind]}
    for key in data:
        if key not in fields:
            raise _Bad(key, f"unknown key for kind '{kind}'; allowed keys: {allowed_keys(kind)}")
    values: dict[str, Any] = {}
    for key, (check, default, help_text) in fields.items():
        if key not in data:
            if default is _REQUIRED:
                raise _Bad(key, f"missing ({help_text})")
            continue
        values[key] = _weights(data[key]) if key == "weights" else check(data[key], key)
    values.setdefault("resolution", PRESET_RESOLUTION[values["preset"]])
    config = CONFIG_CLASSES[kind](name=name, **values)
    _check_combinations(config, input_ids)
    return config


def _check_combinations(cfg: ExperimentConfig, input_ids: Mapping[str, str] | None) -> None:
    need = cfg.num_chunk * CHUNK_LATENTS
    if cfg.device == "cpu" and cfg.preset != "tiny":
        raise _Bad("device", "the CPU runs only preset 'tiny' (wan5b needs a CUDA GPU)")
    is_tiny_cpu = cfg.device == "cpu"
    if is_tiny_cpu != cfg.name.endswith(TINY_CPU_SUFFIX):
        raise _Bad("device", f"CPU experiments (and only they) are named '*{TINY_CPU_SUFFIX}' so that their "
                             f"results stay apart from GPU results; '{cfg.name}' has device '{cfg.device}'")
    if cfg.noise_latents < need:
        raise _Bad("noise_latents", f"{cfg.noise_latents} < the {need} latents of {cfg.num_chunk} chunks")
    if cfg.attention_backend in ("cudnn", "fa4") and cfg.device == "cpu":
        raise _Bad("attention_backend", f"'{cfg.attention_backend}' attention runs only on CUDA")
    legs = getattr(cfg, "legs", None)
    pipelined = sorted(set(legs or ()) & set(PIPELINED_LEGS))
    if pipelined and cfg.kind != "bench":
        raise _Bad("legs", f"{pipelined} run only in a bench; a {cfg.kind} takes {list(NATIVE_LEGS)} or 'official'")
    if pipelined and cfg.device != "cuda":
        raise _Bad("legs", f"{pipelined} need two CUDA GPUs (device = \"cuda\")")
    if legs and OFFICIAL_LEG in legs and (cfg.preset != "wan5b" or cfg.device != "cuda"):
        raise _Bad("legs", "the official leg runs only the real architecture on a GPU "
                           "(preset 'wan5b', device 'cuda')")
    if legs and OFFICIAL_LEG in legs and cfg.resolution != PRESET_RESOLUTION["wan5b"]:
        raise _Bad("resolution", "the official code hard-codes 704x1280; use [704, 1280] with the official leg")
    if not cfg.weights.is_random and cfg.preset != "wan5b":
        raise _Bad("weights", "real checkpoints have the wan5b architecture; use preset 'wan5b' or random_init")
    if isinstance(cfg, BenchConfig) and cfg.warmup_chunks >= cfg.num_chunk:
        raise _Bad("warmup_chunks", f"{cfg.warmup_chunks} leaves no steady-state chunk of {cfg.num_chunk}; "
                                    f"use at most {cfg.num_chunk - 1}")
    if isinstance(cfg, ParityConfig):
        if legs[1] != OFFICIAL_LEG or legs[0] == OFFICIAL_LEG:
            raise _Bad("legs", f"parity compares a native leg with the official one: [<one of {list(NATIVE_LEGS)}>, "
                               f"'official'], got {list(legs)}")
    if isinstance(cfg, RolloutsConfig):
        for i, pose in enumerate(cfg.poses):
            _check_pose(pose, f"poses[{i}]", need, cfg.num_chunk, input_ids)
        for i, image in enumerate(cfg.inputs):
            _check_input(image, f"inputs[{i}]", "image", input_ids)
    else:
        _check_pose(cfg.pose, "pose", need, cfg.num_chunk, input_ids)
        if cfg.image != SYNTHETIC_IMAGE:
            _check_input(cfg.image, "image", "image", input_ids)


def _check_input(ident: str, key: str, kind: str, input_ids: Mapping[str, str] | None) -> None:
    if input_ids is None:
        return
    if input_ids.get(ident) != kind:
        options = sorted(k for k, v in input_ids.items() if v == kind)
        raise _Bad(key, f"{ident!r} is not {'an' if kind[0] in 'aeiou' else 'a'} {kind} id of the input manifest; choose one of {options}"
                        + (" or 'synthetic'" if key == "image" else ""))


def _check_pose(pose: str, key: str, need: int, num_chunk: int, input_ids: Mapping[str, str] | None) -> None:
    if pose.startswith(INPUT_PREFIX):
        _check_input(pose[len(INPUT_PREFIX):], key, "pose", input_ids)
        return  # its length is checked when the file is resolved, before any model work
    from ..pose import PoseError, trajectory_from_pose_string

    try:
        latents = trajectory_from_pose_string(pose).num_latents
    except PoseError as exc:
        raise _Bad(key, str(exc)) from None
    if latents < need:
        raise _Bad(key, f"{pose!r} gives {latents} latents but num_chunk={num_chunk} needs {need} "
                        f"(a pose string of S steps gives S+1 latents; e.g. 'w-{need - 1}')")


def experiment_names(experiments_dir: str | Path) -> list[str]:
    """Names of the pinned configs in ``experiments_dir`` (``inputs.toml`` is the manifest)."""
    return sorted(p.stem for p in Path(experiments_dir).glob("*.toml") if p.name != "inputs.toml")
