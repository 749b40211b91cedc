"""Joining or starting Ray for one driver invocation."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator, Optional

from prism_ray.config import RayConfig
from prism_ray.orchestration.ray_logs import divert_internal_logs
from prism_ray.stages.base import StageError

LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def ray_session(cfg: RayConfig, log_path: Optional[str] = None) -> Iterator[None]:
    """Use the Ray this process is already connected to, else start a local one or join `cfg.address`.

    A local instance binds to loopback only: it is for one machine, and must not open ports outward. While the
    session lasts, SIGTERM and SIGINT ask the dispatch loop to stop (see `stopping`). Workers' output reaches
    the terminal; Ray's own processes' log lines go to `log_path` instead (see `ray_logs`).
    """
    joins_env = cfg.address in (None, "") and bool(os.environ.get("RAY_ADDRESS"))  # inside `ray job submit`
    local = not joins_env and cfg.address in (None, "", "local")
    if local or (cfg.address and cfg.address.split("://")[-1].split(":")[0] in ("127.0.0.1", "localhost")):
        # a local instance too: without it Ray registers the node (and binds its agents) at the machine's
        # interface address, whatever _node_ip_address says
        _keep_loopback_addresses()
    import ray

    from prism_ray.orchestration import stopping

    if ray.is_initialized():
        with stopping.installed():
            yield
        return
    kwargs = dict(namespace=cfg.namespace, logging_level=logging.WARNING, log_to_driver=True)
    try:
        if joins_env:
            ray.init(**kwargs)  # inside `ray job submit` (or RAY_ADDRESS set): join that cluster
        elif local:
            ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=cfg.num_cpus, include_dashboard=False,
                     **kwargs)
        else:
            ray.init(address=cfg.address, **kwargs)
    except ConnectionError as e:
        raise StageError(f"cannot connect to Ray at ray.address={cfg.address!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - token and version problems surface as assorted types
        text = str(e)
        if "auth" in text.lower() and "token" in text.lower():
            raise StageError(f"Ray at {cfg.address!r} requires a token: set RAY_AUTH_MODE=token and the token "
                             f"(~/.ray/auth_token or RAY_AUTH_TOKEN) ({text})") from None
        raise
    divert_internal_logs(log_path)
    _forget_dead_requests()
    stopped = False
    try:
        with stopping.installed():  # after ray.init: it replaces Ray's handler, which dumps a stack on SIGTERM
            yield
    except stopping.Interrupted:
        stopped = True
        raise
    finally:
        if not stopped:  # when stopped, Ray's exit hook shuts down after the CLI's line: SIGKILL may be 3 s away
            ray.shutdown()


def _forget_dead_requests() -> None:
    """A run's start withdraws the autoscaler requests of drivers that died without withdrawing theirs."""
    from prism_ray.orchestration import autoscaler
    try:
        autoscaler.reconcile()
    except Exception as e:  # noqa: BLE001 - a hint to the autoscaler; the run goes on without it
        logging.getLogger(__name__).warning("could not update the autoscaler's requests: %s", e)


def _keep_loopback_addresses() -> None:
    """Connect to a loopback-bound cluster as given: by default Ray resolves 127.0.0.1 in an address to
    the machine's interface address, where such a cluster does not listen."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # already imported: the flag was read at import time
        constants.ENABLE_RAY_CLUSTER = False


def worker_threads(cpus: float) -> int:
    return max(1, int(cpus))


def set_torch_threads(cpus: float) -> None:
    import torch
    n = worker_threads(cpus)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    torch.set_num_threads(n)
