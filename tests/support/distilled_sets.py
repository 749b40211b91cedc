"""Distilled sets as other projects write them, for the import tests: real image files on disk."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(seed: int, size: int = 32, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A random image (noise with a per-seed mean, so classes differ) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    arr = np.clip(rng.normal(40 + 17 * (seed % 11), 50, shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format=fmt)
    return buf.getvalue()


def write_sre2l_tree(root: Path, classes: int, ipc: int, size: int = 32, mode: str = "RGB") -> Path:
    """SRe2L's and PRISM's recover output: <root>/new{class:03d}/class{class:03d}_id{ipc:03d}.jpg (their
    save_images), RGB JPEGs of the teacher's resolution."""
    for c in range(classes):
        folder = root / f"new{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(ipc):
            (folder / f"class{c:03d}_id{k:03d}.jpg").write_bytes(image_bytes(1000 * c + k, size, mode))
    return root
