"""The embedded default's local Ray is for one machine: its node registers, and its processes listen, on
loopback only (Ray otherwise takes the machine's interface address, whatever `_node_ip_address` says)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import json, os, ray
    from prism_ray.config import RayConfig
    from prism_ray.orchestration.cluster import ray_session

    def descendants(root):
        parent = {}
        for p in filter(str.isdigit, os.listdir("/proc")):
            try:
                parent[int(p)] = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
        found, todo = set(), [root]
        while todo:
            at = todo.pop()
            kids = [p for p, pp in parent.items() if pp == at and p not in found]
            found.update(kids)
            todo.extend(kids)
        return found

    def listening(pids):
        inodes = set()
        for p in pids:
            try:
                for fd in os.listdir(f"/proc/{p}/fd"):
                    link = os.readlink(f"/proc/{p}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
            except OSError:
                pass
        out = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in open(table).read().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in inodes:  # LISTEN
                    out.append(f[1].split(":")[0])
        return out

    with ray_session(RayConfig(num_cpus=1)):
        nodes = [n["NodeManagerAddress"] for n in ray.nodes()]
        addrs = listening(descendants(os.getpid()))
    print(json.dumps({"nodes": nodes, "listening": addrs}))
""")
LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000",  # 127.0.0.1, ::1 as /proc/net/tcp{,6} write them
                "0000000000000000FFFF00000100007F"}  # ::ffff:127.0.0.1


def test_a_local_session_registers_and_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)  # no leftover token or config
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["nodes"] == ["127.0.0.1"]
    assert got["listening"] and set(got["listening"]) <= LOOPBACK_HEX, got
