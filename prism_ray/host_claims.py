"""Host memory promised to image sets that are still loading, shared by every worker process on a machine.

A worker chooses how to hold a set (`stages/image_sets.choose_holding`) from the memory available when it
starts loading. Two workers that start together on one node both see the memory neither has taken yet:
in the full-shape rehearsal both relabel workers saw 18.8 GB available, both decided to hold their 7.5 GB
set decoded, and Ray's memory monitor killed one of them. So a worker that decides also writes down what
it will take (a claim), and the next one subtracts what is claimed but not yet taken.

A claim is a small JSON file per process, named by the process's identity: the machine's boot id, its pid
namespace, its pid and its start time (so a reused pid is not mistaken for the claimer, and a claim made in
another pid namespace is never judged by a pid that means something else here). Deciding and claiming happen
under an exclusive file lock. A claim counts for what its process has not taken yet: the bytes claimed less the
growth of the process's resident memory since it claimed. Claims of processes that are gone are deleted when
seen; claims from another pid namespace or boot, which cannot be checked, expire after FOREIGN_CLAIM_SECONDS.

The folder is per user, mode 0700: `$PRISM_RAY_CLAIMS_DIR`, else `<tmp>/prism-ray-<uid>/host-claims` (every
worker of one user on a machine shares the machine's memory and its temp folder, whichever Ray session started
it). A folder another user owns, or a symlink, is refused; files are opened without following symlinks.
"""
from __future__ import annotations

import fcntl
import json
import os
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CLAIMS_DIR_ENV = "PRISM_RAY_CLAIMS_DIR"
FOREIGN_CLAIM_SECONDS = 15 * 60  # a set loads in minutes; a claim nobody can check is dropped after this
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class ClaimsFolderError(RuntimeError):
    """The claims folder cannot be trusted (another user's, or a symlink)."""


def default_dir() -> Path:
    env = os.environ.get(CLAIMS_DIR_ENV)
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"prism-ray-{os.getuid()}" / "host-claims"


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def boot_id() -> str:
    return (_read_text("/proc/sys/kernel/random/boot_id") or "unknown").strip()


def pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "unknown"


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); None when it is gone."""
    text = _read_text(f"/proc/{pid}/stat")
    if text is None:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after its closing ')'
        return int(text[text.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def rss_bytes(pid: int) -> int | None:
    """Resident memory of process `pid` now, None when it is gone (or /proc is not there)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def this_process() -> dict:
    pid = os.getpid()
    return {"boot": boot_id(), "pidns": pid_namespace(), "pid": pid, "start": start_time(pid)}


def claim_name(identity: dict) -> str:
    return f"{identity['boot'][:8]}-{identity['pidns']}-{identity['pid']}-{identity['start']}.json"


def secure_folder(folder: Path) -> Path:
    """Create `folder` (0700) if needed; refuse one that is a symlink or that another user owns."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    for path in (folder.parent, folder) if folder.parent.name.startswith("prism-ray-") else (folder,):
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise ClaimsFolderError(f"host-claims folder {path} is not a plain folder (a symlink?); remove it or "
                                    f"set {CLAIMS_DIR_ENV}")
        if info.st_uid != os.getuid():
            raise ClaimsFolderError(f"host-claims folder {path} belongs to uid {info.st_uid}, not to this user "
                                    f"({os.getuid()}); remove it or set {CLAIMS_DIR_ENV}")
        if info.st_mode & 0o077:
            os.chmod(path, 0o700)
    return folder


def _open_nofollow(path: Path, flags: int, mode: int = 0o600) -> int:
    return os.open(path, flags | _NOFOLLOW, mode)


class HostClaims:
    """The claims folder, opened under its lock (see `host_claims`)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.me = this_process()

    def _own(self) -> Path:
        return self.folder / claim_name(self.me)

    def _alive(self, claim: dict, path: Path) -> bool | None:
        """True/False when the claimer can be checked from here, None when not (another boot or namespace)."""
        if claim.get("boot") != self.me["boot"]:
            return False  # the machine rebooted since: the claimer is gone
        if claim.get("pidns") != self.me["pidns"]:
            return None
        started = start_time(int(claim["pid"]))
        return started is not None and started == claim.get("start")

    def outstanding(self) -> int:
        """Bytes other live processes have claimed and not yet taken."""
        total = 0
        for path in self.folder.glob("*.json"):
            if path.name == self._own().name or path.is_symlink():
                continue
            try:
                fd = _open_nofollow(path, os.O_RDONLY)
                with os.fdopen(fd) as f:
                    claim = json.load(f)
                claimed, rss_then = int(claim["bytes"]), int(claim["rss"])
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)  # not a claim (or half-written by a crash)
                continue
            alive = self._alive(claim, path)
            if alive is None:  # cannot be checked: counts in full until it expires
                if time.time() - float(claim.get("time", 0)) > FOREIGN_CLAIM_SECONDS:
                    path.unlink(missing_ok=True)
                    continue
                total += max(0, claimed)
                continue
            rss = rss_bytes(int(claim["pid"])) if alive else None
            if not alive or rss is None or claimed <= 0:  # the claimer is gone: forget it
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
        record = {**self.me, "bytes": int(nbytes), "rss": rss_bytes(os.getpid()) or 0, "time": time.time()}
        tmp = own.with_name(f".{own.name}.tmp")
        tmp.unlink(missing_ok=True)
        fd = _open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, own)  # replaces the name itself, never a symlink's target


@contextmanager
def host_claims(folder: str | Path | None = None) -> Iterator[HostClaims]:
    """The machine's claims, held exclusively: decide and claim inside one `with`."""
    folder = secure_folder(Path(folder) if folder is not None else default_dir())
    fd = _open_nofollow(folder / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield HostClaims(folder)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def release_claim(folder: str | Path | None = None) -> None:
    """Forget this process's claim (its set is loaded and counted in its memory, or dropped)."""
    folder = Path(folder) if folder is not None else default_dir()
    (folder / claim_name(this_process())).unlink(missing_ok=True)
