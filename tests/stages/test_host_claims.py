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
    from prism_ray.host_claims import claim_name, default_dir, this_process
    assert not (default_dir() / claim_name(this_process())).exists()


# ---- claims are keyed by the claiming process's identity, in a folder only this user can write


def _write_claim(folder, **fields) -> None:
    import json

    from prism_ray.host_claims import claim_name, secure_folder
    secure_folder(folder)
    claim = {"boot": "", "pidns": "", "pid": 0, "start": 0, "bytes": 100 * MiB, "rss": 0, "time": 0.0, **fields}
    (folder / claim_name(claim)).write_text(json.dumps(claim))


def test_a_claim_whose_pid_was_reused_is_forgotten(tmp_path):
    """pid 1 is alive, but it is not the process that claimed: its start time differs."""
    import time

    from prism_ray.host_claims import boot_id, pid_namespace, start_time
    _write_claim(tmp_path, boot=boot_id(), pidns=pid_namespace(), pid=1, start=start_time(1) + 12345,
                 time=time.time())
    with host_claims(tmp_path) as claims:
        assert claims.outstanding() == 0
    assert not list(tmp_path.glob("*.json"))


def test_a_claim_from_another_pid_namespace_is_kept_until_it_expires(tmp_path):
    """A pid means another process in another namespace sharing this folder: the claim is neither judged by it nor
    deleted while it may be live; one older than FOREIGN_CLAIM_SECONDS is dropped."""
    import time

    from prism_ray.host_claims import FOREIGN_CLAIM_SECONDS, boot_id
    _write_claim(tmp_path, boot=boot_id(), pidns="other-namespace", pid=os.getpid(), start=1, time=time.time())
    for _ in range(2):
        with host_claims(tmp_path) as claims:
            assert claims.outstanding() == 100 * MiB
    _write_claim(tmp_path, boot=boot_id(), pidns="other-namespace", pid=os.getpid(), start=1,
                 time=time.time() - FOREIGN_CLAIM_SECONDS - 1)
    with host_claims(tmp_path) as claims:
        assert claims.outstanding() == 0


def test_a_claims_folder_of_another_user_or_a_symlink_is_refused(tmp_path):
    import pytest

    from prism_ray.host_claims import ClaimsFolderError
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    if os.getuid() == 0:  # CI runs as root: give the folder away to show the check
        os.chown(theirs, 65534, 65534)
        with pytest.raises(ClaimsFolderError, match="belongs to uid 65534"):
            with host_claims(theirs):
                pass
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(ClaimsFolderError, match="not a plain folder"):
        with host_claims(tmp_path / "link"):
            pass


def test_a_claim_is_never_written_through_a_symlink(tmp_path):
    from prism_ray.host_claims import claim_name, secure_folder, this_process
    folder = secure_folder(tmp_path / "claims")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (folder / claim_name(this_process())).symlink_to(victim)
    with host_claims(folder) as claims:
        claims.claim(10 * MiB)
    assert victim.read_text() == "keep me"
    assert not (folder / claim_name(this_process())).is_symlink()
    release_claim(folder)
    assert not (folder / claim_name(this_process())).exists()


def test_the_default_claims_folder_is_private_to_the_user(monkeypatch, tmp_path):
    from prism_ray.host_claims import CLAIMS_DIR_ENV, default_dir
    monkeypatch.delenv(CLAIMS_DIR_ENV, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    folder = default_dir()
    assert folder == tmp_path / f"prism-ray-{os.getuid()}" / "host-claims"
    with host_claims() as claims:
        claims.claim(MiB)
    for path in (folder, folder.parent):
        assert os.stat(path).st_mode & 0o777 == 0o700
    release_claim()
