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
import difflib
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constants import ATTENTION_BACKENDS, CHUNK_LATENTS, OFFICIAL_NOISE_LATENTS, PRESET_RESOLUTION
from ..pose import (
    MAX_CHUNKS,
    MAX_LATENTS,
    PoseError,
    excerpt,
    parse_pose_string,
    plural,
    pose_slug,
)
from .inputs import TomlReadError, read_toml
from .leg_table import NATIVE, OFFICIAL, OFFICIAL_RANKS, PIPELINED, RANKS, ROWS, leg_row, names

SCHEMA_VERSION = 1
KINDS = ("bench", "rollouts", "drift", "parity", "interactive", "per-input")
DEVICES = ("cuda", "cpu")
SPATIAL_MULTIPLE = 32  # VAE stride 16 x DiT patch 2
# Largest image side (height or width) accepted, 3.2x the real model's 1280. Not a model limit
# but a guard against typos such as 70400, which would allocate gigabytes before failing.
MAX_SIDE = 4096
# Seeds go to torch.Generator.manual_seed; TOML integers are 64-bit signed, so this is the
# largest seed a TOML file can portably hold (tomllib itself accepts any size).
MAX_SEED = 2**63 - 1
# A bench's mean and spread need a handful of rollouts; more than this is a typo that would
# run for days.
MAX_REPETITIONS = 100

# The legs, from the one table of them (worldplay.experiments.leg_table).
NATIVE_LEGS = names(NATIVE)
# Bench only: DiT on GPU 0 and VAE decode on GPU 1, pipelined across chunks (worldplay.pipelined).
PIPELINED_LEGS = names(PIPELINED)
OFFICIAL_LEG = "official"
# N ranks, one GPU each (worldplay.ranks): the fastest settings with the DiT in sequence parallel
# and the VAE decode split by columns; the official code at world size N (its sequence parallel
# and parallel VAE).
RANKED_LEGS = names(RANKS)
OFFICIAL_RANKED_LEGS = names(OFFICIAL_RANKS)
LEGS = (*NATIVE_LEGS, *PIPELINED_LEGS, *RANKED_LEGS, *names(OFFICIAL), *OFFICIAL_RANKED_LEGS)
LEG_HELP = {row.name: row.help for row in ROWS}


def ranks_of(leg: str) -> int:
    """Ranks (processes, GPUs) a leg runs on."""
    return leg_row(leg).ranks


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
        # A key is input too (TOML keys may hold any text): shown on one bounded line.
        where = f"key '{excerpt(key, 60)}'" if key else "config"
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
    # Names this experiment's results were filed under before a rename (e.g. a card's name):
    # not hashed; their runs stay where they are and are shown as its history (site, `check`).
    earlier_names: tuple[str, ...] = ()
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
        return bool({OFFICIAL_LEG, *OFFICIAL_RANKED_LEGS} & set(self.legs_used))

    def resolved(self) -> dict[str, Any]:
        """Every key with its value (defaults filled in), JSON-ready; ``name`` and
        ``earlier_names`` (what the experiment is called, not what it measures) excluded."""
        out = _jsonable(dataclasses.asdict(self))
        out.pop("name")
        out.pop("earlier_names")
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


@dataclass(frozen=True, kw_only=True)
class InteractiveConfig(ExperimentConfig):
    """``worldplay serve`` driven by the scripted client (worldplay.experiments.kinds.interactive)."""

    script: str  # the client's key schedule (worldplay.serve.client.parse_schedule)
    leg: str = "native-fastest"
    image: str = SYNTHETIC_IMAGE
    lead: int = 1
    warmup_chunks: int = 0


