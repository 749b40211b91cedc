"""The GPU benchmark script, run end to end on the CPU at toy sizes: every variant runs and the outputs hold."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_runs_every_variant_at_tiny_sizes(tmp_path):
    # compile with the eager backend: the test checks that teachers and their BN hooks go through
    # torch.compile (dynamo traces the hooks); Inductor's code generation is what the GPU run adds
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_recover.py"), "--tiny", "--out", str(tmp_path),
                           "--compile-backend", "eager", "--budget-s", "600"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_recover.json").read_text())
    assert (tmp_path / "gpu_recover.md").read_text().startswith("# recover on CPU")
    assert data["device"] == "cpu" and data["size"] == "tiny" and data["gpu"] is None
    rows = {r["variant"]: r for r in data["summary"]}
    assert set(rows) == {"fp32", "bf16_cl", "bf16_cl_compile", "reference_fp32"}
    # every figure computed; not their signs: at toy sizes on a busy CPU a member's marginal time (a difference of
    # two timings) can come out negative (seen: a speed-up of -0.61 with another test process beside it)
    for row in rows.values():
        assert all(math.isfinite(row[k]) for k in ("step_ms", "s_per_image", "tflops", "speedup_vs_reference"))
    variants = data["variants"]
    # the members table: the primary and every pool member, for the engine and the reference loop
    for name in ("fp32", "reference_fp32"):
        assert set(variants[name]["members_ms"]) == {"resnet18", "mobilenet_v2", "efficientnet_b0",
                                                     "shufflenet_v2_x0_5", "alexnet"}
    assert variants["bf16_cl"]["amp_effective"] is False  # the script runs its bf16 variants in fp32 on a CPU
    assert variants["bf16_cl_compile"]["compile"] == {"backend": "eager"}
    assert variants["bf16_cl_cudagraphs"] == {"error": "skipped: CUDA graphs need a GPU"}
    conc = variants["concurrent"]
    assert set(conc["runs"]) == {"1", "2"} and all(r["images_per_s"] > 0 for r in conc["runs"].values())
    # on a CPU both "bf16" variants compute in fp32: the closeness check must find them identical
    for name in ("bf16_cl", "bf16_cl_compile"):
        check = data["closeness"][name]
        assert check["close"] and check["image_mean_abs_levels"] == 0.0
        assert check["honest_loss_rel_diff"] == {"ce": 0.0, "bn": 0.0}
    flops = data["flops_per_step"]
    assert flops["reference_expected"] > flops["engine_expected"] > 0
    assert "efficiency" not in data  # no GPU, no fraction of a GPU's peak for `plan` to read
