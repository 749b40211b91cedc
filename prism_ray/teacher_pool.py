"""Loading the teachers a config names, from wherever their weights live (run storage, a URI, torchvision).

Workers call `load_pool` once when they start and keep the models for every unit they run.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable

import torch
from torch import nn

from prism_ray.algo.seeding import derive_seed
from prism_ray.algo.teachers import ModelShape, TeacherError, build_model, freeze, load_checkpoint, load_torchvision
from prism_ray.config import Config, TeacherSpec
from prism_ray.storage import Storage, filesystem, translate_errors

SQUEEZE_PREFIX = "squeeze"
RUN_WEIGHTS = "run:"  # weights "run:<RUN_URI>": the teacher of the same name squeezed by another prism-ray run


def checkpoint_path(name: str) -> str:
    """Where squeeze writes teacher `name`'s checkpoint inside its generation (the key adds the attempt's id)."""
    return f"teachers/{name}.pt"


def squeeze_upstream(cfg: Config, names: Iterable[str]) -> list[str]:
    """['squeeze'] when one of the teachers `names` is trained by this run's squeeze stage."""
    return [SQUEEZE_PREFIX] if any(cfg.teacher(n).weights == "squeeze" for n in names) else []


def squeezed_checkpoint(storage: Storage, name: str, expected: dict | None = None) -> bytes:
    """Teacher `name`'s checkpoint from the squeeze stage of the run at `storage`, checked against its manifest
    (and, with `expected`, from the squeeze outputs the stage was bound to)."""
    from prism_ray.stages.base import StageError, read_upstream

    try:
        store, table = read_upstream(storage, SQUEEZE_PREFIX, expected)
    except StageError:
        raise TeacherError(f"teacher {name!r}: {storage.uri(SQUEEZE_PREFIX)} has no complete squeeze stage; run "
                           f"the squeeze stage first (prism-ray squeeze CONFIG)") from None
    rows = [r for r in table.to_pylist() if r["shard_id"] == name]
    if not rows:
        raise TeacherError(f"teacher {name!r}: the squeeze stage at {storage.uri(SQUEEZE_PREFIX)} did not train it; "
                           f"run the squeeze stage for this config (prism-ray squeeze CONFIG)")
    return store.read_output(rows[0])


def model_shape(cfg: Config, num_classes: int) -> ModelShape:
    return ModelShape(num_classes, cfg.data.channels, cfg.data.resolution)


def _read_uri(uri: str, cfg: Config) -> bytes:
    cache_dir = cfg.teachers.cache_dir
    cached = None
    if cache_dir:  # node-local copy: a cluster reads each checkpoint from storage once per node
        cached = os.path.join(os.path.expanduser(cache_dir), hashlib.sha256(uri.encode()).hexdigest()[:24] + ".pt")
        if os.path.exists(cached):
            with open(cached, "rb") as f:
                return f.read()
    fs, path = filesystem(uri, cfg.storage)
    with translate_errors("cannot read checkpoint", uri):
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise TeacherError(f"checkpoint {uri} not found") from None
    if cached:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, cached)
    return data


def load_teacher(spec: TeacherSpec, shape: ModelShape, cfg: Config, storage: Storage,
                 expected: dict | None = None) -> nn.Module:
    """The model of `spec` with its weights, on the CPU, in train/eval mode as built (not frozen). expected: the
    identity of this run's squeeze outputs its stage was bound to (`Stage.bind`), for squeezed teachers."""
    w = spec.weights
    where = f"teacher {spec.name!r} ({spec.arch})"
    if w == "squeeze":
        data = squeezed_checkpoint(storage, spec.name, expected)
        return load_checkpoint(data, spec.arch, shape, source=f"{where} {storage.uri(SQUEEZE_PREFIX)}")
    if w.startswith(RUN_WEIGHTS):
        other = Storage(w[len(RUN_WEIGHTS):], cfg.storage)
        data = squeezed_checkpoint(other, spec.name)
        return load_checkpoint(data, spec.arch, shape, source=f"{where} {other.uri(SQUEEZE_PREFIX)}")
    if w == "random":  # seeded by name: every worker must hold the same "random" teacher
        return build_model(spec.arch, shape, seed=derive_seed(cfg.run.seed, "random-teacher", spec.name))
    if w.startswith("torchvision:"):
        if cfg.teachers.cache_dir:
            os.environ["TORCH_HOME"] = os.path.expanduser(cfg.teachers.cache_dir)
        return load_torchvision(spec.arch, w.split(":", 1)[1], shape)
    return load_checkpoint(_read_uri(w, cfg), spec.arch, shape, source=f"{where} {w}")


def load_pool(names: Iterable[str], shape: ModelShape, cfg: Config, storage: Storage,
              device: torch.device, expected: dict | None = None) -> dict[str, nn.Module]:
    """Frozen teachers by name, on `device`, each loaded once. expected: the stage's bound upstream identities."""
    pool = {}
    squeezed = (expected or {}).get(SQUEEZE_PREFIX)
    for name in dict.fromkeys(names):
        model = load_teacher(cfg.teacher(name), shape, cfg, storage, squeezed)
        pool[name] = freeze(model).to(device)
    return pool


def best_device() -> torch.device:
    """CUDA when this process sees a GPU (Ray sets CUDA_VISIBLE_DEVICES per actor), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
