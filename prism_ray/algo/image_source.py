"""Where a set's images live while relabel and students read them, and how batches of them reach the device.

Two holdings, one interface (`ImageSource.batches`: the uint8 (B, C, H, W) batches of given image indices,
in order, on the caller's device):

- `ResidentImages`: the set decoded once into one uint8 (N, C, H, W) tensor (150 KB per image at 224 px),
  on the GPU on a GPU worker; a batch is an index_select on that device.
- `EncodedImages`: the set's encoded files in one contiguous byte buffer (JPEG: ~40 KB per image at
  224 px); each batch is decoded in DataLoader worker processes into a fresh uint8 tensor. For nodes whose
  memory cannot hold the decoded set.

Both give the same bytes for an image (decoding is deterministic), so the augmented batches, soft labels
and students do not depend on the holding. A float tensor (already normalized) or a list of (C, H, W)
tensors is accepted too, as `TensorImages`: small sets and tests.
"""
from __future__ import annotations

import gc
import io
import multiprocessing
import sys
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

Ranges = Sequence[tuple[int, int]]


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def loader_worker_init(worker_id: int) -> None:
    """DataLoader worker_init_fn: make a loader process's memory flat, and its data set usable after the fork.

    - glibc raises its mmap threshold each time a large block is freed, after which batch-sized buffers come
      from the heap and are not returned: measured here, a worker streaming 160 px batches of 50 grew by
      ~25 MB per batch, without bound. A fixed 64 KiB threshold (mallopt) keeps it flat.
    - An S3 filesystem refuses to be used in a forked process: the data set's `reopen()` (when it has one)
      re-creates such handles.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 10)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
    info = torch.utils.data.get_worker_info()
    ds = info.dataset if info is not None else None
    while isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    reopen = getattr(ds, "reopen", None)
    if callable(reopen):
        reopen()


# what a forkserver imports once, so that its loader processes start without importing torch (~2.7 s here)
FORKSERVER_PRELOAD = ["torch", "prism_ray.algo.image_source", "prism_ray.data"]


def in_ray_worker() -> bool:
    """True in a Ray worker process (an actor or a task), False in a driver or a process without Ray."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        from ray._private import worker
        return worker.global_worker.mode == worker.WORKER_MODE
    except (ImportError, AttributeError):  # another Ray: take the process for a worker, forking as before
        return True


def loader_context():
    """How a loader's worker processes start here: forked from this process in a Ray worker, from a forkserver
    elsewhere (None: the default, fork).

    In a Ray worker, fork shares the set's bytes with the loader processes (copy on write) instead of pickling
    them into each, and it is what Ray's own training loops do. A driver or test process is different: the
    native threads of a Ray driver it ran (gRPC event engine, timers, the GCS client) outlive `ray.shutdown`,
    and loader processes forked from such a process died in two CI runs ("DataLoader worker exited
    unexpectedly", "double free or corruption"), never in a Ray worker. A forkserver's children fork from a
    process that is started clean and stays single-threaded; the data set is pickled to them."""
    if in_ray_worker():
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


class ForkingLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes start as `loader_context` says; when they fork from this process,
    it has no garbage left to collect.

    Garbage cycles left in a forking parent are inherited; when the child's collector frees them, their
    destructors release handles that belong to the parent's threads (sockets, SSL and gRPC objects). So the
    parent collects before forking and freezes what is left, which the children's collectors then never visit
    (it also spares them copying every page an object header sits on)."""

    def __init__(self, dataset, **kwargs):
        if kwargs.get("num_workers", 0):
            kwargs.setdefault("multiprocessing_context", loader_context())
        super().__init__(dataset, **kwargs)

    def _get_iterator(self):
        if self.num_workers == 0 or self.multiprocessing_context is not None:
            return super()._get_iterator()
        gc.collect()
        gc.freeze()
        try:
            return super()._get_iterator()  # forks the workers
        finally:
            gc.unfreeze()


def stream(dataset, batch_size: int, *, num_workers: int = 0,
           device: torch.device | str = "cpu") -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset` in order: `num_workers` processes read, decode and resize batches in
    parallel (a data set with `__getitems__` reads a batch at once), pinned for the copy to a GPU. At most
    num_workers x 2 batches are in flight, whatever the data set's size."""
    return ForkingLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                         pin_memory=torch.device(device).type == "cuda",
                         worker_init_fn=loader_worker_init if num_workers else None)


class ImageSource:
    """N images of one size; `normalization` (mean/std, see prism_ray.data.Normalization) maps their uint8
    pixels to what networks read, None when the images already are network input (float tensors)."""

    normalization = None
    shape: tuple[int, int, int, int]  # (N, C, H, W)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes this holding keeps in memory for the images."""
        raise NotImplementedError

    def batches(self, order: torch.Tensor, ranges: Ranges, device: torch.device | str) -> Iterator[torch.Tensor]:
        """For each (start, stop) in `ranges`, the images order[start:stop] as one (B, C, H, W) tensor on `device`."""
        raise NotImplementedError

    def to_network(self, pixels: torch.Tensor) -> torch.Tensor:
        """A batch from `batches` as float network input: uint8 pixels -> (x / 255 - mean) / std."""
        if self.normalization is None:
            return pixels if pixels.is_floating_point() else pixels.float()
        # the same operations, in the same order, as decoding a file to a normalized tensor did before
        return self.normalization.normalize(pixels.float().div_(255.0))