@dataclass(frozen=True, kw_only=True)
class PerInputConfig(ExperimentConfig):
    """A bench and a parity per sample input, in one run (``kinds/per_input.py``): the legs of
    ``speed_legs`` are timed, the legs of ``parity_legs`` compared frame by frame; a leg named in
    both (the reference, e.g. ``official``) runs once per input and serves both."""

    inputs: tuple[str, ...]
    pose: str
    speed_legs: tuple[str, ...]  # (test leg, reference leg): steady medians and reference / test
    parity_legs: tuple[str, ...]  # (test leg, reference leg): frames and latents compared
    warmup_chunks: int
    official_compile: bool = True

    @property
    def legs(self) -> tuple[str, ...]:
        """Every leg the run needs, each once (speed legs first)."""
        return tuple(dict.fromkeys((*self.speed_legs, *self.parity_legs)))


CONFIG_CLASSES: dict[str, type[ExperimentConfig]] = {
    "bench": BenchConfig,
    "rollouts": RolloutsConfig,
    "drift": DriftConfig,
    "parity": ParityConfig,
    "interactive": InteractiveConfig,
    "per-input": PerInputConfig,
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


def _int(minimum: int, maximum: int) -> Callable[[Any, str], int]:
    """An integer in ``[minimum, maximum]``: every numeric key has both bounds, so no value can
    reach the run that the run cannot take (a seed beyond 64 bits, 10^12 noise latents)."""

    def check(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise _Bad(key, f"expected an integer from {minimum} to {maximum}, got {_show(value)}")
        return value

    return check


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _Bad(key, f"expected a string, got {_show(value)}")
    return value


def _experiment_name(value: Any, key: str) -> str:
    name = _str(value, key)
    if not _NAME.match(name):
        raise _Bad(key, f"{excerpt(name, 60)!r} is not an experiment name (lower-case letters, digits and '-')")
    return name


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _Bad(key, f"expected true or false, got {_show(value)}")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[Any, str], str]:
    def check(value: Any, key: str) -> str:
        if not isinstance(value, str) or value not in options:
            raise _Bad(key, f"expected {_one_of(options, value)}, got {_show(value)}")
        return value

    return check


def _one_of(options: tuple[str, ...], value: Any) -> str:
    """The choices, all of them while they fit in a line, else the closest ones and the count
    (the leg table grows; the full list is in experiments/README.md)."""
    if len(repr(list(options))) <= 160:
        return f"one of {list(options)}"
    close = difflib.get_close_matches(value, options, n=4, cutoff=0.5) if isinstance(value, str) else []
    if not close:
        close = list(options[:4])
    return f"one of {len(options)} names such as {close} (experiments/README.md lists them)"


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


def side_problem(side: Any) -> str | None:
    """Why ``side`` cannot be an image height or width, or None: the one rule for configs and
    the CLI's ``--height``/``--width`` (a positive multiple of the model's stride, at most MAX_SIDE)."""
    is_int = isinstance(side, int) and not isinstance(side, bool)
    if not is_int or not 0 < side <= MAX_SIDE or side % SPATIAL_MULTIPLE:
        shown = side if is_int else _show(side)
        return f"expected a multiple of {SPATIAL_MULTIPLE} from {SPATIAL_MULTIPLE} to {MAX_SIDE}, got {shown}"
    return None


def image_side(text: str) -> int:
    """``argparse`` type for ``--height``/``--width``: refuses ``0`` (which used to mean "the
    preset's default" without a word), negative and unaligned sizes, as a usage error (exit 2)."""
    import argparse

    try:
        side = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{excerpt(text, 20)!r} is not a whole number of pixels") from None
    problem = side_problem(side)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return side


def _resolution(value: Any, key: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2):
        raise _Bad(key, f"expected [height, width], got {_show(value)}")
    for i, side in enumerate(value):
        problem = side_problem(side)
        if problem is not None:
            raise _Bad(f"{key}[{i}]", problem)
    return value[0], value[1]


COMMON_FIELDS: dict[str, tuple[Callable[[Any, str], Any], Any, str]] = {
    # key: (check, default or _REQUIRED, help)
    "kind": (_choice(KINDS), _REQUIRED, f"one of {list(KINDS)}"),
    "description": (_str, "", "free text for the site (not hashed)"),
    "earlier_names": (_str_list(_experiment_name), (),
                      "names its results were filed under before a rename (not hashed; shown as its history)"),
    "preset": (_choice(tuple(PRESET_RESOLUTION)), _REQUIRED, "model size"),
    "device": (_choice(DEVICES), _REQUIRED, "where the native legs run"),
    "weights": (None, _REQUIRED, "table: exactly one of random_init / path / hub (+ base)"),
    "resolution": (_resolution, None, f"[height, width], multiples of {SPATIAL_MULTIPLE} up to {MAX_SIDE}"),
    "num_chunk": (_int(1, MAX_CHUNKS), _REQUIRED, f"chunks per rollout (4 latents, 16 frames each; at most {MAX_CHUNKS})"),
    "seed": (_int(0, MAX_SEED), 0, "sampling seed"),
    "attention_backend": (_choice(ATTENTION_BACKENDS), "sdpa", "attention kernel of the native-eager leg"),
    "noise_latents": (_int(1, MAX_LATENTS), OFFICIAL_NOISE_LATENTS, "latents of the seeded noise tensor (official: 241)"),
}
KIND_FIELDS: dict[str, dict[str, tuple[Callable[[Any, str], Any], Any, str]]] = {
    "bench": {
        "legs": (_str_list(_choice(LEGS)), _REQUIRED, f"subset of {list(LEGS)}"),
        "pose": (_str, _REQUIRED, "pose string or input:<id>"),
        "image": (_str, SYNTHETIC_IMAGE, "'synthetic' or an image id of inputs.toml"),
        "warmup_chunks": (_int(0, MAX_CHUNKS - 1), _REQUIRED, "leading chunks of each rollout left out of the steady state"),
        "repetitions": (_int(1, MAX_REPETITIONS), 1, "rollouts per leg"),
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
    "interactive": {
        "script": (_str, _REQUIRED, "key schedule of the scripted client, e.g. 'c0f8:w,c3:w+left,c6:' (cCHUNKfFRAME: "
                                    "when that frame is shown; SECONDS: after the world started)"),
        "leg": (_choice(NATIVE_LEGS), "native-fastest", f"one of {list(NATIVE_LEGS)}"),
        "image": (_str, SYNTHETIC_IMAGE, "'synthetic' or an image id of inputs.toml"),
        "lead": (_int(1, 4), 1, "chunks the server generates ahead of the one playing (worldplay serve --lead)"),
        "warmup_chunks": (_int(0, MAX_CHUNKS), 0, "chunks of a first, unmeasured world (compiles, CUDA-graph "
                                                  "captures), played before the measured one"),
    },
    "per-input": {
        "inputs": (_str_list(_str), _REQUIRED, "image ids of inputs.toml, one result row each"),
        "pose": (_str, _REQUIRED, "pose string or input:<id>"),
        "speed_legs": (_str_list(_choice((*NATIVE_LEGS, OFFICIAL_LEG)), length=2), _REQUIRED,
                       "[test leg, reference leg], timed"),
        "parity_legs": (_str_list(_choice((*NATIVE_LEGS, OFFICIAL_LEG)), length=2), _REQUIRED,
                        "[test leg, reference leg], compared frame by frame"),
        "warmup_chunks": (_int(0, MAX_CHUNKS - 1), _REQUIRED, "leading chunks of each rollout left out of the steady state"),
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
        spec["random_init"] = _int(0, MAX_SEED)(value["random_init"], "weights.random_init")
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
        data = read_toml(path)
    except FileNotFoundError:
        raise ExperimentConfigError(source, "", "no such experiment config") from None
    except TomlReadError as exc:
        raise ExperimentConfigError(source, "", str(exc)) from None
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
    if cfg.name in cfg.earlier_names:
        raise _Bad("earlier_names", f"lists the experiment's own name '{cfg.name}'; list only the names it had before")
    if cfg.device == "cpu" and cfg.preset != "tiny":
        raise _Bad("device", "the CPU runs only preset 'tiny' (wan5b needs a CUDA GPU)")
    is_tiny_cpu = cfg.device == "cpu"
    if is_tiny_cpu != cfg.name.endswith(TINY_CPU_SUFFIX):
        raise _Bad("device", f"CPU experiments (and only they) are named '*{TINY_CPU_SUFFIX}' so that their "
                             f"results stay apart from GPU results; '{cfg.name}' has device '{cfg.device}'")
    if cfg.noise_latents < need:
        raise _Bad("noise_latents", f"{cfg.noise_latents} < the {need} latents of {plural(cfg.num_chunk, 'chunk')}")
    if cfg.attention_backend in ("cudnn", "fa4") and cfg.device == "cpu":
        raise _Bad("attention_backend", f"'{cfg.attention_backend}' attention runs only on CUDA")
    legs = getattr(cfg, "legs", None)
    pipelined = sorted(set(legs or ()) & set(PIPELINED_LEGS))
    if pipelined and cfg.kind != "bench":
        raise _Bad("legs", f"{pipelined} run only in a bench; a {cfg.kind} takes {list(NATIVE_LEGS)} or 'official'")
    if pipelined and cfg.device != "cuda":
        raise _Bad("legs", f"{pipelined} need two CUDA GPUs (device = \"cuda\")")
    ranked = sorted(set(legs or ()) & set(RANKED_LEGS))
    if ranked and cfg.kind not in ("bench", "drift"):
        raise _Bad("legs", f"{ranked} run in a bench or a drift; a {cfg.kind} takes one process per leg")
    if ranked and cfg.preset == "tiny" and any(ranks_of(n) > 2 for n in ranked):
        raise _Bad("legs", f"{ranked}: the tiny preset's 2 attention heads split over 2 ranks only; use 'native-sp2' or 'native-sp2-one-gpu'")
    officials = cfg.needs_official
    if legs and officials and (cfg.preset != "wan5b" or cfg.device != "cuda"):
        raise _Bad("legs", "the official leg runs only the real architecture on a GPU "
                           "(preset 'wan5b', device 'cuda')")
    if officials and set(legs) & set(OFFICIAL_RANKED_LEGS) and cfg.kind != "bench":
        raise _Bad("legs", f"{sorted(set(legs) & set(OFFICIAL_RANKED_LEGS))} run only in a bench")
    if legs and officials and cfg.resolution != PRESET_RESOLUTION["wan5b"]:
        raise _Bad("resolution", "the official code hard-codes 704x1280; use [704, 1280] with the official leg")
    if not cfg.weights.is_random and cfg.preset != "wan5b":
        raise _Bad("weights", "real checkpoints have the wan5b architecture; use preset 'wan5b' or random_init")
    if isinstance(cfg, (BenchConfig, PerInputConfig)) and cfg.warmup_chunks >= cfg.num_chunk:
        raise _Bad("warmup_chunks", f"{cfg.warmup_chunks} leaves no steady-state chunk of the "
                                    f"{plural(cfg.num_chunk, 'chunk')}; use at most {cfg.num_chunk - 1}")
    if isinstance(cfg, ParityConfig):
        if legs[1] != OFFICIAL_LEG or legs[0] == OFFICIAL_LEG:
            raise _Bad("legs", f"parity compares a native leg with the official one: [<one of {list(NATIVE_LEGS)}>, "
                               f"'official'], got {list(legs)}")
    if isinstance(cfg, PerInputConfig):
        _check_per_input_legs(cfg)
        for i, image in enumerate(cfg.inputs):
            _check_input(image, f"inputs[{i}]", "image", input_ids)
        _check_pose(cfg.pose, "pose", need, cfg.num_chunk, input_ids)
    elif isinstance(cfg, RolloutsConfig):
        for i, pose in enumerate(cfg.poses):
            _check_pose(pose, f"poses[{i}]", need, cfg.num_chunk, input_ids)
        _check_slugs(cfg.poses)
        for i, image in enumerate(cfg.inputs):
            _check_input(image, f"inputs[{i}]", "image", input_ids)
    elif isinstance(cfg, InteractiveConfig):
        _check_script(cfg.script, cfg.num_chunk)
        if cfg.image != SYNTHETIC_IMAGE:
            _check_input(cfg.image, "image", "image", input_ids)
    else:
        _check_pose(cfg.pose, "pose", need, cfg.num_chunk, input_ids)
        if cfg.image != SYNTHETIC_IMAGE:
            _check_input(cfg.image, "image", "image", input_ids)


def _check_script(script: str, num_chunk: int) -> None:
    from ..serve.client import parse_schedule  # torch-free, like this module

    try:
        holds = parse_schedule(script)
    except ValueError as exc:
        raise _Bad("script", str(exc)) from None
    if not holds:
        raise _Bad("script", "no key change; e.g. 'c0f8:w,c3:w+left,c6:'")
    late = [h for h in holds if h.at_chunk is not None and h.at_chunk >= num_chunk]
    if late:
        raise _Bad("script", f"a change at chunk {late[0].at_chunk} never happens in {plural(num_chunk, 'chunk')} "
                             f"(chunks 0-{num_chunk - 1})")
def _check_per_input_legs(cfg: PerInputConfig) -> None:
    """Both pairs end in one shared reference leg (run once per input, timed and compared), and
    the official leg, where listed, is that reference: it runs after every native leg."""
    for key, (test, ref) in (("speed_legs", cfg.speed_legs), ("parity_legs", cfg.parity_legs)):
        if test == OFFICIAL_LEG:
            raise _Bad(f"{key}[0]", f"the official leg is the reference (second) entry; got {[test, ref]}")
    if cfg.speed_legs[1] != cfg.parity_legs[1]:
        raise _Bad("parity_legs[1]", f"the reference leg is shared: {cfg.parity_legs[1]!r} differs from "
                                     f"speed_legs[1] {cfg.speed_legs[1]!r}; use the same leg in both")


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
    try:
        # S steps give S + 1 latents; counted from the parse, without integrating the camera path.
        latents = sum(command.steps for command in parse_pose_string(pose)) + 1
    except PoseError as exc:
        raise _Bad(key, str(exc)) from None
    if latents < need:
        # need <= MAX_LATENTS (num_chunk is capped at MAX_CHUNKS), so the suggestion is a valid pose.
        raise _Bad(key, f"'{excerpt(pose, 60)}' gives {plural(latents, 'latent')} but num_chunk={num_chunk} needs "
                        f"{need} (a pose string of S steps gives S+1 latents; e.g. 'w-{need - 1}')")


def _check_slugs(poses: tuple[str, ...]) -> None:
    """Refuse two spellings of one pose: a rollout names each video by the pose's slug, so the
    second would collide with the first one's video after the first rollout had run."""
    seen: dict[str, int] = {}
    for i, pose in enumerate(poses):
        slug = pose_slug(pose)
        if slug in seen:
            j = seen[slug]
            raise _Bad(f"poses[{i}]", f"'{excerpt(pose, 60)}' and poses[{j}] '{excerpt(poses[j], 60)}' are spelled "
                                      f"differently but give the same video name '{excerpt(slug, 60)}'; "
                                      "list each pose once")
        seen[slug] = i


def experiment_names(experiments_dir: str | Path) -> list[str]:
    """Names of the pinned configs in ``experiments_dir`` (``inputs.toml`` is the manifest)."""
    return sorted(p.stem for p in Path(experiments_dir).glob("*.toml") if p.name != "inputs.toml")
