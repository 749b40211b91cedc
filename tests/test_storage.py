"""Storage and the shard commit protocol, on a local folder and on a real S3 endpoint (moto server)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from prism_ray.config import StorageConfig
from prism_ray.storage import (TEMP_MARK, IntegrityError, ShardStore, Storage, StorageError, begin_stage,
                                sha256)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "run"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(f"s3://{bucket}/runs/one", StorageConfig(endpoint_url=endpoint))


def outputs(n: int, tag: bytes = b"") -> list[tuple[str, bytes]]:
    return [(f"images/c{i:03d}.png", b"img-%d-" % i + tag) for i in range(n)]


def test_commit_lists_and_verifies(storage):
    store = begin_stage(storage, "recover/prism")
    res = store.commit("shard-0001", outputs(3), [{"class_id": i, "loss": 0.5 * i} for i in range(3)])
    assert res.committed
    assert store.committed() == {"shard-0001"}
    table = store.read("shard-0001")
    assert table.num_rows == 3
    rows = table.to_pylist()
    attempt = rows[0]["attempt"]
    assert [r["path"] for r in rows] == [f"images/c00{i}.{attempt}.png" for i in range(3)]  # the attempt's keys
    assert rows[1]["sha256"] == sha256(b"img-1-") and rows[1]["bytes"] == len(b"img-1-")
    assert rows[2]["class_id"] == 2 and rows[0]["shard_id"] == "shard-0001"
    assert store.verify("shard-0001") == []
    assert storage.read_bytes(f"recover/prism/{store.generation}/images/c001.{attempt}.png") == b"img-1-"
    assert store.read_output(rows[1]) == b"img-1-"


def test_a_store_without_a_record_has_nothing_committed(storage):
    store = ShardStore(storage, "recover/prism")
    assert store.generation is None and store.committed() == set() and not store.complete()
    assert store.read_all() is None and store.failures() == {}
    with pytest.raises(StorageError, match="no record"):
        store.commit("s", outputs(1), [{}])


def test_outputs_without_manifest_are_not_committed(storage):
    store = begin_stage(storage, "recover/prism")
    for key, data in outputs(2):  # a worker died after writing its images, before the manifest
        storage.write_bytes(store.key(key), data)
    assert store.committed() == set()
    assert not store.is_committed("shard-0002")
    # the redo writes keys of its own and commits; the dead attempt's files are swept when the stage completes
    assert store.commit("shard-0002", outputs(2, b"redo"), [{"class_id": 0}, {"class_id": 1}]).committed
    assert store.committed() == {"shard-0002"}
    assert [store.read_output(r) for r in store.read("shard-0002").to_pylist()] == [b"img-0-redo", b"img-1-redo"]
    assert store.verify("shard-0002") == []
    assert sorted(store.sweep_orphans()) == ["images/c000.png", "images/c001.png"]
    assert not storage.exists(store.key("images/c000.png")) and store.verify("shard-0002") == []


def test_temporary_files_a_crash_left_are_swept_once_older_than_the_lease(tmp_path):
    import os
    import time

    storage = Storage(str(tmp_path / "run"))
    store = begin_stage(storage, "recover/prism")
    assert store.commit("shard-0001", outputs(2), [{"class_id": 0}, {"class_id": 1}]).committed
    (row,) = [r for r in store.read("shard-0001").to_pylist() if r["class_id"] == 0]
    folder = os.path.dirname(storage.path(store.key(row["path"])))
    stale, fresh = (os.path.join(folder, f"c007.ab12cd34ef56.png{TEMP_MARK}{n}") for n in ("1" * 32, "2" * 32))
    for path in (stale, fresh):
        with open(path, "wb") as f:
            f.write(b"cut short")
    os.utime(stale, (time.time() - 600, time.time() - 600))  # written 10 minutes ago by a worker killed mid-write
    assert store.sweep_orphans() == []  # no age given: a write that may be in flight is never touched
    swept = store.sweep_orphans(stale_temp_seconds=60)
    assert swept == [f"images/{os.path.basename(stale)}"]
    assert not os.path.exists(stale) and os.path.exists(fresh)  # the recent one may still be a write in flight
    assert store.verify("shard-0001") == []


def test_first_commit_wins_and_the_loser_leaves_nothing(storage):
    store = begin_stage(storage, "stage")
    first = store.commit("s", outputs(1, b"a"), [{"v": 1}])
    late = store.commit("s", outputs(1, b"b"), [{"v": 2}])
    assert first.committed and not late.committed
    assert store.read("s").to_pylist()[0]["v"] == 1
    # the late attempt did not touch the committed outputs either
    assert store.verify("s") == []


def test_concurrent_attempts_never_replace_committed_bytes(storage, monkeypatch):
    """Two attempts of one unit race: the loser's outputs go to keys of its own and are deleted when its manifest
    loses, so the winner's manifest always points at the winner's bytes."""
    store = begin_stage(storage, "stage")
    real = Storage.create_exclusive
    raced = []

    def create(self, key, data):
        if "manifests/" in key and not raced:  # the other attempt commits between our outputs and our manifest
            raced.append(None)
            raced[0] = ShardStore(storage, "stage").commit("s", outputs(2, b"winner"), [{"v": 1}, {"v": 1}])
        return real(self, key, data)

    monkeypatch.setattr(Storage, "create_exclusive", create)
    late = store.commit("s", outputs(2, b"loser"), [{"v": 2}, {"v": 2}])
    assert raced[0].committed and not late.committed
    rows = store.read("s").to_pylist()
    assert [store.read_output(r) for r in rows] == [b"img-0-winner", b"img-1-winner"]
    files = storage.fs.find(storage.path(store.key("images")))
    assert len(files) == 2  # the loser cleaned up after itself


def test_a_retry_refused_after_its_own_create_landed_counts_as_committed(storage, monkeypatch):
    """A manifest PUT whose answer was lost is retried and refused (412): the manifest there is this attempt's own,
    so the unit is committed, not a duplicate."""
    from prism_ray.storage import Backoff, TransientStorageError
    store = ShardStore(begin_stage(storage, "stage").storage, "stage", backoff=Backoff(tries=3, first_delay=0.01))
    real = Storage.create_exclusive
    lost = []

    def create(self, key, data):
        created = real(self, key, data)
        if "manifests/" in key and not lost:
            lost.append(key)
            raise TransientStorageError(f"cannot write {key}: connection reset before the answer")
        return created

    monkeypatch.setattr(Storage, "create_exclusive", create)
    res = store.commit("s", outputs(1), [{"v": 1}])
    assert lost and res.committed and res.storage_retries == 1
    assert store.verify("s") == []


def test_create_exclusive(storage):
    assert storage.create_exclusive("x/once", b"1")
    assert not storage.create_exclusive("x/once", b"2")
    assert storage.read_bytes("x/once") == b"1"


def test_verify_and_read_output_report_damage(storage):
    store = begin_stage(storage, "stage")
    store.commit("s", outputs(3), [{}, {}, {}])
    rows = store.read("s").to_pylist()
    storage.write_bytes(store.key(rows[0]["path"]), b"tampered")
    storage.write_bytes(store.key(rows[1]["path"]), b"img-1?")  # same size, other bytes
    storage.delete(store.key(rows[2]["path"]))
    problems = store.verify("s")
    assert any("c000" in p and "bytes" in p for p in problems)
    assert any("c001" in p and "sha256" in p for p in problems)
    assert any("c002" in p and "missing" in p for p in problems)
    for row, what in zip(rows, ("bytes", "sha256", "missing")):
        with pytest.raises(IntegrityError, match=what):
            store.read_output(row)


def test_failures_and_combined_manifest(storage):
    store = begin_stage(storage, "stage")
    store.record_failure("b", "ValueError: boom", 3)
    assert store.failures()["b"]["error"] == "ValueError: boom"
    store.commit("a", outputs(2), [{"k": 1}, {"k": 2}])
    store.commit("b", outputs(1, b"b"), [{"k": 3}])
    assert store.failures() == {}  # committing clears the failure record
    combined = store.write_combined()
    assert combined.num_rows == 3
    assert store.complete() and store.read_combined().num_rows == 3


def test_list_and_json(storage):
    storage.write_json("a/b.json", {"x": 1})
    storage.write_bytes("a/c.bin", b"..")
    assert storage.list("a") == ["a/b.json", "a/c.bin"]
    assert storage.list("a", suffix=".json") == ["a/b.json"]
    assert storage.list("nothing/here") == []
    assert storage.read_json("a/b.json") == {"x": 1}
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("a/none")


def test_manifest_is_real_parquet_on_local_disk(tmp_path):
    storage = Storage(f"file://{tmp_path}/run")
    store = begin_stage(storage, "st")
    store.commit("s", outputs(2), [{"a": 1}, {"a": 2}])
    table = pq.read_table(tmp_path / "run" / "st" / store.generation / "manifests" / "s.parquet")
    assert table.column("a").to_pylist() == [1, 2]
    assert not list((tmp_path / "run" / "st" / store.generation / "manifests").glob("*.tmp-*"))


def test_missing_bucket_is_a_clear_error(s3_endpoint):
    st = Storage("s3://no-such-bucket-here/run", StorageConfig(endpoint_url=s3_endpoint))
    with pytest.raises(StorageError, match="bucket does not exist"):
        st.check_writable()


def test_unreachable_endpoint_is_a_clear_error():
    from tests.conftest import free_port
    st = Storage("s3://bucket/run", StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(StorageError, match="unreachable"):
        st.check_writable()


@pytest.mark.parametrize("error", [
    PermissionError(13, "Permission denied"),
    __import__("botocore.exceptions").exceptions.ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "PutObject"),
])
def test_permission_errors_become_clear_messages(error):
    from prism_ray.storage import translate_errors
    with pytest.raises(StorageError, match="(permission denied|access denied)") as info:
        with translate_errors("cannot write", "s3://b/k"):
            raise error
    assert "s3://b/k" in str(info.value)


def test_credentials_never_written(s3_endpoint, s3_bucket, monkeypatch):
    secret = "do-not-leak-this-secret"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    cfg = StorageConfig(endpoint_url=s3_endpoint, options={"secret": secret, "key": "prism-ray-test"})
    st = Storage(f"s3://{s3_bucket}/r", cfg)
    store = begin_stage(st, "stage")
    store.commit("s", outputs(1), [{}])
    store.record_failure("t", "err", 1)
    store.write_combined()
    import boto3
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for obj in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]:
        body = s3.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read()
        assert secret.encode() not in body


# ------------------------------------------------------------------------------ retries of a failing commit


class Flaky:
    """Makes the storage's first `n` writes of keys containing `needle` fail as a throttled S3 would (the error
    storage.translate_errors raises for S3's SlowDown)."""

    def __init__(self, storage: Storage, monkeypatch, needle: str, n: int, error=None):
        from prism_ray.storage import TransientStorageError
        self.left, self.failed = n, 0
        self.error = error or TransientStorageError("injected: SlowDown, please reduce your request rate")
        for method in ("write_bytes", "create_exclusive"):  # outputs, and the manifest
            monkeypatch.setattr(storage, method, self._failing(getattr(storage, method), needle))

    def _failing(self, real, needle: str):
        def write(key, data):
            if needle in key and self.left > 0:
                self.left -= 1
                self.failed += 1
                raise self.error
            return real(key, data)
        return write


