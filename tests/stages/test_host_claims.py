"""Workers that load sets at the same time on one machine see each other's claims: the second does not
count memory the first is about to take (the full-shape rehearsal lost a relabel worker to Ray's memory
monitor when both held their 7.5 GB sets decoded on a 24 GB node)."""
from __future__ import annotations

import multiprocessing as mp
import os

import torch

from prism_ray.host_claims import host_claims, release_claim, rss_bytes
from prism_ray.stages.image_sets import choose_holding, load_image_set
from prism_ray.storage import Storage
from tests.stages.test_image_sets import NORM, commit_set, pixels

GiB, MiB = 1 << 30, 1 << 20
SET = 4 * GiB  # decoded; 10 GiB "available" holds one such set decoded at most 50 %, not two


def _worker(folder, start, done, results):
    """A relabel worker's decision: choose under the lock, claim what the choice takes, keep loading."""
    start.wait()
    with host_claims(folder) as claims:
        holding, reason = choose_holding(SET, torch.device("cpu"), host_available=10 * GiB,
                                         host_claimed=claims.outstanding())
        claims.claim(SET if holding == "host" else SET // 8)
    results.put((holding, reason))
    done.wait()  # still loading while the other decides


def test_two_workers_starting_together_do_not_both_hold_decoded(tmp_path):
    ctx = mp.get_context("fork")
    start, done, results = ctx.Barrier(2), ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(tmp_path, start, done, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(60)
    assert [h for h, _ in got] == ["encoded", "host"]
    assert "claimed by other workers" in got[0][1], got[0][1]
    with host_claims(tmp_path) as claims:
        assert claims.outstanding() == 0  # both processes are gone: their claims are forgotten when read
    assert not list(tmp_path.glob("*.json"))


def _claim_then_grow(folder, claimed, grow, ready, done):
    with host_claims(folder) as claims:
        claims.claim(claimed)
    block = bytearray(grow)  # touched: resident
    ready.set()
    done.wait(60)
    del block


def test_a_claim_counts_only_what_its_process_has_not_taken_yet(tmp_path):
    ctx = mp.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_claim_then_grow, args=(tmp_path, 300 * MiB, 200 * MiB, ready, done))
    p.start()
    try:
        assert ready.wait(60)
        with host_claims(tmp_path) as claims:
            left = claims.outstanding()
        assert 80 * MiB <= left <= 120 * MiB, left / MiB
    finally:
        done.set()
        p.join(60)
    assert rss_bytes(p.pid) is None


def test_loading_a_set_claims_while_it_loads_and_releases_after(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    commit_set(storage, "prism", pixels(8), 4)
    release_claim()
    s = load_image_set(storage, "prism", NORM, 3, holding="auto")
    assert s.holding == "host" and "claimed" not in s.reason  # nobody else is loading
    from prism_ray.host_claims import DEFAULT_DIR
    assert not (DEFAULT_DIR / f"{os.getpid()}.json").exists()
