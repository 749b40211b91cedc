"""What the drivers on a cluster ask of Ray's autoscaler (`request_resources`), kept from outliving them.

`request_resources` is one request per cluster, and it stays until it is replaced: a driver that ends without
withdrawing it (SIGKILL after `ray job stop`'s grace period, out of memory, a second Ctrl-C) would keep nodes
up, and two runs on one cluster would overwrite each other's. So each driver records its own request in the
cluster's key-value store under its job id, and what is asked of the autoscaler is the sum of the requests of
the drivers still alive (Ray marks a job dead when its driver goes, however it goes). Every change rewrites
that sum, a driver rewrites it when it connects (dropping the requests of drivers that died), and
`prism-ray release` withdraws everything.
"""
from __future__ import annotations

import json
from typing import Optional

NAMESPACE = "prism_ray_autoscaler_requests"


def _kv():
    from ray.experimental import internal_kv  # the GCS key-value store every driver of a cluster shares
    return internal_kv


def _live_jobs() -> Optional[set[str]]:
    """Ids of the jobs whose driver is alive, or None where Ray cannot say."""
    try:
        from ray._private.state import jobs  # the GCS job table (no public equivalent for drivers yet)
        return {j["JobID"] for j in jobs() if not j.get("IsDead")}
    except Exception:  # noqa: BLE001
        return None


def _push() -> list[dict]:
    """Ask the autoscaler for the sum of the live drivers' requests, forgetting those of dead drivers."""
    kv = _kv()
    live = _live_jobs()
    total: list[dict] = []
    for key in kv._internal_kv_list("", namespace=NAMESPACE):
        job = key.decode()
        if live is not None and job not in live:
            kv._internal_kv_del(key, namespace=NAMESPACE)
            continue
        total += json.loads(kv._internal_kv_get(key, namespace=NAMESPACE) or b"[]")
    _ask(total)
    return total


def request(bundles: list[dict]) -> list[dict]:
    """This driver now wants room for `bundles` (none: it withdraws its request). Returns what the cluster is
    asked for, every live driver's requests together."""
    import ray

    key = ray.get_runtime_context().get_job_id()
    kv = _kv()
    if bundles:
        kv._internal_kv_put(key, json.dumps(bundles), overwrite=True, namespace=NAMESPACE)
    else:
        kv._internal_kv_del(key, namespace=NAMESPACE)
    return _push()


def reconcile() -> list[dict]:
    """At a driver's start: withdraw what drivers that have died still ask for."""
    return _push()


def release() -> int:
    """Withdraw every driver's request (`prism-ray release`); returns how many there were."""
    kv = _kv()
    keys = kv._internal_kv_list("", namespace=NAMESPACE)
    for key in keys:
        kv._internal_kv_del(key, namespace=NAMESPACE)
    _ask([])
    return len(keys)


def _ask(bundles: list[dict]) -> None:
    """request_resources on the cluster this process is connected to now. Ray remembers, once per process,
    whether "the" cluster runs autoscaler v1 or v2 and picks where to write the request by it; a process that
    has been connected to another cluster before (a notebook, a test session) would write to the wrong place
    and the autoscaler would never see the request. So ask the connected cluster first."""
    from ray.autoscaler.sdk import request_resources
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    is_autoscaler_v2(fetch_from_server=True)
    request_resources(bundles=bundles)
