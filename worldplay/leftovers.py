"""Temporary names that say who owns them, so that a later start can remove what a killed run left.

Every temporary file or folder worldplay makes carries an owner tag ``-<pid>-t<start>-h<host>``:
the hidden MP4/JSON partials next to an output (``.v.mp4.partial-<pid>-t…-<token>.mp4``), the
``.tmp-*`` result and video folders of an experiment run, and its ``worldplay-*`` scratch folder.
A run stopped by Ctrl-C or SIGTERM removes its own; one killed by SIGKILL (or a power cut) cannot,
so the next start looks for entries whose owner is gone and removes them.

* ``pid`` alone is not enough: pids are reused. ``start`` is the owner's start time (clock ticks
  since boot, from ``/proc/<pid>/stat``), so a new process that got the same pid does not pass
  for the owner. Where there is no ``/proc`` it is 0 and the pid alone is checked (a reused pid
  then keeps a leftover alive, never the other way round).
* ``host`` is a short hash of the host name: on a filesystem shared between machines (or
  containers) a pid means nothing on another host, so those entries are never removed here.

An entry is removed only when its owner is provably gone; a live run's work is never touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

PARTIAL_MARK = ".partial"  # .<name>.partial-<pid>-t…  next to an output
TEMP_DIR_PREFIX = ".tmp-"  # experiment result and video staging folders
SCRATCH_PREFIX = "worldplay-"  # experiment scratch folders (in $TMPDIR or --scratch-dir)
_OWNER = re.compile(r"-(\d+)-t(\d+)-h([0-9a-f]{8})(?![0-9a-f])")


@dataclasses.dataclass(frozen=True)
class Owner:
    pid: int
    start: int  # clock ticks since boot; 0 where unknown
    host: str  # 8 hex digits of sha256(host name)

    def tag(self) -> str:
        return f"-{self.pid}-t{self.start}-h{self.host}"

    def state(self) -> str:
        """``"running"``, ``"gone"`` (provably: safe to remove) or ``"other host"``."""
        if self.host != _host_hash():
            return "other host"
        running = _process_start(self.pid)
        if running is None:
            return "gone"
        if self.start and running and running != self.start:
            return "gone"  # the pid was reused by a later process
        return "running"


@dataclasses.dataclass(frozen=True)
class Leftover:
    path: Path
    owner: Owner | None  # None: an untagged name (made by an older version)
    state: str  # Owner.state(), or "unknown owner"

    def describe(self) -> str:
        if self.owner is None:
            return (f"{self.path}: temporary entry of unknown owner (older worldplay); delete it if no run "
                    "is going on")
        if self.state == "gone":
            return f"{self.path}: left by process {self.owner.pid}, which is gone; the next run removes it"
        if self.state == "running":
            return f"{self.path}: in use by running process {self.owner.pid}"
        return f"{self.path}: made on another host (process {self.owner.pid} there)"


def _host_hash() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _process_start(pid: int) -> int | None:
    """The start time of a running process ``pid`` (0 where the platform does not say), or None
    when no such process runs (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
    except OSError:
        return 0  # unreadable: assume running
    else:
        fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and ')'
        return None if fields[0] == "Z" else int(fields[19])
    try:  # no /proc (macOS): the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0


def current_owner() -> Owner:
    return Owner(pid=os.getpid(), start=_process_start(os.getpid()) or 0, host=_host_hash())


def owner_tag() -> str:
    """This process's tag, to put into the name of every temporary entry it makes."""
    return current_owner().tag()


def owner_of(name: str) -> Owner | None:
    """The owner named in ``name`` (the last tag in it), or None for an untagged name."""
    matches = list(_OWNER.finditer(name))
    if not matches:
        return None
    pid, start, host = matches[-1].groups()
    return Owner(int(pid), int(start), host)


def is_temporary(name: str) -> bool:
    """A name worldplay gives its temporary entries (tagged or, from older versions, not)."""
    return (name.startswith(".") and f"{PARTIAL_MARK}-" in name) or name.startswith(TEMP_DIR_PREFIX)


def find(directory: Path, *, prefix: str | None = None) -> list[Leftover]:
    """Temporary entries directly inside ``directory`` (hidden partials and ``.tmp-`` folders, or
    with ``prefix`` the tagged entries whose names start with it), with their owners' states."""
    try:
        entries = sorted(Path(directory).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for path in entries:
        name = path.name
        if prefix is not None:
            owner = owner_of(name) if name.startswith(prefix) else None
            if owner is None:  # an untagged entry under a broad prefix (e.g. in $TMPDIR) is not ours to judge
                continue
        elif is_temporary(name):
            owner = owner_of(name)
        else:
            continue
        found.append(Leftover(path, owner, owner.state() if owner else "unknown owner"))
    return found


def remove_stale(directories: Iterable[Path], *, prefix: str | None = None) -> list[Path]:
    """Remove the entries of :func:`find` whose owner is gone; return what was removed."""
    removed = []
    for directory in directories:
        for item in find(directory, prefix=prefix):
            if item.state != "gone":
                continue
            try:
                if item.path.is_dir() and not item.path.is_symlink():
                    shutil.rmtree(item.path)
                else:
                    item.path.unlink()
            except FileNotFoundError:  # another start removed it first
                continue
            except OSError as exc:
                log.warning("could not remove %s, left by process %d: %s", item.path, item.owner.pid,
                            exc.strerror)
                continue
            log.warning("removed %s, left by process %d, which ended without cleaning up", item.path,
                        item.owner.pid)
            removed.append(item.path)
    return removed
