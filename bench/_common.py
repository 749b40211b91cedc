"""What every benchmark script shares: the machine it ran on, a Markdown table, and its JSON file."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from anywhere, without installing the package
    sys.path.insert(0, str(ROOT))


def machine() -> dict:
    """CPU model and cores, torch version and threads, and the GPU when there is one."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   cuda=torch.version.cuda, gpus=torch.cuda.device_count())
    return out


def known_gpu() -> str | None:
    """This machine's GPU as prism_ray.estimate names it (H200, A100, ...), its own name if unknown there,
    None without a GPU: what bench JSONs record, so that `prism-ray plan --gpu NAME` finds them."""
    import torch

    if not torch.cuda.is_available():
        return None
    from prism_ray.estimate import GPU_PEAK_TFLOPS
    raw = torch.cuda.get_device_name(0)
    squashed = raw.upper().replace(" ", "")
    for name in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if name.upper().replace(" ", "") in squashed:
            return name
    return raw


def bf16_peak(gpu: str | None) -> float | None:
    """Dense bf16 TFLOP/s of a GPU estimate knows, else None."""
    if not gpu:
        return None
    from prism_ray.config import ConfigError
    from prism_ray.estimate import gpu_peak
    try:
        return gpu_peak(gpu)[1]
    except ConfigError:
        return None


def table(rows: list[dict], columns: list[str]) -> str:
    """rows as a Markdown table with the given columns (missing cells left empty)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def default_out(name: str) -> Path:
    return RESULTS / f"{name}.json"
