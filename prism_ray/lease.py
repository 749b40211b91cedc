"""One driver per run: a lease in the run's storage, taken before the driver writes anything.

A lease is a small JSON object ``lease/<n>.json`` (n counts up from 1), created exclusively (local: a hard
link; S3: a PUT with If-None-Match), so of two drivers that start together exactly one gets a given n. The
holder rewrites its object every `lease_seconds / 6` (a renewal: a counter and its host's time), and marks it
released when it exits. The current lease is the highest n.

A second driver that finds a live lease refuses in one line naming the holder (host, pid, start, last renewal).
It tells live from dead by watching the counter, not by comparing clocks: a lease whose counter does not move for
`lease_seconds` is stale and is taken over automatically, by creating n + 1 (so two drivers taking over together
still end with one holder). That is the right default because a driver killed by SIGKILL (`ray job stop` after
its grace period, an OOM kill, a lost node) can release nothing, and a KubeRay retry, a new cluster running the
same command on the same output, must resume without a person. `--take-over` takes a lease at once, for when
you know its holder is gone. A holder that finds n + 1 at its next renewal has lost the lease and stops.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from prism_ray.storage import Storage, StorageError, retrying

LEASE_PREFIX = "lease"
RENEWALS_PER_TERM = 6  # renewals per lease_seconds: a holder may miss a few before it is taken over
STALE_BY_CLOCK_SECONDS = 3600  # a lease whose last renewal is this much older (by the holder's clock) is stale at once


class LeaseHeld(StorageError):
    """Another driver holds the run's lease."""


class LeaseLost(StorageError):
    """This driver's lease was taken over by another driver: it must stop writing."""


def lease_key(n: int) -> str:
    return f"{LEASE_PREFIX}/{n:08d}.json"


def _number(key: str) -> int | None:
    name = key.rsplit("/", 1)[-1]
    stem = name[: -len(".json")] if name.endswith(".json") else ""
    return int(stem) if stem.isdigit() else None


def describe_holder(record: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    ago = max(0.0, now - float(record.get("renewed_at", 0)))
    return (f"host {record.get('host')} pid {record.get('pid')}, started {started}, last renewed {ago:.0f} s ago "
            f"(by its clock)")


@dataclass
class RunLease:
    """The lease this driver holds on a run (see the module's docstring)."""

    storage: Storage
    seconds: float
    number: int = 0
    record: dict = field(default_factory=dict)
    lost: str | None = None  # why the lease was lost, once it is
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    # ---- taking it

    @classmethod
    def acquire(cls, storage: Storage, seconds: float, take_over: bool = False, say=None,
                sleep=time.sleep) -> "RunLease":
        """Take the run's lease: at once when it is free, released or stale; after watching it for up to `seconds`
        when it may be live (raising LeaseHeld as soon as it is seen renewed); at once with `take_over`."""
        lease = cls(storage, seconds)
        watched: dict[int, int] = {}  # lease number -> the renewal count first seen
        deadline: float | None = None
        while True:
            keys = retrying("list the run's lease", lambda: storage.list(LEASE_PREFIX, suffix=".json"))
            numbers = sorted(n for n in (_number(k) for k in keys) if n is not None)
            current = numbers[-1] if numbers else 0
            holder = lease._read(current) if current else None
            if holder is not None and not holder.get("released") and not take_over:
                count = int(holder.get("renewals", 0))
                if current in watched and count != watched[current]:
                    raise LeaseHeld(f"{storage.uri()} is in use by another driver ({describe_holder(holder)}); wait "
                                    f"for it to finish, or stop it (ray job stop), or rerun with --take-over if you "
                                    f"know it is gone")
                stale = time.time() - float(holder.get("renewed_at", 0)) > seconds + STALE_BY_CLOCK_SECONDS
                if not stale:
                    if current not in watched:
                        watched[current] = count
                        deadline = time.monotonic() + seconds
                        if say:
                            say(f"the run's lease is held by {describe_holder(holder)}; taking it over if it is not "
                                f"renewed within {seconds:g} s")
                    if time.monotonic() < deadline:
                        sleep(min(1.0, seconds / RENEWALS_PER_TERM))
                        continue
                if say:
                    say(f"taking over the run's lease from {describe_holder(holder)}: not renewed for "
                        f"{seconds:g} s")
            if lease._create(current + 1, took_over_from=holder if holder and not holder.get("released") else None):
                lease._start_renewing()
                return lease
            # another driver took number current + 1 first: look again (it is live, or will be seen renewing)

    def _read(self, n: int) -> dict | None:
        try:
            return retrying("read the run's lease", lambda: self.storage.read_json(lease_key(n)))
        except FileNotFoundError:
            return None

    def _create(self, n: int, took_over_from: dict | None) -> bool:
        now = time.time()
        record = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "started": now,
                  "renewed_at": now, "renewals": 0, "released": False, "lease_seconds": self.seconds}
        if took_over_from is not None:
            record["took_over_from"] = {k: took_over_from.get(k) for k in ("host", "pid", "started", "token")}
        import json
        data = json.dumps(record, indent=2, sort_keys=True).encode()
        if not retrying("take the run's lease", lambda: self.storage.create_exclusive(lease_key(n), data)):
            return False
        self.number, self.record = n, record
        return True

    # ---- holding it

    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="prism-ray-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        interval = self.seconds / RENEWALS_PER_TERM
        last_ok = time.monotonic()
        while not self._stop.wait(interval):
            try:
                self.renew()
                last_ok = time.monotonic()
            except LeaseLost as e:
                self.lost = str(e)
                return
            except Exception as e:  # noqa: BLE001 - storage trouble: keep trying until the lease would be stale
                if time.monotonic() - last_ok > self.seconds:
                    self.lost = f"the run's lease could not be renewed for {self.seconds:g} s ({e})"
                    return

    def renew(self) -> None:
        """Rewrite this driver's lease with one more renewal; LeaseLost when a later lease exists."""
        later = self._read(self.number + 1)
        if later is not None:
            raise LeaseLost(f"the run's lease was taken over by {describe_holder(later)}")
        self.record = {**self.record, "renewed_at": time.time(), "renewals": int(self.record["renewals"]) + 1}
        self.storage.write_json(lease_key(self.number), self.record)

    def check(self) -> None:
        """Raise LeaseLost when the lease is no longer this driver's (called before destructive writes)."""
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        """Mark the lease released (a later driver takes it at once) unless another driver took it over."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost or not self.number:
            return
        try:
            if self._read(self.number + 1) is None:
                self.storage.write_json(lease_key(self.number), {**self.record, "released": True,
                                                                 "released_at": time.time()})
        except Exception:  # noqa: BLE001 - an unreleased lease only makes the next driver wait lease_seconds
            pass

    def __enter__(self) -> "RunLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def current_holder(storage: Storage) -> dict | None:
    """The record of the run's current lease (None: never taken), for `status`."""
    keys = storage.list(LEASE_PREFIX, suffix=".json")
    numbers = sorted(n for n in (_number(k) for k in keys) if n is not None)
    if not numbers:
        return None
    try:
        return {**storage.read_json(lease_key(numbers[-1])), "number": numbers[-1]}
    except FileNotFoundError:
        return None
