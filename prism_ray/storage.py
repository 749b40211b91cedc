"""All storage I/O of a run, on fsspec: local paths, file://, s3:// (s3fs) and whatever else fsspec knows.

The unit commit protocol (DESIGN.md section 4) lives here too, in `ShardStore`:
1. each attempt writes a unit's outputs under keys of its own (the attempt's id is in every key), so no late or
   concurrent attempt can replace bytes that a committed manifest points to;
2. the unit's Parquet manifest is written last, created exclusively (first writer wins), listing every output
   with its key, size and sha256. A unit is committed if and only if its manifest exists; an attempt that
   loses the race deletes its own outputs; readers verify each output against the manifest.
A stage's outputs live under a generation folder named by the stage's record (`stages/base.py`): a reset
writes a record with a new generation, so an interrupted reset can never be adopted.
Credentials are handed to fsspec and never written anywhere; URIs shown to a user are redacted.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from prism_ray.config import StorageConfig
from prism_ray.redaction import redact, redact_uri  # noqa: F401 - redact is part of this module's API

MANIFESTS = "manifests"
FAILED = "failed"
RECORDS = "records"
CHECKPOINTS = "checkpoints"
COMBINED = "manifest.parquet"
# Folders of a generation that hold bookkeeping, not a unit's outputs (never swept as orphans).
BOOKKEEPING = {MANIFESTS, FAILED, RECORDS, CHECKPOINTS, COMBINED}
TEMP_MARK = ".tmp-"  # NAME.tmp-UUID: a local write in flight (or one a crash cut short), never part of a stage


def _modified(info: dict, default: float) -> float:
    """A listed file's modification time (epoch seconds) as fsspec's local filesystem gives it; `default` where
    the listing has none (object stores: they write no temporary files)."""
    mtime = info.get("mtime")
    return float(mtime) if isinstance(mtime, (int, float)) else default


def is_temp(name: str) -> bool:
    """Whether `name` is a local write's temporary file: listings and the orphan sweep leave those out."""
    return TEMP_MARK in name


class StorageError(RuntimeError):
    """A storage problem stated for a user: what failed, where, and what to check."""


class TransientStorageError(StorageError):
    """A storage failure that may pass if retried: throttling, a timeout, an unreachable endpoint, a 5xx."""


class CommitError(StorageError):
    """A unit's outputs were computed but could not be written, even after retries with backoff."""


class IntegrityError(StorageError):
    """An output differs from what its committed manifest says (size or sha256), or is missing."""


# S3 error codes that mean "try again later", as AWS documents them (and moto answers them).
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}


def _is_local(protocol: str | tuple) -> bool:
    return any(p in ("file", "local") for p in _protocols(protocol))


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
        if name == "ParamValidationError" and "bucket name" in text.lower():
            raise StorageError(f"{what} {uri}: not a valid bucket name; check run.output and the data URIs") from None
        if name == "NoCredentialsError" or "Unable to locate credentials" in text:
            raise StorageError(f"{what} {uri}: no credentials found; set AWS_ACCESS_KEY_ID and "
                               f"AWS_SECRET_ACCESS_KEY or storage.options") from None
        raise


def _protocols(protocol: str | tuple) -> tuple[str, ...]:
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def require_conditional_s3() -> None:
    """s3fs writes a create-if-absent PUT (If-None-Match) only from 2024.12 on; older ones fail every commit."""
    import inspect

    import s3fs

    if "mode" not in inspect.signature(s3fs.S3FileSystem._pipe_file).parameters:
        raise StorageError(f"s3fs {s3fs.__version__} cannot write a key only if it is absent (If-None-Match), which "
                           f"every commit needs; install s3fs >= 2024.12.0 (pip install -U 's3fs>=2024.12')")


