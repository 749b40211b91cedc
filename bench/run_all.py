"""Run every benchmark in this folder, one after another; each prints JSON lines (see the README table)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script in ("recover_step.py", "dispatch_throughput.py", "status_s3.py"):
    print(f"# {script}", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True, stderr=subprocess.DEVNULL)
