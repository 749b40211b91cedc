"""Reading a committed image set (a recover output or the random-real baseline) back for relabel/evaluate.

The set's order, which soft labels and label plans index into, is (class id, ipc index): stable whatever
order the shards were committed in. A worker holds one set at a time, in one of three ways (`choose_holding`):

- device:  decoded uint8 (N, C, H, W) on the worker's GPU; batches are cut, augmented and fed there;
- host:    decoded uint8 in host memory (a CPU worker, or a GPU too small for the set);
- encoded: the files' bytes in one buffer, decoded batch by batch in DataLoader worker processes,
           where memory cannot hold the decoded set (JPEG sets are ~4x smaller encoded).

Decoding goes straight into one preallocated uint8 tensor (through a pinned staging chunk for a GPU),
so no list of per-image tensors and no float32 copy of a set ever exists.
"""
from __future__ import annotations

import dataclasses
import gc
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from prism_ray.algo.image_source import EncodedImages, ImageSource, ResidentImages, decode_into
from prism_ray.config import Config
from prism_ray.data.base import Normalization
from prism_ray.formatting import human_bytes
from prism_ray.host_claims import host_claims, release_claim
from prism_ray.memory import host_memory_available
from prism_ray.stages.base import StageError, read_upstream
from prism_ray.stages.recover import recover_prefix
from prism_ray.stages.squeeze import data_fingerprint
from prism_ray.storage import ShardStore, Storage, read_objects, sha256, translate_errors

HOLDINGS = ("auto", "device", "host", "encoded")
GPU_RESERVE_BYTES = 2 << 30  # GPU memory left free for the model, its activations and the teachers, at least...
GPU_RESERVE_FRACTION = 0.25  # ...or this share of the GPU, whichever is larger
HOST_FRACTION = 0.5  # a decoded set may take at most this share of the host memory available when it loads
CHUNK = 256  # files fetched (concurrently on S3) and decoded per step while loading


@dataclass
class ImageSet:
    name: str
    images: ImageSource  # uint8 pixels (resident) or encoded bytes, with the normalization networks need
    labels: torch.Tensor  # (N,) int64 class ids, on the CPU
    paths: list[str]
    holding: str  # device / host / encoded
    reason: str  # why this holding: the figures the choice was made from
    seconds: float  # time to load

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def decoded_bytes(self) -> int:
        n, c, h, w = self.images.shape
        return n * c * h * w


def choose_holding(decoded_bytes: int, device: torch.device, *, gpu_free: int = 0, gpu_total: int = 0,
                   host_available: int = 0, host_claimed: int = 0) -> tuple[str, str]:
    """(holding, reason) for a set whose decoded uint8 size is `decoded_bytes`.

    On a GPU worker the set goes on the GPU when it fits in the free memory less a reserve of
    max(2 GiB, 25% of the GPU) for the networks; otherwise, and on CPU workers, in host memory when it
    takes at most half of the memory available; otherwise it stays encoded and batches are decoded in
    DataLoader workers. `host_claimed`: memory other workers on this machine have claimed for sets they are
    loading and not taken yet (`prism_ray.host_claims`); it is not available.
    """
    if device.type == "cuda":
        reserve = max(GPU_RESERVE_BYTES, int(GPU_RESERVE_FRACTION * gpu_total))
        gpu = f"GPU free {human_bytes(gpu_free)} less a {human_bytes(reserve)} reserve"
        if decoded_bytes <= gpu_free - reserve:
            return "device", f"{human_bytes(decoded_bytes)} uint8 fits ({gpu})"
        where = f"does not fit on the GPU ({gpu}); "
    else:
        where = ""
    host_available = max(0, host_available - host_claimed)
    host = f"host memory available {human_bytes(host_available)}"
    if host_claimed:
        host += f" after {human_bytes(host_claimed)} claimed by other workers loading sets on this machine"
    host += f", at most {HOST_FRACTION:.0%} for a set"
    if decoded_bytes <= HOST_FRACTION * host_available:
        return "host", f"{human_bytes(decoded_bytes)} uint8 {where}fits in host memory ({host})"
    return "encoded", f"{human_bytes(decoded_bytes)} uint8 {where}does not fit in host memory ({host})"


def set_manifest_rows(storage: Storage, set_name: str, expected: dict | None = None) -> tuple[ShardStore, list[dict]]:
    prefix = recover_prefix(set_name)
    try:
        store, table = read_upstream(storage, prefix, expected)
    except StageError as e:
        raise StageError(f"image set {set_name!r} cannot be read ({e}); run the recover stage first") from None
    rows = table.select(["class_id", "ipc_index", "path", "bytes", "sha256"]).to_pylist()
    if not rows:
        raise StageError(f"image set {set_name!r} ({storage.uri(prefix)}) lists no images")
    return store, sorted(rows, key=lambda r: (r["class_id"], r["ipc_index"]))


