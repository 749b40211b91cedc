"""Loader workers fork from processes full of other people's objects (Ray, S3 clients, test servers): they
must never run the destructors of the parent's garbage, which release handles the parent's threads own. They
fork from this process only in a Ray worker; elsewhere they start from a forkserver."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from prism_ray.algo.image_source import loader_context, stream

REPO = Path(__file__).resolve().parents[2]


class _Cycle:
    """Garbage the collector must find (a reference cycle) whose finalizer records the process it ran in."""

    def __init__(self, log):
        self.log, self.me = log, self

    def __del__(self):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")


class _CollectingItems(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        gc.collect()  # what a worker's collector does sooner or later, as it allocates
        return torch.tensor(i)


def _finalizing_pids(log, make_loader) -> set[int]:
    gc.disable()  # the cycle must still be garbage when the workers fork
    try:
        _Cycle(log)
        assert [int(x) for b in make_loader() for x in b] == [0, 1, 2, 3]
    finally:
        gc.enable()
        gc.collect()
    return {int(line) for line in log.read_text().split()}


# In a fresh interpreter: forked from this test process, full of Ray's and the S3 server's threads, the plain
# loader's workers can crash on the very hazard shown (CI once saw one segfault there).
PLAIN_LOADER = """
import json, os, sys
from pathlib import Path
import torch
from tests.algo.test_forking_loader import _CollectingItems, _finalizing_pids
pids = _finalizing_pids(Path(sys.argv[1]), lambda: torch.utils.data.DataLoader(
    _CollectingItems(), batch_size=2, num_workers=2, multiprocessing_context="fork"))
print(json.dumps({"parent": os.getpid(), "finalized_in": sorted(pids)}))
"""


def test_a_plain_dataloader_finalizes_the_parents_garbage_in_its_workers(tmp_path):
    """The hazard: with a plain DataLoader the parent's garbage is finalized in the forked workers."""
    out = subprocess.run([sys.executable, "-c", PLAIN_LOADER, str(tmp_path / "plain")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    parent, pids = seen["parent"], set(seen["finalized_in"])
    assert parent in pids and len(pids - {parent}) >= 1


def test_stream_workers_never_finalize_the_parents_garbage(tmp_path):
    """Outside a Ray worker the loader's workers start from a forkserver."""
    pids = _finalizing_pids(tmp_path / "stream", lambda: stream(_CollectingItems(), 2, num_workers=2))
    assert pids == {os.getpid()}
    assert gc.get_freeze_count() == 0


def test_stream_workers_forked_from_a_ray_worker_never_finalize_its_garbage(ray_local, tmp_path):
    """In a Ray worker they fork from it: the real case, not this test process imitating one (forked from a
    process full of a Ray driver's native threads, CI saw a loader worker segfault; the product never forks
    there)."""
    @ray_local.remote
    def in_worker(path: str, log: str):
        import gc
        import importlib.util
        import os
        from pathlib import Path

        spec = importlib.util.spec_from_file_location("forking_loader_cases", path)  # this file, by path
        cases = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cases)
        assert cases.loader_context() is None  # fork
        pids = cases._finalizing_pids(Path(log), lambda: cases.stream(cases._CollectingItems(), 2, num_workers=2))
        return os.getpid(), pids, gc.get_freeze_count()

    worker, pids, frozen = ray_local.get(in_worker.remote(__file__, str(tmp_path / "stream")))
    assert pids == {worker} and worker != os.getpid()
    assert frozen == 0  # the worker's objects are collectable again once the loader's workers run


def test_loaders_fork_only_in_a_ray_worker(ray_local):
    assert loader_context().get_start_method() == "forkserver"  # a driver (this test process has run Ray)

    @ray_local.remote
    def in_worker():
        from prism_ray.algo.image_source import loader_context
        return loader_context()

    assert ray_local.get(in_worker.remote()) is None  # fork
