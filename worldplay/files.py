"""Files: the one sha256-of-a-file and the one atomic write of the package (torch-free).

An atomic write goes to a hidden temp sibling that names its owner (so a later start can remove
it if this process is killed, worldplay.leftovers), is fsynced and renamed into place: readers
see the old file or the complete new one, never a partial write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from .leftovers import PARTIAL_MARK, owner_tag

PathLike = str | os.PathLike
_BLOCK = 1 << 22  # bytes read at a time when hashing


def sha256_file(path: PathLike, *, block: int = _BLOCK) -> str:
    """The hex sha256 of a file's bytes, read ``block`` bytes at a time (never cached)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def temp_sibling(path: Path, suffix: str = "") -> Path:
    """A unique hidden temp name next to ``path`` (same filesystem, so os.replace is atomic) that
    names its owner, so that a later start can remove it if this process is killed."""
    return path.with_name(f".{path.name}{PARTIAL_MARK}{owner_tag()}-{secrets.token_hex(4)}{suffix}")


def reserve_file(tmp: Path) -> int:
    """Create ``tmp`` exclusively (mode 0666 minus umask, like a normal file) and return its fd."""
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Persist a rename; best effort because some filesystems refuse fsync on directories."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, os.replace.

    Readers see either the old file or the complete new one, never a partial write; a killed
    writer's temp file names its owner (worldplay.leftovers removes it later).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    fd = reserve_file(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`~worldplay.files.atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Serialise ``obj`` to JSON and write it atomically (see :func:`~worldplay.files.atomic_write_text`).

    Serialisation happens before any file is touched, so an unencodable object leaves the
    existing file untouched and no temp file behind.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n"
    return atomic_write_text(path, text)


__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "sha256_file"]
