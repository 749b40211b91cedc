"""Validation and diversity streamed through DataLoader workers: the same numbers as the in-memory path, memory
that does not grow with the validation set, and S3-backed data read from forked loader workers."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from prism_ray.algo.diversity import class_diversity
from prism_ray.algo.encode import decode_image, encode_pixels
from prism_ray.algo.seeding import generator
from prism_ray.algo.teachers import ModelShape, build_model
from prism_ray.algo.train import evaluate_classifier, train_classifier
from prism_ray.config import DataConfig, StorageConfig
from prism_ray.data import build_dataset
from prism_ray.stages.base import RunContext, Unit
from prism_ray.stages.evaluate import REAL, REAL_PER_CLASS, DiversityStage
from prism_ray.stages.recover import recover_prefix
from prism_ray.storage import Storage, begin_stage
from tests.conftest import FMNIST_ROOT
from tests.orchestration.helpers import pipeline_config


@pytest.fixture(scope="module")
def fmnist_model():
    """A convnet trained briefly on 1,000 Fashion-MNIST images: well above chance, far from perfect."""
    train = build_dataset(DataConfig(root=FMNIST_ROOT, max_per_class=100), "train")
    model = build_model("convnet", ModelShape(10, 1, 28), seed=0)
    train_classifier(model, train.tensors(), epochs=2, batch_size=50, lr=0.05, seed=0)
    return model.eval()


def test_fashion_mnist_scores_streamed_equal_the_in_memory_scores(fmnist_model):
    val = build_dataset(DataConfig(root=FMNIST_ROOT), "val", class_names=None, capped=False)
    in_memory = evaluate_classifier(fmnist_model, val.tensors(), batch_size=500)
    streamed = evaluate_classifier(fmnist_model, val, batch_size=500, num_workers=2)
    assert len(val) == 10_000 and in_memory["top1"] > 0.5
    assert streamed == in_memory  # exactly: the same batches reach the same model
    part = torch.utils.data.Subset(val, range(1234))  # data.max_val
    assert evaluate_classifier(fmnist_model, part, batch_size=500, num_workers=2) == evaluate_classifier(
        fmnist_model, val.tensors(list(range(1234))), batch_size=500)


def test_diversity_streamed_equals_the_in_memory_computation(tmp_path):
    """Real-data and set diversity from the worker (batches through DataLoader workers / from the uint8 set,
    per-class sums) against the previous code's stacked float tensors: equal to 1e-12."""
    cfg = pipeline_config(str(tmp_path / "run"))
    storage = Storage(cfg.run.output)
    train = build_dataset(cfg.data, "train")
    # a committed set as recover writes it, from real images (PNG: lossless)
    store = begin_stage(storage, recover_prefix("prism"))
    pixels = [(c, k, (train.pixels_at([c], k)[0] * 255).round().to(torch.uint8)) for c in range(4) for k in range(3)]
    store.commit("s0", [(f"images/{c}/{c}_ipc{k}.png", encode_pixels(p, "png")) for c, k, p in pixels],
                 [{"class_id": c, "ipc_index": k} for c, k, _ in pixels])
    store.write_combined()
    context = RunContext(train.num_classes, train.class_names, train.counts())
    worker = DiversityStage(cfg, storage, context).open_worker()

    def per_class(unit_id: str) -> dict[int, float]:
        blob, row = worker.compute(Unit(unit_id, {"set": unit_id}))
        assert row["peak_rss_bytes"] > 0
        return {r["class_id"]: r["mean_cosine"] for r in pq.read_table(io.BytesIO(blob)).to_pylist()}

    xs, ys = [], []  # the previous _real_sample: a stack of every pick, as float32
    for c in range(train.num_classes):
        picks = torch.randperm(train.count(c), generator=generator(cfg.run.seed, "diversity-real", c))
        xs += [train.image(c, k) for k in picks[:REAL_PER_CLASS].tolist()]
        ys += [c] * min(REAL_PER_CLASS, train.count(c))
    want = class_diversity(worker.model, torch.stack(xs), torch.tensor(ys))
    got = per_class(REAL)
    assert list(got) == list(want) == [0, 1, 2, 3]
    for c in want:
        assert got[c] == pytest.approx(want[c], abs=1e-12)

    files = {(r["class_id"], r["ipc_index"]): store.read_output(r) for r in store.read_all().to_pylist()}
    stacked = torch.stack([decode_image(files[(c, k)], train.normalization, 1)
                           for c in range(4) for k in range(3)])  # the previous load_image_set
    want = class_diversity(worker.model, stacked, torch.arange(4).repeat_interleave(3))
    got = per_class("prism")
    for c in want:
        assert got[c] == pytest.approx(want[c], abs=1e-12)
    # the real-data reference streams without the last set held under it (the rehearsal's 10 GB worker)
    assert worker.sets.current is not None and worker.sets.current.name == "prism"
    assert list(per_class(REAL)) == [0, 1, 2, 3]
    assert worker.sets.current is None


