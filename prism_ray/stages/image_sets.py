"""Reading a committed image set (a recover output or the random-real baseline) back for relabel/evaluate.

The set's order, which soft labels and label plans index into, is (class id, ipc index): stable whatever
order the shards were committed in.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from prism_ray.algo.encode import decode_image
from prism_ray.config import Config
from prism_ray.data.base import Normalization
from prism_ray.stages.base import StageError
from prism_ray.stages.recover import recover_prefix
from prism_ray.stages.squeeze import data_fingerprint
from prism_ray.storage import COMBINED, Storage, sha256


@dataclass
class ImageSet:
    name: str
    images: torch.Tensor  # (N, C, H, W) normalized, as teachers and students read them
    labels: torch.Tensor  # (N,) int64 class ids
    paths: list[str]


def load_image_set(storage: Storage, set_name: str, normalization: Normalization, channels: int) -> ImageSet:
    """Every image the set's combined manifest lists, checksum-verified, in (class, ipc) order."""
    prefix = recover_prefix(set_name)
    try:
        table = storage.read_table(f"{prefix}/{COMBINED}")
    except FileNotFoundError:
        raise StageError(f"image set {set_name!r} is not complete ({storage.uri(prefix)} has no {COMBINED}); "
                         f"run the recover stage first") from None
    rows = sorted(table.select(["class_id", "ipc_index", "path", "sha256"]).to_pylist(),
                  key=lambda r: (r["class_id"], r["ipc_index"]))
    blobs = storage.fs.cat([storage.path(f"{prefix}/{r['path']}") for r in rows]) if rows else {}
    images = []
    for r in rows:
        data = blobs[storage.path(f"{prefix}/{r['path']}")]
        if sha256(data) != r["sha256"]:
            raise StageError(f"{storage.uri(prefix)}/{r['path']}: checksum differs from its manifest; "
                             f"the set was modified after it was committed")
        images.append(decode_image(data, normalization, channels))
    return ImageSet(set_name, torch.stack(images), torch.tensor([r["class_id"] for r in rows]),
                    [r["path"] for r in rows])


class ImageSetCache:
    """A worker's image sets, each read from storage once."""

    def __init__(self, storage: Storage, normalization: Normalization, channels: int):
        self.storage, self.normalization, self.channels = storage, normalization, channels
        self._sets: dict[str, ImageSet] = {}

    def get(self, set_name: str) -> ImageSet:
        if set_name not in self._sets:
            self._sets[set_name] = load_image_set(self.storage, set_name, self.normalization, self.channels)
        return self._sets[set_name]


def set_inputs(cfg: Config) -> dict[str, str]:
    """The combined manifests of every set a relabel or evaluate stage reads, with what to do if one is missing."""
    return {f"{recover_prefix(s)}/{COMBINED}": f"image set {s!r} is not complete; run the recover stage first "
                                               f"(prism-ray recover CONFIG)" for s in cfg.sets()}


def sets_fingerprint(cfg: Config) -> dict:
    """What determines the image sets that relabel and evaluate read."""
    used = {n for rc in cfg.recover_methods().values() for n in (rc.primary, *rc.bn_pool, *rc.fixed)}
    return {"seed": cfg.run.seed, "data": data_fingerprint(cfg),
            "teachers": [dataclasses.asdict(t) for t in cfg.teachers.models if t.name in used],
            "squeeze": dataclasses.asdict(cfg.squeeze),
            "recover": {name: dataclasses.asdict(rc) for name, rc in cfg.recover_methods().items()},
            "random_real": cfg.baselines.random_real}
