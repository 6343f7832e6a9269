"""The input manifest (``experiments/inputs.toml``): public URL + sha256 for every input file.

The official sample images, captions and trajectory are licensed separately and never
committed; experiments name them by id. Resolution, in order:

1. ``$WORLDPLAY_DATA_DIR/<file name>`` if that file exists (offline machines point this at a
   copy of the official ``assets/`` files);
2. the download cache (``$WORLDPLAY_CACHE_DIR/inputs``, default ``~/.cache/worldplay/inputs``);
3. a download over https into the cache.

Every file is verified against the manifest's sha256 each time it is resolved: a mismatch is
an :class:`InputDigestError`, never a silent use (a bad local copy is not skipped over either).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import sha256_file as sha256_of  # the name callers (and test doubles) use
from ..pose import excerpt

log = logging.getLogger(__name__)

DATA_DIR_ENV = "WORLDPLAY_DATA_DIR"
CACHE_DIR_ENV = "WORLDPLAY_CACHE_DIR"
INPUT_KINDS = ("image", "captions", "pose")
_SHA256_HEX = set("0123456789abcdef")
_INPUT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _kind_of(value: Any) -> str:
    """A manifest value for a message: its TOML-ish type and a bounded, one-line repr."""
    return f"{excerpt(repr(value), 60)} ({type(value).__name__})"


class InputError(ValueError):
    """An input cannot be resolved (unknown id, bad manifest, unreachable, ...)."""


class TomlReadError(ValueError):
    """A TOML file cannot be read or parsed; the message says why, on one line."""


def read_toml(path: Path) -> dict[str, Any]:
    """The table of a TOML file, or :class:`TomlReadError` (``FileNotFoundError`` passes through,
    for callers that have a message of their own for it).

    Turns every way reading and parsing fails into one line without ``[Errno N]`` noise: OS
    errors, non-UTF-8 bytes, syntax errors, integers past Python's 4300-digit limit (a ValueError
    of tomllib) and nesting deep enough to exhaust the recursion limit (tomllib recurses).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise TomlReadError(f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TomlReadError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TomlReadError(f"not valid TOML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise TomlReadError("not usable TOML: its arrays or tables nest too deeply") from None
    except ValueError as exc:
        raise TomlReadError(f"not usable TOML: {exc}") from None


class InputDigestError(InputError):
    """A file's sha256 differs from the manifest's: it is refused."""


@dataclass(frozen=True)
class InputEntry:
    id: str
    kind: str  # "image" | "captions" | "pose"
    url: str
    sha256: str

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


class InputManifest:
    """Entries by id, and :meth:`resolve` to a verified local path."""

    def __init__(self, entries: dict[str, InputEntry], source: str = "inputs.toml"):
        self.entries = entries
        self.source = source

    @classmethod
    def load(cls, path: str | Path) -> InputManifest:
        path = Path(path)
        try:
            data = read_toml(path)
        except FileNotFoundError:
            raise InputError(f"{path}: cannot read the input manifest: no such file") from None
        except TomlReadError as exc:
            raise InputError(f"{path}: input manifest: {exc}") from None
        unknown = set(data) - {"source", "inputs"}
        if unknown:
            shown = sorted(excerpt(k, 40) for k in unknown)
            raise InputError(f"{path}: unknown top-level keys {shown}; allowed: source, inputs")
        if not isinstance(data.get("source", {}), dict):
            raise InputError(f"{path}: source: must be a table ([source]), got {_kind_of(data['source'])}")
        inputs = data.get("inputs", {})
        if not isinstance(inputs, dict):
            raise InputError(f"{path}: inputs: must be a table of [inputs.<id>] tables, got {_kind_of(inputs)}")
        entries: dict[str, InputEntry] = {}
        for ident, fields in inputs.items():
            where = f"{path}: inputs.{excerpt(ident, 40)}"
            if not _INPUT_ID.fullmatch(ident):
                # Ids become parts of file and video names: nothing that could climb out of a folder.
                raise InputError(f"{where}: an id is letters, digits, '.', '_' and '-', starting with a letter "
                                 "or digit")
            if not isinstance(fields, dict):
                raise InputError(f"{where}: must be a table with the keys kind, url, sha256, got {_kind_of(fields)}")
            if set(fields) != {"kind", "url", "sha256"}:
                shown = sorted(excerpt(k, 40) for k in fields)
                raise InputError(f"{where}: needs exactly the keys kind, url, sha256 (has {shown})")
            kind, url, digest = fields["kind"], fields["url"], fields["sha256"]
            if not isinstance(kind, str) or kind not in INPUT_KINDS:
                raise InputError(f"{where}.kind: must be one of {list(INPUT_KINDS)}, got {_kind_of(kind)}")
            if not isinstance(url, str) or not url.startswith("https://"):
                raise InputError(f"{where}.url: must be an https:// URL, got {_kind_of(url)}")
            if not _FILE_NAME.fullmatch(url.rsplit("/", 1)[-1]):
                raise InputError(f"{where}.url: must end in a file name (letters, digits, '.', '_', '-'), "
                                 f"got {_kind_of(url)}")
            if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _SHA256_HEX):
                raise InputError(f"{where}.sha256: must be 64 lower-case hex digits, got {_kind_of(digest)}")
            entries[ident] = InputEntry(ident, kind, url, digest)
        names = [e.file_name for e in entries.values()]
        if len(set(names)) != len(names):
            raise InputError(f"{path}: two inputs share a file name; the data directory is flat")
        return cls(entries, str(path))

    def kinds(self) -> dict[str, str]:
        return {i: e.kind for i, e in self.entries.items()}

    def ids(self, kind: str) -> list[str]:
        return [i for i, e in self.entries.items() if e.kind == kind]

    def entry(self, ident: str) -> InputEntry:
        try:
            return self.entries[ident]
        except KeyError:
            raise InputError(f"unknown input {ident!r}; {self.source} lists {sorted(self.entries)}") from None

    def resolve(self, ident: str, *, data_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                download: bool = True) -> Path:
        """A local path holding exactly the manifest's bytes for ``ident``."""
        entry = self.entry(ident)
        data_dir = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
        if data_dir:
            local = Path(data_dir).expanduser() / entry.file_name
            if local.is_file():
                _verify(local, entry, f"${DATA_DIR_ENV} ({data_dir})")
                return local
            log.info("%s: not in %s, trying the cache", entry.file_name, data_dir)
        cache = Path(cache_dir or os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "worldplay") / "inputs"
        cached = cache / f"{entry.sha256[:16]}-{entry.file_name}"
        if cached.is_file():
            _verify(cached, entry, "the download cache")
            return cached
        if not download:
            raise InputError(f"input {ident!r} ({entry.file_name}) is not available offline; set "
                             f"{DATA_DIR_ENV} to a folder holding it")
        _download(entry, cached)
        return cached

    def read_text(self, ident: str, **kwargs) -> str:
        return self.resolve(ident, **kwargs).read_text(encoding="utf-8")

    def captions(self, **kwargs) -> dict[str, str]:
        """Official caption per image file name, from the ``captions`` input (test_case.csv)."""
        ids = self.ids("captions")
        if not ids:
            raise InputError(f"{self.source} has no captions input")
        rows = csv.DictReader(io.StringIO(self.read_text(ids[0], **kwargs)))
        return {row["image_name"].rsplit("/", 1)[-1]: row["caption"] for row in rows}

    def caption(self, image_id: str, **kwargs) -> str:
        name = self.entry(image_id).file_name
        captions = self.captions(**kwargs)
        if name not in captions:
            raise InputError(f"no official caption for {name}")
        return captions[name]


def _reason(exc: OSError) -> str:
    """What went wrong, without the ``[Errno N]`` / ``<urlopen error ...>`` wrapping."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return (reason.strerror or str(reason)) if isinstance(reason, OSError) else str(reason)
    return exc.strerror or str(exc)


def _verify(path: Path, entry: InputEntry, where: str) -> None:
    try:
        got = sha256_of(path)
    except OSError as exc:
        raise InputError(f"input {entry.id!r}: cannot read {path} (from {where}): {_reason(exc)}") from None
    if got != entry.sha256:
        raise InputDigestError(
            f"input {entry.id!r}: {path} (from {where}) has sha256 {got}, the manifest says {entry.sha256}; "
            "refusing to use it. Replace the file with the one from "
            f"{entry.url} (or fix the data directory)."
        )


def _download(entry: InputEntry, target: Path) -> None:
    if not entry.url.startswith("https://"):
        raise InputError(f"input {entry.id!r}: refusing a non-https URL {entry.url}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    log.info("downloading %s", entry.url)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(entry.url, timeout=60) as response, open(tmp, "wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != entry.sha256:
            raise InputDigestError(
                f"input {entry.id!r}: {entry.url} has sha256 {digest.hexdigest()}, the manifest says "
                f"{entry.sha256}; refusing to use it"
            )
        os.replace(tmp, target)
    except OSError as exc:  # urllib.error.URLError is an OSError
        raise InputError(
            f"input {entry.id!r}: cannot download {entry.url} ({_reason(exc)}); without network, set "
            f"{DATA_DIR_ENV} to a folder holding {entry.file_name}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