def write_folder(fs_put, root: str, n: int, size: int, classes: int = 10) -> None:
    """An ImageFolder of n JPEGs (smooth random pictures), classes round-robin."""
    g = torch.Generator().manual_seed(n)
    for i in range(n):
        x = torch.rand(3, 8, 8, generator=g)
        x = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        arr = (x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=85)
        fs_put(f"{root}/c{i % classes:02d}/img{i:05d}.jpg", buf.getvalue())


def test_validation_on_s3_streams_from_forked_loader_workers(s3_endpoint, s3_bucket):
    """An S3 filesystem refuses to work in a forked process; the loader workers reopen the data set."""
    import s3fs
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    write_folder(fs.pipe_file, f"{s3_bucket}/val", 40, 32, classes=4)
    cfg = DataConfig(dataset="image_folder", train=f"s3://{s3_bucket}/val", val=f"s3://{s3_bucket}/val", channels=3,
                     resolution=24)
    val = build_dataset(cfg, "val", StorageConfig(endpoint_url=s3_endpoint))
    model = build_model("convnet", ModelShape(4, 3, 24), seed=0).eval()
    with torch.no_grad():
        x, y = val.tensors()
        want = evaluate_classifier(model, (x, y), batch_size=16)
    assert evaluate_classifier(model, val, batch_size=16, num_workers=2) == want


MEASURE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from prism_ray.algo.train import evaluate_classifier
    from prism_ray.config import DataConfig
    from prism_ray.data import build_dataset
    root, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    cfg = DataConfig(dataset="image_folder", train=root, val=root, channels=3, resolution=160)
    val = build_dataset(cfg, "val")
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 10))
    data = val if mode == "streamed" else val.tensors()
    acc = evaluate_classifier(model, data, batch_size=50, num_workers=2 if mode == "streamed" else 0)
    hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"images": len(val), "peak": hwm, "loader_peak": children, "top1": acc["top1"]}))
""")


@pytest.mark.slow
def test_validation_memory_does_not_grow_with_the_validation_set(tmp_path):
    """Peak RSS of a fresh scoring process (VmHWM) and of its loader workers, 1x vs 8x the images at 160 px.
    In memory, 8x adds ~320 MB of float32; streamed, the peak stays within 32 MB."""
    def put(path, data):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    for n, name in ((150, "x1"), (1200, "x8")):
        write_folder(lambda p, d: put(tmp_path / p, d), name, n, 160)

    def measure(name: str, mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / name), mode], capture_output=True,
                             text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    small, large = measure("x1", "streamed"), measure("x8", "streamed")
    assert (small["images"], large["images"]) == (150, 1200)
    assert large["peak"] - small["peak"] < 32 << 20, (small, large)
    assert large["loader_peak"] - small["loader_peak"] < 32 << 20, (small, large)
    in_memory = measure("x8", "in_memory")  # the measure sees growth where there is some
    assert in_memory["peak"] - large["peak"] > 250 << 20, (in_memory, large)