def _fsync_dir(folder: str) -> None:
    """Make a new or replaced name in `folder` durable (POSIX: a rename is durable once its folder is synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the data itself was synced
    finally:
        os.close(fd)


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
        self.s3 = not self.local and any(p in ("s3", "s3a") for p in _protocols(self.fs.protocol))
        if self.s3:
            require_conditional_s3()

    def __reduce__(self):  # ship to Ray workers as (root, config): filesystems are rebuilt there
        return (Storage, (self.root, self.cfg))

    def path(self, key: str) -> str:
        return posixpath.join(self.base, key) if key else self.base

    def full_uri(self, key: str = "") -> str:
        """The URI of `key` to open (credentials included, if the root has any): never print it."""
        return f"{self.root}/{key}" if key else self.root

    def uri(self, key: str = "") -> str:
        """The URI of `key` for messages and records (credentials redacted)."""
        return redact_uri(self.full_uri(key))

    # ---- plain objects

    def check_writable(self) -> None:
        """Write and delete a probe object, so that a bad bucket or endpoint fails before any work; then check that
        the store refuses a second exclusive create of one key (`check_conditional_create`)."""
        key = f".prism-ray-probe-{uuid.uuid4().hex}"
        with translate_errors("cannot write to", self.uri()):
            self.write_bytes(key, b"ok")
            self.fs.rm(self.path(key))
        self.check_conditional_create()

    def check_conditional_create(self) -> None:
        """The commit protocol and the run lease rely on create-if-absent being honoured (S3: a PUT with
        `If-None-Match: *` answered 412 when the key exists). Some S3-compatible stores accept the header and
        overwrite anyway: create one key twice and refuse to run when the second create succeeds, unless
        storage.allow_unconditional_create accepts the risk."""
        if self.cfg.allow_unconditional_create:
            return
        key = f".prism-ray-probe-{uuid.uuid4().hex}-exclusive"
        try:
            first = self.create_exclusive(key, b"first")
            second = self.create_exclusive(key, b"second")
            kept = self.read_bytes(key)
        finally:
            with contextlib.suppress(Exception):
                self.fs.rm(self.path(key))
        if not first or second or kept != b"first":
            raise StorageError(f"{self.uri()}: this store does not honour conditional create (a second exclusive "
                               f"write of one key {'succeeded' if second else 'was not refused'}), so two attempts "
                               f"or two drivers could overwrite each other's committed outputs; use a store that "
                               f"answers If-None-Match: * with 412 (AWS S3, MinIO, moto), or set "
                               f"storage.allow_unconditional_create: true to accept the risk")

    @staticmethod
    def _local_temp(path: str, data: bytes) -> str:
        """`data` in a fresh temporary file beside `path` (same filesystem: it can be renamed or linked), flushed
        to the disk: a rename or link that survives a crash must not point at unwritten blocks."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}{TEMP_MARK}{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self.path(key)
        with translate_errors("cannot write", self.uri(key)):
            if self.local:
                os.replace(self._local_temp(path, data), path)  # readers never see half a file
                _fsync_dir(os.path.dirname(path))  # and the new name survives a crash
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
                    _fsync_dir(os.path.dirname(path))
                    return True
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
            if self.s3:
                try:
                    self.fs.pipe_file(path, data, mode="create")  # PUT with If-None-Match: *
                    return True
                except FileExistsError:
                    return False
                except OSError as e:
                    if "PreconditionFailed" in str(e) or "412" in str(e):
                        return False
                    raise
            if not self.cfg.allow_unconditional_create:
                raise StorageError(f"{self.uri()}: prism-ray knows no atomic create-if-absent for "
                                   f"{'/'.join(_protocols(self.fs.protocol))} storage, which its commits rely on; "
                                   f"use a local folder or s3://, or set storage.allow_unconditional_create: true "
                                   f"to accept check-then-write")
            if self.fs.exists(path):  # the best fsspec offers elsewhere: not atomic
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
            if name.endswith(suffix) and not is_temp(name):
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
        return parquet_table(self.read_bytes(key))


def parquet_table(data: bytes, columns: Sequence[str] | None = None) -> pa.Table:
    """The table of a whole Parquet file held in memory, decoded on the calling thread. Decoded on Arrow's threads,
    the last reference to `data` (a Python object) can be dropped on one of them just after the read returns: if
    the interpreter is exiting by then, that thread cannot take the GIL and the process aborts ("terminate called
    without an active exception"), e.g. a CLI command whose last act was reading a manifest."""
    return pq.ParquetFile(pa.BufferReader(data)).read(columns=columns, use_threads=False)


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


