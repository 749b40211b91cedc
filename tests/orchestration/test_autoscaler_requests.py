"""What the drivers of a cluster ask of its autoscaler: two runs' requests add up instead of overwriting each other,
the request of a driver killed with SIGKILL is dropped when the next run starts, and `prism-ray release` withdraws
everything."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import ray

from prism_ray.cli import main
from prism_ray.orchestration import autoscaler
from prism_ray.orchestration.cluster import _forget_dead_requests
from tests.orchestration.helpers import autoscaler_request, wait_until

OTHER_DRIVER = textwrap.dedent("""
    import sys, time
    import ray
    from prism_ray.orchestration import autoscaler
    ray.init(address=sys.argv[1], log_to_driver=False)
    autoscaler.request([{"CPU": 1.0} for _ in range(3)])
    print(ray.get_runtime_context().get_job_id(), flush=True)
    time.sleep(600)
""")


def _job_dead(job_id: str) -> bool:
    from ray._private.state import jobs
    return any(j["JobID"] == job_id and j["IsDead"] for j in jobs())


def test_requests_add_up_and_do_not_outlive_their_driver(ray_local, capsys):
    gcs = ray.get_runtime_context().gcs_address
    other = subprocess.Popen([sys.executable, "-c", OTHER_DRIVER, gcs], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        other_job = other.stdout.readline().strip()
        assert other_job, "the other driver did not start"
        assert autoscaler_request() == {(("CPU", 1.0),): 3}
        # a second run on the same cluster: both requests stand
        autoscaler.request([{"CPU": 0.5}, {"CPU": 0.5}])
        assert autoscaler_request() == {(("CPU", 1.0),): 3, (("CPU", 0.5),): 2}
    finally:
        other.send_signal(signal.SIGKILL)  # no chance to withdraw anything
        other.wait(timeout=60)
    assert autoscaler_request() == {(("CPU", 1.0),): 3, (("CPU", 0.5),): 2}  # still asked for: nobody withdrew it
    wait_until(lambda: _job_dead(other_job), what="Ray marking the killed driver's job dead")
    _forget_dead_requests()  # what every run does when it connects
    assert autoscaler_request() == {(("CPU", 0.5),): 2}
    # a driver's own withdrawal leaves the others' requests alone; `prism-ray release` withdraws every request
    autoscaler.request([{"CPU": 0.5}])
    assert autoscaler_request() == {(("CPU", 0.5),): 1}
    assert main(["release", "--address", gcs]) == 0
    assert "withdrew the autoscaler requests of 1 run(s)" in capsys.readouterr().out
    assert autoscaler_request() == {}
