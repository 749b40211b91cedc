"""Ray's own log lines (GCS, raylets) stay out of the user's terminal and go to the run's log file, while the
workers' output and a FATAL record still reach it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from prism_ray.orchestration.ray_logs import InternalLogFilter, matters, run_log_path

# what `evaluate --fresh` printed at its end (Ray 2.60 tidying up actors during shutdown)
NOISE = ("[2026-12-07 01:22:02,535 E 2900 2900] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor "
         "b566ddb469f5bb7833d6448501000000, return status: Invalid: KillActor RPC failed for actor "
         "b566ddb469f5bb7833d6448501000000: RpcError: RPC error: Socket closed rpc_code: 14")
FATAL = "[2026-12-07 01:22:03,100 F 2900 2900] (gcs_server) gcs_server.cc:1: Check failed: fatal-marker"

DRIVER = textwrap.dedent("""
    import sys, threading, ray
    from prism_ray.config import RayConfig
    from prism_ray.orchestration.cluster import ray_session

    log_path, noise, fatal = sys.argv[1:]
    with ray_session(RayConfig(num_cpus=1), log_path=log_path):
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
        seen, arrived = [], threading.Event()

        def observe(data):  # runs after the driver's printer: once both markers passed, both were handled
            seen.extend(data.get("lines") or [])
            if any("worker-marker" in s for s in seen) and any("fatal-marker" in s for s in seen):
                arrived.set()

        global_worker_stdstream_dispatcher.add_handler("test-observer", observe)

        @ray.remote
        def speak():
            print("worker-marker", file=sys.stderr, flush=True)

        ray.get(speak.remote())
        # the GCS's error stream, as Ray's log monitor tails it: the same path a real GCS line takes
        with open(f"{ray._private.worker._global_node.get_logs_dir_path()}/gcs_server.err", "a") as f:
            f.write(noise + "\\n" + fatal + "\\n")
        assert arrived.wait(60), seen
""")


def test_internal_lines_go_to_the_log_file_not_the_terminal(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)  # no leftover token or config
    log = tmp_path / "run" / "logs" / "ray.log"
    out = subprocess.run([sys.executable, "-c", DRIVER, str(log), NOISE, FATAL], capture_output=True, text=True,
                         env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    terminal = out.stdout + out.stderr
    assert "Failed to kill actor" not in terminal
    assert "worker-marker" in terminal  # the workers' own output is the user's
    assert "fatal-marker" in terminal  # a FATAL record matters
    kept = log.read_text()
    assert NOISE in kept and FATAL in kept


def test_which_internal_lines_matter():
    assert not matters(NOISE)
    assert not matters("[2026-12-07 01:22:02,535 W 2900 2901] (raylet) node_manager.cc:1: a warning")
    assert matters(FATAL)
    assert matters("*** SIGSEGV received at time=1765070522 on cpu 1 ***")  # a crash's trace, not a record


def test_the_filter_passes_workers_through_and_splits_internal_lines(tmp_path):
    printed = []
    log = tmp_path / "ray.log"
    f = InternalLogFilter(printed.append, str(log))
    worker = {"pid": 123, "lines": ["hello"], "is_err": True}
    f(worker)
    f({"pid": "gcs_server", "lines": [NOISE, FATAL], "is_err": True})
    f({"pid": "raylet", "lines": [NOISE], "is_err": True})
    assert printed == [worker, {"pid": "gcs_server", "lines": [FATAL], "is_err": True}]
    assert log.read_text().splitlines() == [NOISE, FATAL, NOISE] and f.diverted == 2


def test_the_run_log_lives_in_a_local_run_only():
    assert run_log_path("runs/demo") == os.path.join("runs/demo", "logs", "ray.log")
    assert run_log_path("file:///data/run") == "/data/run/logs/ray.log"
    assert run_log_path("s3://bucket/run") is None
