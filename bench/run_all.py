"""Run every CPU benchmark in this folder, one after another; each prints its table (docs/benchmarks.md has
them) and the first three write their JSON under bench/results/. The GPU script is run on its own:
python bench/gpu_recover.py --out DIR."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script in ("recover_engine.py", "relabel_student.py", "orchestration.py", "recover_step.py",
               "dispatch_throughput.py", "status_s3.py"):
    print(f"# {script}", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True, stderr=subprocess.DEVNULL)
