"""All storage I/O of a run, on fsspec: local paths, file://, s3:// (s3fs) and whatever else fsspec knows.

The shard commit protocol (DESIGN.md section 4) lives here too, in `ShardStore`:
1. a shard's outputs are written to deterministic keys (a retry overwrites the same keys);
2. its Parquet manifest is written last, as one object, listing every output with size and sha256.
A shard is committed if and only if its manifest exists. The manifest is created exclusively (first
writer wins): a worker that was presumed dead but finishes late cannot replace a committed manifest.
Credentials are handed to fsspec and never written anywhere by this module.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from prism_ray.config import StorageConfig

MANIFESTS = "manifests"
FAILED = "failed"
COMBINED = "manifest.parquet"


class StorageError(RuntimeError):
    """A storage problem stated for a user: what failed, where, and what to check."""


class TransientStorageError(StorageError):
    """A storage failure that may pass if retried: throttling, a timeout, an unreachable endpoint, a 5xx."""


class CommitError(StorageError):
    """A unit's outputs were computed but could not be written, even after retries with backoff."""


# S3 error codes that mean "try again later", as AWS documents them (and moto answers them).
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}


def _is_local(protocol: str | tuple) -> bool:
    protos = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return any(p in ("file", "local") for p in protos)


def storage_options(uri: str, cfg: StorageConfig | None) -> dict[str, Any]:
    """fsspec options for `uri`: the config's options, plus endpoint and region for s3."""
    cfg = cfg or StorageConfig()
    opts: dict[str, Any] = dict(cfg.options)
    if uri.startswith(("s3://", "s3a://")):
        client = dict(opts.pop("client_kwargs", {}) or {})
        endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client.setdefault("endpoint_url", endpoint)
        if cfg.region:
            client.setdefault("region_name", cfg.region)
        opts["client_kwargs"] = client
        # Fail fast on an unreachable endpoint instead of botocore's minutes of retries.
        config_kwargs = dict(opts.pop("config_kwargs", {}) or {})
        config_kwargs.setdefault("connect_timeout", 5)
        config_kwargs.setdefault("retries", {"max_attempts": 3, "mode": "standard"})
        opts["config_kwargs"] = config_kwargs
    return opts


def filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path inside it for `uri` (a plain path is a local path)."""
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri, cfg))
    except (ImportError, ValueError) as e:
        raise StorageError(f"cannot open storage {uri!r}: {e}") from None
    return fs, path.rstrip("/") or path


def _error_code(e: BaseException) -> str:
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


@contextlib.contextmanager
def translate_errors(what: str, uri: str) -> Iterator[None]:
    """Turn the many ways storage can fail into one StorageError that says what to check."""
    try:
        yield
    except FileNotFoundError as e:
        if "bucket does not exist" in str(e).lower():  # s3fs reports NoSuchBucket this way
            raise StorageError(f"{what} {uri}: the bucket does not exist; create it or fix run.output") from None
        raise
    except (StorageError, FileExistsError):
        raise
    except PermissionError as e:
        raise StorageError(f"{what} {uri}: permission denied ({e}); check the credentials and the bucket "
                           f"policy") from None
    except Exception as e:  # noqa: BLE001 - classified below, re-raised as one error type
        name = type(e).__name__
        code = _error_code(e) or _error_code(getattr(e, "__cause__", None) or e)
        text = str(e)
        if code in ("AuthorizationHeaderMalformed", "PermanentRedirect", "IllegalLocationConstraintException") or \
                "region" in text and ("is wrong" in text or "PermanentRedirect" in text):
            expected = text.split("expecting", 1)[1].strip(" '\".)") if "expecting" in text else "the bucket's region"
            raise StorageError(f"{what} {uri}: the bucket is in another region; set storage.region to {expected} "
                               f"({code or 'wrong region'})") from None
        if code == "NoSuchBucket" or "NoSuchBucket" in text or "bucket does not exist" in text.lower():
            raise StorageError(f"{what} {uri}: the bucket does not exist; create it or fix run.output") from None
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or "AccessDenied" in text:
            raise StorageError(f"{what} {uri}: access denied; check the credentials (AWS_ACCESS_KEY_ID, "
                               f"AWS_SECRET_ACCESS_KEY or storage.options) and the bucket policy") from None
        if code in TRANSIENT_CODES or any(c in text for c in ("SlowDown", "ServiceUnavailable", "InternalError")):
            raise TransientStorageError(f"{what} {uri}: the storage service asks to retry ({code or text})") from None
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionError", "ClientConnectorError",
                    "ConnectionRefusedError", "ReadTimeoutError") or "Could not connect" in text:
            raise TransientStorageError(f"{what} {uri}: storage endpoint unreachable ({text}); check storage.endpoint_url "
                               f"or AWS_ENDPOINT_URL and that the service is running") from None
        if name == "NoCredentialsError" or "Unable to locate credentials" in text:
            raise StorageError(f"{what} {uri}: no credentials found; set AWS_ACCESS_KEY_ID and "
                               f"AWS_SECRET_ACCESS_KEY or storage.options") from None
        raise


def _unsatisfiable(e: BaseException) -> bool:
    return isinstance(e, OSError) and (e.errno == errno.EINVAL or "not satisfiable" in str(e))


def read_objects(fs, paths: list[str]) -> list[bytes | BaseException]:
    """Whole objects, fetched concurrently, each as its bytes or the exception reading it raised.

    Ranged reads from byte 0: for a whole-object read s3fs first asks for the object's size (one HEAD
    per image); a range needs none. An empty object cannot satisfy a range, and reads as b"".
    """
    out = fs.cat_ranges(list(paths), 0, None, on_error="return")
    return [b"" if _unsatisfiable(r) else r for r in out]


def read_object(fs, path: str) -> bytes:
    """One whole object, as `read_objects` reads it; raises what reading it raised."""
    (blob,) = read_objects(fs, [path])
    if isinstance(blob, BaseException):
        raise blob
    return blob


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Storage:
    """A run's folder (or bucket prefix): keys are '/'-separated paths relative to its root URI."""

    def __init__(self, root: str, cfg: StorageConfig | None = None):
        self.root = root.rstrip("/") if "://" in root else os.path.abspath(os.path.expanduser(root))
        self.cfg = cfg or StorageConfig()
        self.fs, self.base = filesystem(self.root, self.cfg)
        self.local = _is_local(self.fs.protocol)

    def __reduce__(self):  # ship to Ray workers as (root, config): filesystems are rebuilt there
        return (Storage, (self.root, self.cfg))

    def path(self, key: str) -> str:
        return posixpath.join(self.base, key) if key else self.base

    def uri(self, key: str = "") -> str:
        return f"{self.root}/{key}" if key else self.root

    # ---- plain objects

    def check_writable(self) -> None:
        """Write and delete a probe object, so that a bad bucket or endpoint fails before any work."""
        key = f".prism-ray-probe-{uuid.uuid4().hex}"
        with translate_errors("cannot write to", self.uri()):
            self.write_bytes(key, b"ok")
            self.fs.rm(self.path(key))

    @staticmethod
    def _local_temp(path: str, data: bytes) -> str:
        """`data` in a fresh temporary file beside `path` (same filesystem: it can be renamed or linked)."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        return tmp

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self.path(key)
        with translate_errors("cannot write", self.uri(key)):
            if self.local:
                os.replace(self._local_temp(path, data), path)  # readers never see half a file
            else:
                self.fs.pipe_file(path, data)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write `data` at `key` only if nothing is there; True if this call created it."""
        path = self.path(key)
        with translate_errors("cannot write", self.uri(key)):
            if self.local:
                tmp = self._local_temp(path, data)
                try:
                    os.link(tmp, path)  # atomic create-if-absent with the whole content in place
                    return True
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
            if self.fs.protocol in ("s3", "s3a") or "s3" in self.fs.protocol:
                try:
                    self.fs.pipe_file(path, data, mode="create")  # PUT with If-None-Match: *
                    return True
                except FileExistsError:
                    return False
                except OSError as e:
                    if "PreconditionFailed" in str(e) or "412" in str(e):
                        return False
                    raise
            # Other filesystems: check-then-write is the best fsspec offers.
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
            return True

    def read_bytes(self, key: str) -> bytes:
        with translate_errors("cannot read", self.uri(key)):
            return read_object(self.fs, self.path(key))

    def exists(self, key: str) -> bool:
        with translate_errors("cannot read", self.uri(key)):
            return self.fs.exists(self.path(key))

    def size(self, key: str) -> int:
        with translate_errors("cannot read", self.uri(key)):
            return int(self.fs.size(self.path(key)))

    def list(self, prefix: str, suffix: str = "") -> list[str]:
        """Keys directly under `prefix` (non-recursive) ending in `suffix`; empty if the prefix is absent."""
        with translate_errors("cannot list", self.uri(prefix)):
            try:
                entries = self.fs.ls(self.path(prefix), detail=False, refresh=True) if not self.local else \
                    self.fs.ls(self.path(prefix), detail=False)
            except FileNotFoundError:
                return []
        base = self.path(prefix).rstrip("/") + "/"
        keys = []
        for e in entries:
            name = e[len(base):] if e.startswith(base) else posixpath.basename(e)
            if name.endswith(suffix) and ".tmp-" not in name:
                keys.append(posixpath.join(prefix, name))
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Remove a key or a whole prefix; absent is fine."""
        with translate_errors("cannot delete", self.uri(key)):
            try:
                self.fs.rm(self.path(key), recursive=True)
            except FileNotFoundError:
                pass

    # ---- structured objects

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_table(self, key: str, table: pa.Table) -> None:
        self.write_bytes(key, table_bytes(table))

    def read_table(self, key: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(key)))


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


@dataclass
class CommitResult:
    shard_id: str
    committed: bool  # False: another attempt had committed this shard first; its manifest stands
    table: pa.Table
    storage_retries: int = 0  # storage requests of this commit that failed transiently and were retried


def is_transient(e: BaseException) -> bool:
    """Worth retrying: a TransientStorageError, or an OS-level I/O error that is not about the key or the rights."""
    if isinstance(e, TransientStorageError):
        return True
    if isinstance(e, StorageError):
        return False
    return isinstance(e, (OSError, TimeoutError)) and not isinstance(
        e, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError))


@dataclass
class Backoff:
    """Retries of one storage request: `tries` in all, sleeping first_delay * 2^i (capped) between them."""

    tries: int = 6
    first_delay: float = 0.5
    max_delay: float = 8.0

    def delays(self) -> Iterator[float]:
        for i in range(self.tries - 1):
            yield min(self.first_delay * 2 ** i, self.max_delay)


class ShardStore:
    """The commit protocol for one stage of a run, e.g. prefix ``recover/prism``.

    Every write of a commit is retried with exponential backoff when storage fails transiently (throttling, a
    network blip), so the computed outputs are not thrown away; each manifest row records how many storage
    requests of its commit had to be retried (`storage_retries`). Only when the retries are spent does the
    commit raise `CommitError`, and the unit counts as a failed attempt.
    """

    def __init__(self, storage: Storage, prefix: str, backoff: Backoff | None = None):
        self.storage = storage
        self.prefix = prefix.strip("/")
        self.backoff = backoff or Backoff()

    def _retrying(self, what: str, fn: Callable[[], Any], retries: list[int]) -> Any:
        """fn() with backoff on transient failures; retries[0] counts the failed tries (shared per commit)."""
        delays = self.backoff.delays()
        while True:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified: transient ones are retried, others raised
                if not is_transient(e):
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise CommitError(f"{what}: storage kept failing after {self.backoff.tries} tries ({e}); the "
                                      f"computed outputs are lost for this attempt") from None
                retries[0] += 1
                time.sleep(delay)

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def manifest_key(self, shard_id: str) -> str:
        return self.key(f"{MANIFESTS}/{shard_id}.parquet")

    def is_committed(self, shard_id: str) -> bool:
        return self.storage.exists(self.manifest_key(shard_id))

    def commit(self, shard_id: str, outputs: Sequence[tuple[str, bytes]], rows: Sequence[dict],
               schema: pa.Schema | None = None) -> CommitResult:
        """Write `outputs` (paths relative to the stage prefix), then the manifest: one row per output."""
        if len(outputs) != len(rows):
            raise ValueError(f"shard {shard_id}: {len(outputs)} outputs but {len(rows)} manifest rows")
        retries = [0]
        what = f"commit of {self.prefix} {shard_id}"
        if self._retrying(what, lambda: self.is_committed(shard_id), retries):  # a late duplicate: leave it alone
            return CommitResult(shard_id, False, self._retrying(what, lambda: self.read(shard_id), retries),
                                retries[0])
        records = []
        for (rel, data), row in zip(outputs, rows):
            self._retrying(what, lambda: self.storage.write_bytes(self.key(rel), data), retries)
            records.append({**row, "shard_id": shard_id, "path": rel, "bytes": len(data), "sha256": sha256(data)})
        if schema is not None and "storage_retries" not in schema.names:
            schema = schema.append(pa.field("storage_retries", pa.int32()))

        def write_manifest() -> tuple[bool, pa.Table]:
            # built at each try, so the manifest counts the retries of its own write too
            table = pa.Table.from_pylist([{**r, "storage_retries": retries[0]} for r in records], schema=schema)
            return self.storage.create_exclusive(self.manifest_key(shard_id), table_bytes(table)), table

        created, table = self._retrying(what, write_manifest, retries)
        if created:
            return CommitResult(shard_id, True, table, retries[0])
        return CommitResult(shard_id, False, self._retrying(what, lambda: self.read(shard_id), retries), retries[0])

    def committed(self) -> set[str]:
        keys = self.storage.list(self.key(MANIFESTS), suffix=".parquet")
        return {posixpath.basename(k)[: -len(".parquet")] for k in keys}

    def read(self, shard_id: str) -> pa.Table:
        return self.storage.read_table(self.manifest_key(shard_id))

    def read_all(self) -> pa.Table | None:
        """Every committed shard's rows, in shard-id order; None when nothing is committed."""
        tables = [self.read(s) for s in sorted(self.committed())]
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def verify(self, shard_id: str) -> list[str]:
        """Problems with a committed shard: outputs missing, or differing in size or checksum."""
        problems = []
        for row in self.read(shard_id).to_pylist():
            key = self.key(row["path"])
            try:
                data = self.storage.read_bytes(key)
            except FileNotFoundError:
                problems.append(f"{row['path']}: missing")
                continue
            if len(data) != row["bytes"]:
                problems.append(f"{row['path']}: {len(data)} bytes, manifest says {row['bytes']}")
            elif sha256(data) != row["sha256"]:
                problems.append(f"{row['path']}: sha256 differs from the manifest")
        return problems

    # ---- failures and the stage's combined manifest

    def failure_key(self, shard_id: str) -> str:
        return self.key(f"{FAILED}/{shard_id}.json")

    def record_failure(self, shard_id: str, error: str, attempts: int, kind: str = "compute") -> None:
        """kind: 'compute' (the unit's code failed) or 'storage' (its outputs could not be written)."""
        self.storage.write_json(self.failure_key(shard_id), {"shard_id": shard_id, "error": error, "kind": kind,
                                                             "attempts": attempts, "time": time.time()})

    def failed_ids(self) -> set[str]:
        """Units with a failure record (some may have committed since: see `failures`)."""
        keys = self.storage.list(self.key(FAILED), suffix=".json")
        return {posixpath.basename(k)[: -len(".json")] for k in keys}

    def failures(self) -> dict[str, dict]:
        """Failure records of units that are still not committed, by unit id.

        Commits leave records alone (one request less per commit); the executors delete the records of
        units they commit, and this filter hides any a crash left behind.
        """
        failed = self.failed_ids()
        if not failed:
            return {}
        out = {}
        for shard_id in sorted(failed - self.committed()):
            key = self.failure_key(shard_id)
            try:
                rec = self.storage.read_json(key)
            except FileNotFoundError:  # cleared between list and read
                continue
            out[rec["shard_id"]] = rec
        return out

    def write_combined(self) -> pa.Table | None:
        """One Parquet manifest of the whole stage (written when every shard is committed)."""
        table = self.read_all()
        if table is not None:
            self.storage.write_table(self.key(COMBINED), table)
        return table
