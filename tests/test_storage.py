"""Storage and the shard commit protocol, on a local folder and on a real S3 endpoint (moto server)."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from prism_ray.config import StorageConfig
from prism_ray.storage import ShardStore, Storage, StorageError, sha256


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
    store = ShardStore(storage, "recover/prism")
    res = store.commit("shard-0001", outputs(3), [{"class_id": i, "loss": 0.5 * i} for i in range(3)])
    assert res.committed
    assert store.committed() == {"shard-0001"}
    table = store.read("shard-0001")
    assert table.num_rows == 3
    rows = table.to_pylist()
    assert [r["path"] for r in rows] == ["images/c000.png", "images/c001.png", "images/c002.png"]
    assert rows[1]["sha256"] == sha256(b"img-1-") and rows[1]["bytes"] == len(b"img-1-")
    assert rows[2]["class_id"] == 2 and rows[0]["shard_id"] == "shard-0001"
    assert store.verify("shard-0001") == []
    assert storage.read_bytes("recover/prism/images/c001.png") == b"img-1-"


def test_outputs_without_manifest_are_not_committed(storage):
    store = ShardStore(storage, "recover/prism")
    for key, data in outputs(2):  # a worker died after writing its images, before the manifest
        storage.write_bytes(f"recover/prism/{key}", data)
    assert store.committed() == set()
    assert not store.is_committed("shard-0002")
    # the redo overwrites the same keys and commits
    assert store.commit("shard-0002", outputs(2, b"redo"), [{"class_id": 0}, {"class_id": 1}]).committed
    assert store.committed() == {"shard-0002"}
    assert storage.read_bytes("recover/prism/images/c000.png") == b"img-0-redo"
    assert store.verify("shard-0002") == []


def test_first_commit_wins(storage):
    store = ShardStore(storage, "stage")
    first = store.commit("s", outputs(1, b"a"), [{"v": 1}])
    late = store.commit("s", outputs(1, b"b"), [{"v": 2}])
    assert first.committed and not late.committed
    assert store.read("s").to_pylist()[0]["v"] == 1
    # the late attempt did not touch the committed outputs either
    assert store.verify("s") == []


def test_create_exclusive(storage):
    assert storage.create_exclusive("x/once", b"1")
    assert not storage.create_exclusive("x/once", b"2")
    assert storage.read_bytes("x/once") == b"1"


def test_verify_reports_damage(storage):
    store = ShardStore(storage, "stage")
    store.commit("s", outputs(3), [{}, {}, {}])
    storage.write_bytes("stage/images/c000.png", b"tampered")
    storage.write_bytes("stage/images/c001.png", b"img-1?")  # same size, other bytes
    storage.delete("stage/images/c002.png")
    problems = store.verify("s")
    assert any("c000.png" in p and "bytes" in p for p in problems)
    assert any("c001.png" in p and "sha256" in p for p in problems)
    assert any("c002.png" in p and "missing" in p for p in problems)


def test_failures_and_combined_manifest(storage):
    store = ShardStore(storage, "stage")
    store.record_failure("b", "ValueError: boom", 3)
    assert store.failures()["b"]["error"] == "ValueError: boom"
    store.commit("a", outputs(2), [{"k": 1}, {"k": 2}])
    store.commit("b", outputs(1, b"b"), [{"k": 3}])
    assert store.failures() == {}  # committing clears the failure record
    combined = store.write_combined()
    assert combined.num_rows == 3
    assert storage.read_table("stage/manifest.parquet").num_rows == 3


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
    ShardStore(storage, "st").commit("s", outputs(2), [{"a": 1}, {"a": 2}])
    table = pq.read_table(tmp_path / "run" / "st" / "manifests" / "s.parquet")
    assert table.column("a").to_pylist() == [1, 2]
    assert not list((tmp_path / "run" / "st" / "manifests").glob("*.tmp-*"))


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
    store = ShardStore(st, "stage")
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
    flaky = Flaky(storage, monkeypatch, "images/c001", 2)
    res = ShardStore(storage, "recover/prism", fast_backoff()).commit("s1", outputs(3), [{"c": i} for i in range(3)])
    assert res.committed and res.storage_retries == 2 and flaky.failed == 2
    store = ShardStore(storage, "recover/prism")
    assert store.verify("s1") == []
    assert [r["storage_retries"] for r in store.read("s1").to_pylist()] == [2, 2, 2]


def test_a_commit_that_keeps_failing_raises_commit_error_and_commits_nothing(storage, monkeypatch):
    from prism_ray.storage import CommitError
    Flaky(storage, monkeypatch, "manifests/", 10)
    with pytest.raises(CommitError, match="after 3 tries"):
        ShardStore(storage, "stage", fast_backoff(3)).commit("s", outputs(1), [{"v": 1}])
    assert ShardStore(storage, "stage").committed() == set()


def test_permanent_storage_errors_are_not_retried(storage, monkeypatch):
    flaky = Flaky(storage, monkeypatch, "images/", 5, error=StorageError("access denied; check the credentials"))
    with pytest.raises(StorageError, match="access denied"):
        ShardStore(storage, "stage", fast_backoff()).commit("s", outputs(2), [{"v": 1}, {"v": 2}])
    assert flaky.failed == 1