def verified_chunks(store: ShardStore, rows: list[dict]):
    """(start, blobs) per chunk of CHUNK files, each file checked against its manifest checksum."""
    storage = store.storage
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start:start + CHUNK]
        paths = [storage.path(store.key(r["path"])) for r in chunk]
        with translate_errors("cannot read", storage.uri(store.prefix)):
            got = read_objects(storage.fs, paths)  # ranged GETs: no HEAD per image
        blobs = []
        for r, data in zip(chunk, got):
            name = storage.uri(store.key(r["path"]))
            if not isinstance(data, bytes):
                raise StageError(f"{name}: listed in the manifest but cannot be read ({data!r})")
            if sha256(data) != r["sha256"]:
                raise StageError(f"{name}: checksum differs from its manifest; the set was modified after it was "
                                 f"committed")
            blobs.append(data)
        yield start, blobs


def _decode_chunk(blobs: list[bytes], out: torch.Tensor, names: list[str], pool: ThreadPoolExecutor | None) -> None:
    def one(j: int) -> None:
        try:
            decode_into(blobs[j], out[j])
        except (ValueError, OSError) as e:
            raise StageError(f"{names[j]}: cannot be used as a set image ({e})") from None

    if pool is None:
        for j in range(len(blobs)):
            one(j)
    else:  # Pillow releases the GIL while decoding: threads decode in parallel
        list(pool.map(one, range(len(blobs))))


def load_image_set(storage: Storage, set_name: str, normalization: Normalization, channels: int, *,
                   holding: str = "host", device: torch.device | str = "cpu", loader_workers: int = 0,
                   expected: dict | None = None) -> ImageSet:
    """Every image the set's combined manifest lists, checksum-verified, in (class, ipc) order.

    holding: device / host / encoded, or auto (`choose_holding` from the set's size and the memory free
    now). loader_workers: threads decoding while loading, and DataLoader processes decoding batches of an
    encoded set. expected: the set's identity the stage was bound to (`Stage.bind`): the set must be that one.
    """
    if holding not in HOLDINGS:
        raise ValueError(f"holding must be one of {', '.join(HOLDINGS)}, got {holding!r}")
    t0 = time.perf_counter()
    device = torch.device(device)
    store, rows = set_manifest_rows(storage, set_name, expected)
    names = [storage.uri(store.key(r["path"])) for r in rows]
    chunks = verified_chunks(store, rows)
    first_start, first_blobs = next(chunks)
    try:  # the first image gives the set's size; every other image must match it
        with Image.open(io.BytesIO(first_blobs[0])) as im:
            width, height = im.size
    except OSError as e:
        raise StageError(f"{names[0]}: cannot be used as a set image ({e})") from None
    n = len(rows)
    shape = (channels, height, width)
    decoded = n * channels * height * width
    reason = "asked for"
    with host_claims() as claims:  # decide and claim under the machine's lock: see prism_ray.host_claims
        if holding == "auto":
            gpu_free = gpu_total = 0
            if device.type == "cuda":
                gpu_free, gpu_total = torch.cuda.mem_get_info(device)
            holding, reason = choose_holding(decoded, device, gpu_free=gpu_free, gpu_total=gpu_total,
                                             host_available=host_memory_available(),
                                             host_claimed=claims.outstanding())
        if holding == "device" and device.type != "cuda":
            holding = "host"  # on a CPU worker the host is the device
        claims.claim({"host": decoded, "encoded": sum(int(r["bytes"]) for r in rows)}.get(holding, 0))

    def all_chunks():
        yield first_start, first_blobs
        yield from chunks

    pool = ThreadPoolExecutor(loader_workers) if loader_workers > 1 else None
    try:
        images = _fill(holding, all_chunks(), rows, names, shape, normalization, device, loader_workers, pool)
    finally:
        release_claim()  # loaded (now counted in this process's memory) or failed
        if pool is not None:
            pool.shutdown()
    labels = torch.tensor([r["class_id"] for r in rows], dtype=torch.int64)
    return ImageSet(set_name, images, labels, [r["path"] for r in rows], holding, reason, time.perf_counter() - t0)


