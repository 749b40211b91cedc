"""Shared fixtures: a real S3 endpoint (moto server on loopback), real Ray, small real configs."""
from __future__ import annotations

import os
import socket
import uuid

import pytest

# Fake credentials for the moto endpoint, set before any Ray process starts so workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "prism-ray-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "prism-ray-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Without this, ray.init(address="127.0.0.1:port") swaps 127.0.0.1 for the machine's interface address,
# where a loopback-bound test cluster does not listen (read by Ray at import: set before importing ray).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402

torch.set_num_threads(2)

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (its own process): the same HTTP API s3fs and boto3 speak to AWS."""
    from tests.support.moto_process import moto_server

    with moto_server() as url:
        yield url


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket; returns its name."""
    import boto3

    name = f"prism-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance on loopback for one test module."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=4, include_dashboard=False,
             namespace="prism-ray", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def kept_workers(ray_local):
    """Workers one pipeline run of the module leaves for the next (`pipeline.execute(..., idle=)`), as a sweep's
    points share theirs: a module that runs several pipelines starts its workers once (a toy run costs ~30 %
    less CPU). Ended before the module's Ray."""
    from prism_ray.orchestration.workers import IdleWorkers

    kept = IdleWorkers()
    yield kept
    kept.close()


@pytest.fixture
def runs_share_kept_workers(kept_workers, monkeypatch):
    """Every pipeline run of the test, the in-process CLI's too, takes and leaves its workers in the module's kept
    ones, as a sweep's points do: each run would otherwise start its own (~2.4 CPU-seconds a worker here)."""
    from prism_ray import pipeline

    execute = pipeline.execute
    monkeypatch.setattr(pipeline, "execute", lambda *args, **kw: execute(*args, **{"idle": kept_workers, **kw}))


def small_config(output: str, **sections):
    """A config for tests: Fashion-MNIST, few images, tiny teachers, local storage unless told."""
    from prism_ray.config_loader import config_from_dict

    raw = {
        "run": {"name": "test", "output": output, "seed": 0, "lease_seconds": 5},
        "data": {"dataset": "fashion_mnist", "root": FMNIST_ROOT, "max_per_class": 60, "max_val": 500},
        "teachers": {"models": [{"name": "convnet", "arch": "convnet", "weights": "squeeze"},
                                {"name": "shufflenet", "arch": "shufflenet_v2_x0_5", "weights": "squeeze"}]},
        "squeeze": {"epochs": 1, "batch_size": 64},
        "ray": {"workers": 2, "cpus_per_worker": 1},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return config_from_dict(raw)


# `make test` runs the suite in two processes (pytest-xdist, a whole module to one process). These modules take
# the longest (docs/benchmarks.md, "The demo and the test suite"); handed out first, the two processes end together
# instead of one running the rehearsal alone at the end. The rest keep their collection order.
LONGEST_FIRST = ("tests/test_rehearsal.py", "tests/orchestration/test_faults.py",
                 "tests/orchestration/test_elastic.py", "tests/test_bench_scripts.py",
                 "tests/orchestration/test_local_cluster.py", "tests/test_run_integrity.py", "tests/test_chaos.py",
                 "tests/test_bench_gpu.py", "tests/test_sweep.py", "tests/stages/test_import_export.py",
                 "tests/stages/test_growth.py", "tests/orchestration/test_autoscaling.py")


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest as collected


def pytest_configure(config):
    """Before any test process starts Ray: the token of Ray's token authentication, which the first local Ray
    writes to ~/.ray/auth_token when it is missing. Two test processes starting their first Ray together on a
    fresh machine would each write one, and a client reading the file could then hold the other's token."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    try:
        from ray._private.authentication import authentication_token_setup as auth
    except ImportError:  # another Ray: it has its own way, and a fresh machine's race is the only risk
        return
    if not auth._get_default_token_path().exists():
        auth.generate_and_save_token()  # what the first local ray.init would write, without turning auth on here


# The pytest process starts and stops Ray many times (every in-process `prism-ray run` and module fixture), forks
# DataLoader workers and holds s3fs's IO thread. One CI run printed every result and then died of SIGSEGV while
# the interpreter tore those native libraries down (restarting Ray in one process is known to leave such state
# behind: ray-project/ray#31145), which turned a finished session into a failed `make test`. Once the session's
# results are reported, the process exits with pytest's own status and skips that teardown.
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    session.config._prism_exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    status = getattr(config, "_prism_exit_status", None)
    if status is None or os.environ.get("PRISM_RAY_TEST_NORMAL_EXIT"):
        return
    import sys

    try:
        import ray
        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - the results are out; the status must still be returned
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
