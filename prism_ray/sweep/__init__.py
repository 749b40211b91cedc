"""`prism-ray sweep CONFIG --grid SWEEP.yaml`: one base config, many points, one table.

Each point is a normal run (resumable, refused on a changed config) under OUTPUT/points/<name>. The teachers
are trained once: the squeeze stage runs in OUTPUT/teachers and every point loads their checkpoints from
there (weights: <checkpoint URI>), so no point retrains them. After each point its figures (accuracy per set
and student, the paired comparison against each baseline, within-class cosine, real-init retention, compute)
go to OUTPUT/results/<name>.json, and the table OUTPUT/sweep.parquet + OUTPUT/sweep.md is rewritten. A
resumed sweep skips every point whose record matches its config.

The sweep file (YAML):

    name: fmnist-sweep              # default: the file's name
    base: fmnist-demo.yaml          # the base config, relative to this file (CONFIG on the command line wins)
    output: runs/fmnist-sweep       # default: the base's run.output + "-sweep"
    set: {evaluate.seeds: [0, 1, 2, 3, 4]}    # overrides for every point
    vary:                           # one point per value, everything else at the base (plus a point "base")
      recovers.lr: [0.05, 0.1, 0.25]
    grid:                           # one point per combination
      recovers.jitter: [0, 2]
    points:                         # points by hand
      - {name: ipc50, set: {recover.ipc: 50}, grow_from: base}

Keys are config fields (`section.key`, as `--set`). `recovers.KEY` sets KEY in every recover of the point
(the method's and each `baselines.recover` entry), so that PRISM and SRe2L get the same budget. A point
with `grow_from: P` starts from the committed recover shards of the earlier point P (copied into its run)
and runs only the IPC indices P lacks: its recover settings must equal P's apart from a larger IPC.
Points may not set teachers, squeeze or data fields (they share the squeeze teachers): those belong in the
base config or the sweep's `set`.
"""
from __future__ import annotations

from prism_ray.config import RANDOM_REAL
from prism_ray.sweep.grid import Point, Sweep, load_sweep
from prism_ray.sweep.points import run_sweep
from prism_ray.sweep.table import table_rows, write_table

# The package's parts: grid (the sweep file into points, each a validated config), points (running them, shared
# teachers, grow_from), table (the records of finished points into sweep.parquet and sweep.md).
__all__ = ["RANDOM_REAL", "Sweep", "Point", "load_sweep", "run_sweep", "write_table", "table_rows"]