def fast_backoff(tries: int = 4):
    from prism_ray.storage import Backoff
    return Backoff(tries=tries, first_delay=0.01, max_delay=0.02)


def test_commit_retries_transient_failures_and_records_them(storage, monkeypatch):
    begin_stage(storage, "recover/prism")
    flaky = Flaky(storage, monkeypatch, "images/c001", 2)
    res = ShardStore(storage, "recover/prism", fast_backoff()).commit("s1", outputs(3), [{"c": i} for i in range(3)])
    assert res.committed and res.storage_retries == 2 and flaky.failed == 2
    store = ShardStore(storage, "recover/prism")
    assert store.verify("s1") == []
    assert [r["storage_retries"] for r in store.read("s1").to_pylist()] == [2, 2, 2]


def test_a_commit_that_keeps_failing_raises_commit_error_and_commits_nothing(storage, monkeypatch):
    from prism_ray.storage import CommitError
    begin_stage(storage, "stage")
    Flaky(storage, monkeypatch, "manifests/", 10)
    with pytest.raises(CommitError, match="after 3 tries"):
        ShardStore(storage, "stage", fast_backoff(3)).commit("s", outputs(1), [{"v": 1}])
    store = ShardStore(storage, "stage")
    assert store.committed() == set()
    assert not storage.fs.find(storage.path(store.key("images")))  # the failed attempt's outputs are gone


