"""Image sets as relabel and evaluate hold them: uint8, one set at a time, resident or encoded, verified."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from prism_ray.algo.encode import encode_pixels
from prism_ray.data.base import Normalization
from prism_ray.stages.base import StageError
from prism_ray.stages.image_sets import ImageSetCache, choose_holding, load_image_set
from prism_ray.stages.recover import recover_prefix
from prism_ray.storage import ShardStore, Storage, begin_stage

GiB = 1 << 30
NORM = Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def pixels(n: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def commit_set(storage: Storage, name: str, images: torch.Tensor, classes: int, fmt: str = "png") -> None:
    """Images as recover commits them (class c, ipc k), in two shards committed in reverse order."""
    store = begin_stage(storage, recover_prefix(name))
    items = [(i % classes, i // classes, img) for i, img in enumerate(images)]
    half = len(items) // 2
    for shard, part in (("s1", items[half:]), ("s0", items[:half])):
        ext = "png" if fmt == "png" else "jpg"
        store.commit(shard, [(f"images/{c}/{c}_ipc{k}.{ext}", encode_pixels(img, fmt)) for c, k, img in part],
                     [{"class_id": c, "ipc_index": k} for c, k, _ in part])
    store.write_combined()


def test_the_holding_rule():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    set_in1k = 50_000 * 3 * 224 * 224  # 7.5 GB
    assert choose_holding(set_in1k, cuda, gpu_free=15 * GiB, gpu_total=16 * GiB, host_available=12 * GiB)[0] == "device"
    assert choose_holding(set_in1k, cuda, gpu_free=70 * GiB, gpu_total=80 * GiB, host_available=0)[0] == "device"
    # reserve: max(2 GiB, a quarter of the GPU) stays free for the networks
    holding, reason = choose_holding(set_in1k, cuda, gpu_free=9 * GiB, gpu_total=12 * GiB, host_available=20 * GiB)
    assert holding == "host" and "reserve" in reason
    assert choose_holding(set_in1k, cuda, gpu_free=9 * GiB, gpu_total=12 * GiB, host_available=12 * GiB)[0] == "encoded"
    assert choose_holding(set_in1k, cpu, host_available=16 * GiB)[0] == "host"
    holding, reason = choose_holding(set_in1k, cpu, host_available=14 * GiB)
    assert holding == "encoded" and "does not fit in host memory" in reason


def test_a_set_is_held_as_uint8_in_class_then_ipc_order(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    images = pixels(10)
    commit_set(storage, "prism", images, classes=5)
    s = load_image_set(storage, "prism", NORM, 3, holding="host")
    assert s.holding == "host" and len(s) == 10 and s.decoded_bytes == 10 * 3 * 12 * 12
    held = s.images.pixels
    assert held.dtype == torch.uint8 and held.shape == (10, 3, 12, 12)
    assert s.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [p.split(".")[0] for p in s.paths[:3]] == ["images/0/0_ipc0", "images/0/0_ipc1", "images/1/1_ipc0"]
    want = torch.stack([images[k * 5 + c] for c in range(5) for k in range(2)])
    assert torch.equal(held, want)  # PNG is lossless: the committed pixels, byte for byte
    # network input is the old decode's (x / 255 - mean) / std
    batch = next(s.images.batches(torch.arange(10), [(0, 10)], "cpu"))
    assert torch.equal(s.images.to_network(batch), NORM.normalize(want.float().div(255.0)))


def test_encoded_holding_gives_the_same_batches(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    commit_set(storage, "prism", pixels(24, size=16, seed=1), classes=4, fmt="jpeg")
    host = load_image_set(storage, "prism", NORM, 3, holding="host")
    enc = load_image_set(storage, "prism", NORM, 3, holding="encoded", loader_workers=2)
    files = ShardStore(storage, f"{recover_prefix('prism')}").read_combined().column("bytes").to_pylist()
    assert enc.holding == "encoded" and enc.images.buffer.nbytes == sum(files)  # the files' bytes, nothing more
    order = torch.randperm(24, generator=torch.Generator().manual_seed(3))
    ranges = [(0, 10), (10, 20), (20, 24)]
    for a, b in zip(enc.images.batches(order, ranges, "cpu"), host.images.batches(order, ranges, "cpu")):
        assert torch.equal(a, b)
    auto = load_image_set(storage, "prism", NORM, 3, holding="auto")
    assert auto.holding == "host" and "fits in host memory" in auto.reason  # a few KB on this machine


def test_a_worker_holds_one_set_at_a_time(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    commit_set(storage, "prism", pixels(8, seed=2), classes=4)
    commit_set(storage, "random_real", pixels(8, seed=3), classes=4)
    cache = ImageSetCache(storage, NORM, 3, quiet=True)
    first = cache.get("prism")
    assert cache.get("prism") is first  # the same unit's set is not read again
    held = weakref.ref(first.images.pixels)
    del first
    second = cache.get("random_real")
    gc.collect()
    assert held() is None, "the previous set is still in memory"
    assert cache.current is second and second.name == "random_real"


def test_bad_sets_fail_with_the_file_named(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    with pytest.raises(StageError, match="run the recover stage first"):
        load_image_set(storage, "prism", NORM, 3)
    commit_set(storage, "prism", pixels(6), classes=3)
    store = ShardStore(storage, recover_prefix("prism"))
    (row,) = [r for r in store.read_combined().to_pylist() if r["path"].startswith("images/1/1_ipc0.")]
    storage.write_bytes(store.key(row["path"]), encode_pixels(pixels(1, seed=9)[0], "png"))
    with pytest.raises(StageError, match=r"1_ipc0\.\w+\.png: checksum differs"):
        load_image_set(storage, "prism", NORM, 3)
    store = begin_stage(storage, recover_prefix("odd"))
    store.commit("s0", [("images/0/0_ipc0.png", encode_pixels(pixels(1)[0], "png")),
                        ("images/0/0_ipc1.png", encode_pixels(pixels(1, size=10)[0], "png"))],
                 [{"class_id": 0, "ipc_index": 0}, {"class_id": 0, "ipc_index": 1}])
    store.write_combined()
    for holding in ("host", "encoded"):
        with pytest.raises(StageError, match=r"0_ipc1\.\w+\.png: cannot be used as a set image \(image is 10x10 px, "
                                             r"the set's images are 12x12\)"):
            load_image_set(storage, "odd", NORM, 3, holding=holding)
