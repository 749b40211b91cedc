"""What holding an ImageNet-sized data index costs a worker: 1,281,167 rows, 1000 classes.

Writes a synthetic ImageFolder index (ImageNet-style relative paths and sizes), then, in fresh processes,
measures the RSS a worker adds by reading it and building its reader (`build_dataset(..., index=...)`),
and, for comparison, holding the same paths as a Python list of strings (what the reader did before).

    .venv/bin/python bench/data_index_memory.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

ROWS, CLASSES = 1_281_167, 1000


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_index(folder: str) -> str:
    import numpy as np
    import pyarrow as pa

    from prism_ray.config import DataConfig
    from prism_ray.data.index import DataIndex, data_source, write_indexes

    rng = np.random.default_rng(0)
    wnids = [f"n{1440764 + 7919 * c:08d}" for c in range(CLASSES)]
    per_class = np.full(CLASSES, ROWS // CLASSES)
    per_class[: ROWS % CLASSES] += 1
    labels = np.repeat(np.arange(CLASSES, dtype=np.int32), per_class)
    paths = [f"{wnids[c]}/{wnids[c]}_{k}.JPEG" for c, n in enumerate(per_class) for k in range(n)]
    cfg = DataConfig(dataset="image_folder", train="s3://imagenet/train", channels=3, resolution=224)
    table = pa.table({"path": pa.array(paths, pa.string()), "class_id": pa.array(labels),
                      "bytes": pa.array(rng.integers(20_000, 250_000, ROWS))})
    write_indexes(folder, {"train": DataIndex("train", data_source(cfg), wnids, table)})
    return os.path.join(folder, "train-index.parquet")


def measure(kind: str, folder: str) -> None:
    import gc

    import pyarrow as pa  # noqa: F401 - imported before the baseline, as in a worker

    from prism_ray.config import DataConfig
    from prism_ray.data import build_dataset
    from prism_ray.data.index import read_index

    cfg = DataConfig(dataset="image_folder", train="s3://imagenet/train", channels=3, resolution=224)
    gc.collect()
    before = rss_mb()
    if kind == "reader":
        held = build_dataset(cfg, "train", index=folder)  # what a worker holds: the reader and its index arrays
        assert len(held) == ROWS
    else:
        held = read_index(folder, "train").table.column("path").to_pylist()  # the old reader's list of str
    gc.collect()
    print(f"{kind}: {rss_mb() - before:.0f} MB")


if __name__ == "__main__":
    if len(sys.argv) == 3:
        measure(sys.argv[1], sys.argv[2])
        sys.exit(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_index(tmp)
        print(f"index of {ROWS:,} rows: {os.path.getsize(path) / 2**20:.1f} MB on storage")
        for kind in ("reader", "python list of paths"):
            subprocess.run([sys.executable, __file__, kind, tmp], check=True)