def test_permanent_storage_errors_are_not_retried(storage, monkeypatch):
    begin_stage(storage, "stage")
    flaky = Flaky(storage, monkeypatch, "images/", 5, error=StorageError("access denied; check the credentials"))
    with pytest.raises(StorageError, match="access denied"):
        ShardStore(storage, "stage", fast_backoff()).commit("s", outputs(2), [{"v": 1}, {"v": 2}])
    assert flaky.failed == 1


# ------------------------------------------------------------------------------ the store's guarantees


def test_a_store_that_ignores_conditional_create_is_refused(s3_endpoint, s3_bucket):
    """An S3-compatible endpoint that accepts If-None-Match but overwrites anyway would silently lose
    first-writer-wins: the probe catches it (here: a proxy that drops the header), unless the user accepts it."""
    from tests.support.s3_proxy import S3RequestCounter
    with S3RequestCounter(s3_endpoint, drop_headers=("If-None-Match",)) as proxy:
        st = Storage(f"s3://{s3_bucket}/r", StorageConfig(endpoint_url=proxy.url))
        with pytest.raises(StorageError, match="does not honour conditional create"):
            st.check_writable()
        Storage(f"s3://{s3_bucket}/r", StorageConfig(endpoint_url=proxy.url,
                                                     allow_unconditional_create=True)).check_writable()
    Storage(f"s3://{s3_bucket}/r", StorageConfig(endpoint_url=s3_endpoint)).check_writable()  # moto honours it