class TensorImages(ImageSource):
    """A (N, C, H, W) tensor, or a sequence whose [i] is image i as a (C, H, W) tensor, held as given."""

    def __init__(self, images, normalization=None):
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
            self.shape = tuple(images.shape)
        else:
            if len(images) == 0:
                raise ValueError("no images")
            self.shape = (len(images), *images[0].shape)
        first = images[0]
        if first.dtype == torch.uint8 and normalization is None:
            raise ValueError("uint8 images need their normalization (mean/std) to become network input")
        self.images, self.normalization = images, normalization

    @property
    def nbytes(self) -> int:
        if isinstance(self.images, torch.Tensor):
            return self.images.numel() * self.images.element_size()
        return sum(t.numel() * t.element_size() for t in self.images)

    @property
    def device(self) -> torch.device:
        return self.images.device if isinstance(self.images, torch.Tensor) else self.images[0].device

    def batches(self, order: torch.Tensor, ranges: Ranges, device: torch.device | str) -> Iterator[torch.Tensor]:
        device = torch.device(device)
        if isinstance(self.images, torch.Tensor):
            order = order.to(self.images.device)  # once per call: no host -> device copy per batch
            for s, e in ranges:
                yield self.images.index_select(0, order[s:e]).to(device, non_blocking=True)
        else:
            order = order.tolist()
            for s, e in ranges:
                yield torch.stack([self.images[i] for i in order[s:e]]).to(device, non_blocking=True)


class ResidentImages(TensorImages):
    """A set decoded once into uint8 (N, C, H, W), on the device it was allocated on (the GPU on GPU workers)."""

    def __init__(self, pixels: torch.Tensor, normalization):
        if pixels.dtype != torch.uint8:
            raise ValueError(f"resident images are uint8, got {pixels.dtype}")
        super().__init__(pixels, normalization)

    @property
    def pixels(self) -> torch.Tensor:
        return self.images


def decode_into(data, out: torch.Tensor) -> None:
    """Decode one encoded image (bytes or a uint8 buffer) into `out`, a uint8 (C, H, W) view, C in {1, 3}.

    Pillow's L/RGB conversion, as `encode.decode_pixels`; raises ValueError when the size differs from `out`.
    """
    c, h, w = out.shape
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
    if arr.shape[:2] != (h, w):
        raise ValueError(f"image is {arr.shape[1]}x{arr.shape[0]} px, the set's images are {w}x{h}")
    with warnings.catch_warnings():  # Pillow's array is read-only; it is only read, into `out`
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    out.copy_(t[None] if t.dim() == 2 else t.permute(2, 0, 1))


class _DecodeBatches(torch.utils.data.Dataset):
    """Item k = the images of batch k, decoded into one uint8 tensor (what a DataLoader worker does)."""

    def __init__(self, source: "EncodedImages", index_batches: list[np.ndarray]):
        self.source, self.index_batches = source, index_batches

    def __len__(self) -> int:
        return len(self.index_batches)

    def __getitem__(self, k: int) -> torch.Tensor:
        idx = self.index_batches[k]
        _, c, h, w = self.source.shape
        out = torch.empty((len(idx), c, h, w), dtype=torch.uint8)
        for j, i in enumerate(idx):
            decode_into(self.source.blob(int(i)), out[j])
        return out


class EncodedImages(ImageSource):
    """A set held as its encoded files in one byte buffer; batches are decoded by `num_workers` DataLoader
    worker processes (0: in this process), pinned for the copy when the device is a GPU."""

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray, image_shape: tuple[int, int, int], normalization,
                 num_workers: int = 0, prefetch_factor: int = 2):
        if offsets.ndim != 1 or len(offsets) < 2 or offsets[-1] != len(buffer):
            raise ValueError("offsets must run from 0 to the buffer's length, one more than the images")
        # one numpy buffer, not a list of bytes objects: forked decoders share it without copying pages
        self.buffer, self.offsets = buffer, offsets.astype(np.int64)
        self.shape = (len(offsets) - 1, *image_shape)
        self.normalization, self.num_workers, self.prefetch_factor = normalization, num_workers, prefetch_factor

    @classmethod
    def from_blobs(cls, blobs: Sequence[bytes], image_shape: tuple[int, int, int], normalization,
                   num_workers: int = 0) -> "EncodedImages":
        sizes = np.array([len(b) for b in blobs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        buffer = np.empty(int(offsets[-1]), dtype=np.uint8)
        for i, b in enumerate(blobs):
            buffer[offsets[i]:offsets[i + 1]] = np.frombuffer(b, dtype=np.uint8)
        return cls(buffer, offsets, image_shape, normalization, num_workers)

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes + self.offsets.nbytes)

    def blob(self, i: int) -> memoryview:
        return memoryview(self.buffer[self.offsets[i]:self.offsets[i + 1]])

    def batches(self, order: torch.Tensor, ranges: Ranges, device: torch.device | str) -> Iterator[torch.Tensor]:
        device = torch.device(device)
        order = order.cpu().numpy()
        data = _DecodeBatches(self, [order[s:e] for s, e in ranges])
        workers = min(self.num_workers, len(data))
        loader = ForkingLoader(
            data, batch_size=None, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
            prefetch_factor=self.prefetch_factor if workers else None,
            worker_init_fn=loader_worker_init if workers else None)
        for batch in loader:
            yield batch.to(device, non_blocking=True)


def as_source(images) -> ImageSource:
    """`images` as an ImageSource: sources pass through; tensors and sequences of tensors are wrapped."""
    return images if isinstance(images, ImageSource) else TensorImages(images)
