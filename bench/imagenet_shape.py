"""A synthetic ImageNet-shaped data set: class folders of JPEGs of varied sizes and content, at any fsspec URI.

It is the shape that matters for memory, requests and time per unit, not the pictures: 1000 classes with
ImageNet-like folder names, JPEGs of 300-500 px on each side (ImageNet's are mostly 500 x 375 or 375 x
500), a mix of aspect ratios, about 1 % greyscale files (ImageNet has some), and content that varies within
and between classes (a class colour scheme, random gradients, shapes and noise), so that JPEG sizes and
decode costs are realistic and no two images are alike.

    python bench/imagenet_shape.py OUT_URI --classes 1000 --train 52 --val 10
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prism_ray.config import StorageConfig  # noqa: E402
from prism_ray.storage import filesystem  # noqa: E402


def class_folder(c: int) -> str:
    return f"n{c:08d}"  # WordNet-id-like, as ImageNet's folders


def synth_jpeg(c: int, k: int, split: str, size_range: tuple[int, int], quality: int) -> bytes:
    """Image k of class c: deterministic in (c, k, split)."""
    rng = np.random.default_rng([c, k, 0 if split == "train" else 1])
    lo, hi = size_range
    w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    base = np.array([(c * 67) % 256, (c * 131 + 80) % 256, (c * 29 + 160) % 256], dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)[..., None]
    img = base + 90 * ramp * rng.uniform(-1, 1, size=3) + rng.normal(0, 6, size=(h, w, 3))
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(10, w // 2), y0 + rng.integers(10, h // 2)
        colour = tuple(int(v) for v in np.clip(base + rng.normal(0, 70, 3), 0, 255))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    if rng.random() < 0.01:
        im = im.convert("L")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _class_files(args) -> list[tuple[str, bytes]]:
    c, split, count, size_range, quality = args
    folder = class_folder(c)
    return [(f"{split}/{folder}/{folder}_{k:05d}.JPEG", synth_jpeg(c, k, split, size_range, quality))
            for k in range(count)]


def generate(out_uri: str, classes: int, per_split: dict[str, int], size_range=(300, 500), quality: int = 75,
             storage: StorageConfig | None = None, processes: int = 2, quiet: bool = False) -> dict:
    """Write `out_uri`/{train,val}/<class>/<image>.JPEG; returns counts, bytes and seconds."""
    fs, base = filesystem(out_uri, storage)
    t0 = time.perf_counter()
    files = total = 0
    jobs = [(c, split, n, size_range, quality) for split, n in per_split.items() for c in range(classes)]
    with ProcessPoolExecutor(processes) as pool:
        batch: dict[str, bytes] = {}
        for i, rows in enumerate(pool.map(_class_files, jobs, chunksize=8)):
            for rel, data in rows:
                batch[f"{base}/{rel}"] = data
                total += len(data)
            files += len(rows)
            if len(batch) >= 512 or i == len(jobs) - 1:
                if fs.protocol == "file" or "file" in fs.protocol:
                    for path, data in batch.items():
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                        with open(path, "wb") as f:
                            f.write(data)
                else:
                    fs.pipe(batch)  # s3fs uploads a dict of objects concurrently
                batch = {}
            if not quiet and (i + 1) % 200 == 0:
                print(f"  {files:,} images, {total / 1e6:.0f} MB, {time.perf_counter() - t0:.0f} s", flush=True)
    return {"classes": classes, "files": files, "bytes": total, "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="where to write train/ and val/ (a folder or s3://bucket/prefix)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--train", type=int, default=52, help="training images per class")
    p.add_argument("--val", type=int, default=10, help="validation images per class")
    p.add_argument("--min-size", type=int, default=300)
    p.add_argument("--max-size", type=int, default=500)
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    a = p.parse_args()
    fig = generate(a.out, a.classes, {"train": a.train, "val": a.val}, (a.min_size, a.max_size),
                   storage=StorageConfig(endpoint_url=a.endpoint_url))
    print(f"{fig['files']:,} images, {fig['bytes'] / 1e9:.2f} GB in {fig['seconds']:.0f} s")


if __name__ == "__main__":
    main()