def retrying(what: str, fn: Callable[[], Any], backoff: Backoff | None = None, retries: list[int] | None = None,
             error: type[StorageError] = StorageError) -> Any:
    """fn() with exponential backoff on transient storage failures (throttling, a network blip); `retries[0]`
    counts the failed tries. Once the tries are spent, raises `error` saying what kept failing."""
    backoff = backoff or Backoff()
    delays = backoff.delays()
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified: transient ones are retried, others raised
            if not is_transient(e):
                raise
            delay = next(delays, None)
            if delay is None:
                raise error(f"{what}: storage kept failing after {backoff.tries} tries ({e})") from None
            if retries is not None:
                retries[0] += 1
            time.sleep(delay)


STAGE_RECORD = "stage.json"  # <stage prefix>/stage.json: the stage's config, generation and lineage
GENERATION = re.compile(r"g[0-9a-f]{10}")


def new_generation() -> str:
    return f"g{uuid.uuid4().hex[:10]}"


def attempt_key(rel: str, attempt: str) -> str:
    """`rel` with the attempt's id before its extension: images/00001/00001_ipc0000.<attempt>.jpg."""
    folder, name = posixpath.split(rel)
    stem, dot, ext = name.partition(".")
    return posixpath.join(folder, f"{stem}.{attempt}{dot}{ext}" if dot else f"{stem}.{attempt}")


def write_stage_record(storage: Storage, prefix: str, record: dict) -> None:
    """Write a stage's record (it must name its generation): the one object that says which generation counts."""
    if not GENERATION.fullmatch(str(record.get("generation"))):
        raise ValueError(f"a stage record needs a generation like g0123456789, got {record.get('generation')!r}")
    retrying(f"record of {prefix}", lambda: storage.write_json(f"{prefix.strip('/')}/{STAGE_RECORD}", record))


def begin_stage(storage: Storage, prefix: str, config: dict | None = None) -> "ShardStore":
    """A store for `prefix` that can commit: the generation its record names, or a new record (for code that commits
    outside a pipeline stage: benches, tests, imports)."""
    store = ShardStore(storage, prefix)
    if store.generation is None:
        generation = new_generation()
        write_stage_record(storage, prefix, {"generation": generation, "config": config or {}, "upstream": None,
                                             "written": time.time()})
        store = ShardStore(storage, prefix, generation=generation)
    return store