def _fill(holding, chunks, rows, names, shape, normalization, device, loader_workers, pool) -> ImageSource:
    n = len(rows)
    if holding == "encoded":
        sizes = np.array([r["bytes"] for r in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        buffer = np.empty(int(offsets[-1]), dtype=np.uint8)
        check = torch.empty((min(CHUNK, n), *shape), dtype=torch.uint8)
        for start, blobs in chunks:
            for j, data in enumerate(blobs):
                i = start + j
                if len(data) != sizes[i]:
                    raise StageError(f"{names[i]}: {len(data)} bytes, its manifest says {sizes[i]}")
                buffer[offsets[i]:offsets[i + 1]] = np.frombuffer(data, dtype=np.uint8)
            # decode each file once now, so a broken image fails the load, not an epoch later
            _decode_chunk(blobs, check[:len(blobs)], names[start:start + len(blobs)], pool)
        return EncodedImages(buffer, offsets, shape, normalization, num_workers=loader_workers)
    target = device if holding == "device" else torch.device("cpu")
    pixels = torch.empty((n, *shape), dtype=torch.uint8, device=target)
    staging = None
    if target.type == "cuda":
        staging = torch.empty((min(CHUNK, n), *shape), dtype=torch.uint8).pin_memory()
    for start, blobs in chunks:
        stop = start + len(blobs)
        if staging is None:
            _decode_chunk(blobs, pixels[start:stop], names[start:stop], pool)
        else:
            _decode_chunk(blobs, staging[:len(blobs)], names[start:stop], pool)
            pixels[start:stop].copy_(staging[:len(blobs)])  # synchronous: the staging chunk is reused
    return ResidentImages(pixels, normalization)


class ImageSetCache:
    """A worker's image set: loaded when a unit needs it, and dropped before another set is loaded, so a
    worker never holds two sets. The holding is chosen per set (`choose_holding`) and logged."""

    def __init__(self, storage: Storage, normalization: Normalization, channels: int, *,
                 device: torch.device | str = "cpu", loader_workers: int = 0, holding: str = "auto",
                 worker: str = "worker", quiet: bool = False, expected: dict | None = None):
        if holding not in HOLDINGS:
            raise ValueError(f"holding must be one of {', '.join(HOLDINGS)}, got {holding!r}")
        self.storage, self.normalization, self.channels = storage, normalization, channels
        self.device, self.loader_workers, self.holding = torch.device(device), loader_workers, holding
        self.worker, self.quiet = worker, quiet
        self.expected = expected or {}  # upstream prefix -> the identity the stage was bound to
        self._set: ImageSet | None = None

    @property
    def current(self) -> ImageSet | None:
        return self._set

    def get(self, set_name: str) -> ImageSet:
        if self._set is not None and self._set.name == set_name:
            return self._set
        self.drop()
        s = load_image_set(self.storage, set_name, self.normalization, self.channels, holding=self.holding,
                           device=self.device, loader_workers=self.loader_workers,
                           expected=self.expected.get(recover_prefix(set_name)))
        self._set = s
        if not self.quiet:
            n, c, h, w = s.images.shape
            print(f"[{self.worker} pid {os.getpid()}] set {set_name}: {n:,} images {c}x{h}x{w}, held {s.holding} "
                  f"({human_bytes(s.images.nbytes)}; {s.reason}), loaded in {s.seconds:.1f} s",
                  file=sys.stderr, flush=True)
        return s

    def drop(self) -> None:
        """Release the held set (and its GPU memory) before another is loaded."""
        if self._set is None:
            return
        self._set = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def loader_workers(cfg: Config) -> int:
    """DataLoader worker processes per stage worker: as many as the CPUs its actor was given."""
    return max(1, int(cfg.ray.cpus_per_worker))


def set_inputs(cfg: Config) -> dict[str, str]:
    """The stages of every set a relabel or evaluate stage reads, with what to do if one is not complete."""
    return {recover_prefix(s): f"image set {s!r} is not complete; run the recover stage first "
                               f"(prism-ray recover CONFIG)" for s in cfg.sets()}


def sets_fingerprint(cfg: Config) -> dict:
    """What determines the image sets that relabel and evaluate read."""
    used = {n for rc in cfg.recover_methods().values() for n in (rc.primary, *rc.bn_pool, *rc.fixed)}
    fp = {"seed": cfg.run.seed, "data": data_fingerprint(cfg),
          "teachers": [dataclasses.asdict(t) for t in cfg.teachers.models if t.name in used],
          "squeeze": dataclasses.asdict(cfg.squeeze),
          "recover": {name: dataclasses.asdict(rc) for name, rc in cfg.recover_methods().items()},
          "random_real": cfg.baselines.random_real}
    if cfg.baselines.imported:  # only when there are any: runs made before imports existed resume unchanged
        fp["imported"] = {name: {**{k: v for k, v in dataclasses.asdict(spec).items() if k != "method"},
                                 "ipc": cfg.imported_ipc(name)} for name, spec in cfg.baselines.imported.items()}
    return fp
