"""Host memory promised to image sets that are still loading, shared by every worker process on a machine.

A worker chooses how to hold a set (`stages/image_sets.choose_holding`) from the memory available when it
starts loading. Two workers that start together on one node both see the memory neither has taken yet:
in the full-shape rehearsal both relabel workers saw 18.8 GB available, both decided to hold their 7.5 GB
set decoded, and Ray's memory monitor killed one of them. So a worker that decides also writes down what
it will take (a claim), and the next one subtracts what is claimed but not yet taken.

A claim is a small JSON file per process in a folder under the machine's temp directory (every worker on a
node shares it; Ray nodes started on one machine share its memory, and the folder too). Deciding and
claiming happen under an exclusive file lock. A claim counts for what its process has not taken yet: the
bytes claimed less the growth of the process's resident memory since it claimed. Claims of processes that
are gone are deleted when seen.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

DEFAULT_DIR = Path(tempfile.gettempdir()) / "prism-ray-host-claims"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(pid: int) -> int | None:
    """Resident memory of process `pid` now, None when it is gone (or /proc is not there)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class HostClaims:
    """The claims folder, opened under its lock (see `host_claims`)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _own(self) -> Path:
        return self.folder / f"{os.getpid()}.json"

    def outstanding(self) -> int:
        """Bytes other live processes have claimed and not yet taken."""
        total = 0
        for path in self.folder.glob("*.json"):
            try:
                pid = int(path.stem)
            except ValueError:
                continue
            if pid == os.getpid():
                continue
            rss = rss_bytes(pid)
            try:
                claim = json.loads(path.read_text())
                claimed, rss_then = int(claim["bytes"]), int(claim["rss"])
            except (OSError, ValueError, KeyError, TypeError):
                claimed = rss_then = 0
            if rss is None or claimed <= 0:  # the process is gone (or the file is not a claim): forget it
                path.unlink(missing_ok=True)
                continue
            total += max(0, claimed - max(0, rss - rss_then))
        return total

    def claim(self, nbytes: int) -> None:
        """This process will take `nbytes` more host memory (it replaces this process's earlier claim)."""
        own = self._own()
        if nbytes <= 0:
            own.unlink(missing_ok=True)
            return
        tmp = own.with_suffix(".tmp")
        tmp.write_text(json.dumps({"bytes": int(nbytes), "rss": rss_bytes(os.getpid()) or 0}))
        tmp.replace(own)


@contextmanager
def host_claims(folder: str | Path | None = None) -> Iterator[HostClaims]:
    """The machine's claims, held exclusively: decide and claim inside one `with`."""
    folder = Path(folder) if folder is not None else DEFAULT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield HostClaims(folder)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def release_claim(folder: str | Path | None = None) -> None:
    """Forget this process's claim (its set is loaded and counted in its memory, or dropped)."""
    HostClaims(Path(folder) if folder is not None else DEFAULT_DIR).claim(0)