class ShardStore:
    """The commit protocol for one stage of a run, e.g. prefix ``recover/prism``.

    Everything a stage writes lives under ``<prefix>/<generation>/`` (the generation its record names, see
    `stages/base.py`); a store without a generation has nothing committed. Every write of a commit is retried
    with exponential backoff when storage fails transiently, so the computed outputs are not thrown away; each
    manifest row records how many storage requests of its commit had to be retried (`storage_retries`). Only
    when the retries are spent does the commit raise `CommitError`, and the unit counts as a failed attempt.
    """

    def __init__(self, storage: Storage, prefix: str, backoff: Backoff | None = None,
                 generation: str | None = None):
        self.storage = storage
        self.prefix = prefix.strip("/")
        self.backoff = backoff or Backoff()
        self._generation = generation  # None: read from the stage's record when first needed

    def __reduce__(self):
        return (ShardStore, (self.storage, self.prefix, self.backoff, self._generation))

    def _retrying(self, what: str, fn: Callable[[], Any], retries: list[int]) -> Any:
        return retrying(what, fn, self.backoff, retries, error=CommitError)

    # ---- the stage's record and generation

    @property
    def record_key(self) -> str:
        return f"{self.prefix}/{STAGE_RECORD}"

    def record(self) -> dict | None:
        """The stage's record (config, generation, lineage), None when the stage has none."""
        try:
            return retrying(f"read {self.storage.uri(self.record_key)}",
                            lambda: self.storage.read_json(self.record_key), self.backoff)
        except FileNotFoundError:
            return None

    @property
    def generation(self) -> str | None:
        """The generation this store reads and writes: given, or the record's (read until there is one)."""
        if self._generation is None:
            self._generation = (self.record() or {}).get("generation")
        return self._generation

    def key(self, rel: str) -> str:
        gen = self.generation
        if gen is None:
            raise StorageError(f"{self.storage.uri(self.prefix)}: the stage has no record (stage.json): nothing of it "
                               f"is committed")
        return f"{self.prefix}/{gen}/{rel}"

    def manifest_key(self, shard_id: str) -> str:
        return self.key(f"{MANIFESTS}/{shard_id}.parquet")

    @property
    def combined_key(self) -> str:
        return self.key(COMBINED)

    def is_committed(self, shard_id: str) -> bool:
        return self.generation is not None and self.storage.exists(self.manifest_key(shard_id))

    def complete(self) -> bool:
        """Every unit committed and the stage's combined manifest written."""
        return self.generation is not None and self.storage.exists(self.combined_key)

    # ---- commits

    def commit(self, shard_id: str, outputs: Sequence[tuple[str, bytes]], rows: Sequence[dict],
               schema: pa.Schema | None = None) -> CommitResult:
        """Write `outputs` (paths relative to the generation folder; each gets this attempt's id in its key), then
        the manifest, created exclusively: one row per output with its real key, size and sha256."""
        if len(outputs) != len(rows):
            raise ValueError(f"shard {shard_id}: {len(outputs)} outputs but {len(rows)} manifest rows")
        retries = [0]
        what = f"commit of {self.prefix} {shard_id}"
        if self._retrying(what, lambda: self.is_committed(shard_id), retries):  # a late duplicate: leave it alone
            return CommitResult(shard_id, False, self._retrying(what, lambda: self.read(shard_id), retries),
                                retries[0])
        attempt = uuid.uuid4().hex[:12]
        written: list[str] = []
        records = []
        try:
            for (rel, data), row in zip(outputs, rows):
                key = attempt_key(rel, attempt)
                self._retrying(what, lambda: self.storage.write_bytes(self.key(key), data), retries)
                written.append(key)
                records.append({**row, "shard_id": shard_id, "path": key, "bytes": len(data), "sha256": sha256(data),
                                "attempt": attempt})
            if schema is not None:
                for name, kind in (("attempt", pa.string()), ("storage_retries", pa.int32())):
                    if name not in schema.names:
                        schema = schema.append(pa.field(name, kind))

            def write_manifest() -> tuple[bool, pa.Table]:
                # built at each try, so the manifest counts the retries of its own write too
                table = pa.Table.from_pylist([{**r, "storage_retries": retries[0]} for r in records], schema=schema)
                return self.storage.create_exclusive(self.manifest_key(shard_id), table_bytes(table)), table

            created, table = self._retrying(what, write_manifest, retries)
        except BaseException:
            self._discard(written)  # nothing committed: this attempt's outputs are garbage
            raise
        if created:
            return CommitResult(shard_id, True, table, retries[0])
        existing = self._retrying(what, lambda: self.read(shard_id), retries)
        if "attempt" in existing.column_names and set(existing.column("attempt").to_pylist()) == {attempt}:
            # our own create landed but its answer was lost, and the retry was refused (412): it is ours
            return CommitResult(shard_id, True, existing, retries[0])
        self._discard(written)  # another attempt committed first: its outputs stand, ours go
        return CommitResult(shard_id, False, existing, retries[0])

    def _discard(self, rels: list[str]) -> None:
        for rel in rels:
            with contextlib.suppress(Exception):  # best effort: an orphan is swept when the stage completes
                self.storage.delete(self.key(rel))

    def committed(self) -> set[str]:
        if self.generation is None:
            return set()
        keys = self.storage.list(self.key(MANIFESTS), suffix=".parquet")
        return {posixpath.basename(k)[: -len(".parquet")] for k in keys}

    def read(self, shard_id: str) -> pa.Table:
        return self.storage.read_table(self.manifest_key(shard_id))

    def read_all(self) -> pa.Table | None:
        """Every committed shard's rows, in shard-id order; None when nothing is committed."""
        tables = [self.read(s) for s in sorted(self.committed())]
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def read_combined(self) -> pa.Table:
        """The stage's combined manifest (FileNotFoundError while the stage is not complete)."""
        if self.generation is None:
            raise FileNotFoundError(f"{self.storage.uri(self.prefix)}: no {STAGE_RECORD}")
        return self.storage.read_table(self.combined_key)

    # ---- reading outputs back

    def read_output(self, row: dict) -> bytes:
        """The bytes of one manifest row's output, checked against the row's size and sha256."""
        key = self.key(row["path"])
        try:
            data = retrying(f"read {self.storage.uri(key)}", lambda: self.storage.read_bytes(key), self.backoff)
        except FileNotFoundError:
            raise IntegrityError(f"{self.storage.uri(key)}: listed in its manifest but missing") from None
        problem = output_problem(data, row)
        if problem:
            raise IntegrityError(f"{self.storage.uri(key)}: {problem}; it was modified after it was committed")
        return data

    def verify(self, shard_id: str) -> list[str]:
        """Problems with a committed shard: outputs missing, or differing in size or checksum."""
        problems = []
        for row in self.read(shard_id).to_pylist():
            try:
                data = self.storage.read_bytes(self.key(row["path"]))
            except FileNotFoundError:
                problems.append(f"{row['path']}: missing")
                continue
            problem = output_problem(data, row)
            if problem:
                problems.append(f"{row['path']}: {problem}")
        return problems

    def sweep_orphans(self, stale_temp_seconds: float | None = None) -> list[str]:
        """Delete the files of attempts that never committed (workers killed mid-commit) from the folders that hold
        committed outputs; returns their paths. Called once every unit is committed. A local write's temporary
        file goes too once it is older than `stale_temp_seconds` (None: never): its writer was cut short, since
        this driver has no unit in flight and an earlier driver's workers end with it."""
        table = self.read_all()
        if table is None:
            return []
        listed = set(table.column("path").to_pylist())
        orphans = []
        now = time.time()
        for top in sorted({p.split("/", 1)[0] for p in listed} - BOOKKEEPING):
            root = self.storage.path(self.key(top))
            with translate_errors("cannot list", self.storage.uri(self.key(top))):
                try:
                    found = self.storage.fs.find(root, detail=True)
                except FileNotFoundError:
                    continue
            base = self.storage.path(self.key(""))
            for path, info in found.items():
                rel = posixpath.relpath(path, base)
                if rel in listed:
                    continue
                if not is_temp(rel):
                    orphans.append(rel)
                elif stale_temp_seconds is not None and now - _modified(info, now) > stale_temp_seconds:
                    orphans.append(rel)
        for rel in orphans:
            self.storage.delete(self.key(rel))
        return orphans

    # ---- failures and the stage's combined manifest

    def failure_key(self, shard_id: str) -> str:
        return self.key(f"{FAILED}/{shard_id}.json")

    def record_failure(self, shard_id: str, error: str, attempts: int, kind: str = "compute") -> None:
        """kind: 'compute' (the unit's code failed) or 'storage' (its outputs could not be written)."""
        record = {"shard_id": shard_id, "error": error, "kind": kind, "attempts": attempts, "time": time.time()}
        retrying(f"failure record of {self.prefix} {shard_id}",
                 lambda: self.storage.write_json(self.failure_key(shard_id), record), self.backoff)

    def failed_ids(self) -> set[str]:
        """Units with a failure record (some may have committed since: see `failures`)."""
        if self.generation is None:
            return set()
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
            retrying(f"combined manifest of {self.prefix}",
                     lambda: self.storage.write_table(self.combined_key, table), self.backoff)
        return table


def output_problem(data: bytes, row: dict) -> str | None:
    """How `data` differs from what its manifest row says (None: it is the committed output)."""
    if len(data) != row["bytes"]:
        return f"{len(data)} bytes, its manifest says {row['bytes']}"
    if sha256(data) != row["sha256"]:
        return "sha256 differs from its manifest"
    return None