def test_an_s3fs_without_conditional_create_is_refused(monkeypatch, s3_endpoint, s3_bucket):
    import s3fs

    async def old_pipe_file(self, path, data, chunksize=50 * 2**20, **kwargs):  # s3fs before 2024.12
        raise AssertionError("not reached")

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", old_pipe_file)
    with pytest.raises(StorageError, match="s3fs >= 2024.12"):
        Storage(f"s3://{s3_bucket}/r", StorageConfig(endpoint_url=s3_endpoint))


def test_the_project_requires_an_s3fs_with_conditional_create():
    import tomllib
    from pathlib import Path
    deps = tomllib.loads(Path(__file__).parents[1].joinpath("pyproject.toml").read_text())["project"]["dependencies"]
    (s3fs_dep,) = [d for d in deps if d.startswith("s3fs")]
    assert s3fs_dep == "s3fs>=2024.12.0"


def test_uris_shown_or_recorded_are_redacted(tmp_path):
    from prism_ray.storage import redact, redact_uri
    assert redact_uri("s3://AKIAXXX:topsecret@bucket/run") == "s3://***@bucket/run"
    signed = "https://h/b/k.pt?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F2026&X-Amz-Signature=abc123&x=1"
    assert redact_uri(signed) == "https://h/b/k.pt?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=***&x=1"
    assert redact({"a": ["gs://u:p@b/x", 3]}) == {"a": ["gs://***@b/x", 3]}
    assert redact_uri("plain text, a = sign, no uri") == "plain text, a = sign, no uri"


def test_local_writes_are_synced_before_they_are_renamed(tmp_path, monkeypatch):
    import os
    synced, order = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), order.append("fsync"), real_fsync(fd))[-1])
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))[-1])
    Storage(str(tmp_path / "run")).write_bytes("a/b", b"x")
    assert order[:2] == ["fsync", "replace"] and order.count("fsync") == 2  # the file, then its folder


READERS = r"""
import os
import pyarrow as pa, pyarrow.parquet as pq
from prism_ray.storage import Storage, parquet_table, table_bytes
from prism_ray.stages.relabel import read_epoch_rows

def threads():
    return len(os.listdir("/proc/self/task"))

table = pa.table({"epoch": [0] * 500 + [1] * 500, "b": [str(i) for i in range(1000)]})
storage = Storage(os.environ["RUN"])
storage.write_table("t.parquet", table)
data = table_bytes(table)
before = threads()
assert storage.read_table("t.parquet") == table and parquet_table(data, ["b"]) == table.select(["b"])
assert read_epoch_rows(data, 1).num_rows == 1000
after = threads()
pq.read_table(pa.BufferReader(data))
print(before, after, threads(), flush=True)
os._exit(0)  # the control's threads may still hold its bytes: an interpreter exit could abort on them
"""


def test_parquet_is_decoded_on_the_calling_thread(tmp_path):
    """No Arrow thread ever holds the bytes a table is read from: one that dropped them while the interpreter exits
    aborts the process (seen: `status --verify` ending in SIGABRT after printing its verdict). Run in a new
    interpreter, where Arrow has started no threads yet; pyarrow's own read_table shows the count would move."""
    out = subprocess.run([sys.executable, "-c", READERS], env={**os.environ, "RUN": str(tmp_path)}, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, threaded = map(int, out.stdout.split())
    assert after == before < threaded
