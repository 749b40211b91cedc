"""One driver per run: the run's lease, on a local folder and on a real S3 endpoint (moto server)."""
from __future__ import annotations

import threading
import time

import pytest

from prism_ray.config import StorageConfig
from prism_ray.lease import LeaseHeld, LeaseLost, RunLease, current_holder, lease_key
from prism_ray.storage import Storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "run"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(f"s3://{bucket}/runs/one", StorageConfig(endpoint_url=endpoint))


def test_a_live_holder_is_seen_renewing_and_the_second_driver_refuses(storage):
    with RunLease.acquire(storage, seconds=1.2) as first:
        assert first.number == 1
        t0 = time.monotonic()
        with pytest.raises(LeaseHeld, match=r"in use by another driver \(host .+ pid \d+, started .+, last renewed"):
            RunLease.acquire(storage, seconds=1.2)
        assert time.monotonic() - t0 < 1.2  # told apart by a renewal, before the lease could have gone stale
        assert first.lost is None
    holder = current_holder(storage)
    assert holder["number"] == 1 and holder["released"]


def test_a_released_lease_is_taken_at_once(storage):
    RunLease.acquire(storage, seconds=30).release()
    t0 = time.monotonic()
    with RunLease.acquire(storage, seconds=30) as second:
        assert second.number == 2
    assert time.monotonic() - t0 < 5


def test_a_stale_lease_is_taken_over_after_it_expires_and_its_holder_stops(storage):
    """A driver killed with SIGKILL releases nothing: its lease stops being renewed and is taken over, which is how
    a KubeRay retry (a new cluster, the same output) resumes without a person."""
    dead = RunLease.acquire(storage, seconds=1.0)
    dead._stop.set()  # the holder stops renewing, as a killed driver does
    dead._thread.join()
    said = []
    t0 = time.monotonic()
    with RunLease.acquire(storage, seconds=1.0, say=said.append) as taker:
        waited = time.monotonic() - t0
        assert taker.number == dead.number + 1 and waited >= 1.0
        assert storage.read_json(lease_key(taker.number))["took_over_from"]["pid"] == dead.record["pid"]
        assert any("taking over" in s for s in said)
        with pytest.raises(LeaseLost, match="taken over by host"):
            dead.renew()  # a holder that was only slow finds out at its next renewal and stops
    dead.release()  # after losing, releasing does not touch the taker's lease
    assert not storage.read_json(lease_key(dead.number))["released"]


def test_take_over_does_not_wait(storage):
    holder = RunLease.acquire(storage, seconds=60)
    try:
        t0 = time.monotonic()
        with RunLease.acquire(storage, seconds=60, take_over=True) as taker:
            assert time.monotonic() - t0 < 5 and taker.number == 2
            with pytest.raises(LeaseLost):
                holder.renew()
    finally:
        holder.release()


def test_two_drivers_starting_together_end_with_one_holder(storage):
    results: list = []

    def start():
        try:
            results.append(RunLease.acquire(storage, seconds=1.5))
        except LeaseHeld as e:
            results.append(e)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    held = [r for r in results if isinstance(r, RunLease)]
    refused = [r for r in results if isinstance(r, LeaseHeld)]
    assert len(held) == 1 and len(refused) == 1
    held[0].release()
