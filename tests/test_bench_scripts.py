"""The CPU benchmarks of bench/, each run end to end at toy sizes through its command line."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_recover_engine_bench(tmp_path):
    out = tmp_path / "engine.json"
    proc = run_bench("recover_engine.py", "--images", "2", "--resolution", "32", "--iterations", "1",
                     "--shards", "2", "--out", str(out))
    data = json.loads(out.read_text())
    assert [m["teacher"] for m in data["members"]] == ["resnet18 (primary)", "mobilenet_v2", "efficientnet_b0",
                                                       "shufflenet_v2_x0_5", "alexnet"]
    assert data["setup"]["member_probability"] == pytest.approx(1.5 / 4)  # 3 slots at 0.5 over 4 members
    # a number, not its sign: members' times are differences of two timings, noisy at toy sizes on a busy CPU
    assert len(data["sampled_pre_shards"]) == 2 and math.isfinite(data["expected_step_ms"]["ratio"])
    assert data["at_reference_mean_iterations"]["iterations"] == 2250
    assert set(data["selection"]) == {"pre", "intra", "expected_bn_extras_per_step"}
    assert "| teacher | engine_ms | reference_ms | note |" in proc.stdout


def test_relabel_student_bench(tmp_path):
    out = tmp_path / "relabel.json"
    proc = run_bench("relabel_student.py", "--images", "4", "--resolution", "32", "--classes", "10",
                     "--mix-group", "2", "--batch-size", "2", "--epochs", "2", "--out", str(out))
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["setup"]["images"] == 4
    whats = [r["what"] for r in data["rows"]]
    assert whats[0].startswith("relabel data path") and whats[1].startswith("soft labels (resnet18")
    assert whats[2].startswith("student training (resnet18")
    assert all(r["images_per_s"] > 0 for r in data["rows"])
    assert "images_per_s" in proc.stdout


@pytest.mark.slow
def test_orchestration_bench_local_and_s3(tmp_path):
    out = tmp_path / "orch.json"
    run_bench("orchestration.py", "--shards", "6", "--small", "3", "--images", "3", "--resolution", "32",
              "--shard-seconds", "0.05", "--s3-shard-seconds", "0.05", "--s3-check-seconds", "0.1",
              "--s3-check-shards", "2,4", "--workers", "1,2", "--out", str(out))
    data = json.loads(out.read_text())
    assert set(data["commit_s_per_shard"]) == {"local", "s3", "s3-unsaturated"}
    # local: 1 and 2 workers, two shard counts each; S3: the largest worker count
    assert sorted((r["storage"], r["workers"], r["shards"]) for r in data["runs"]) == [
        ("local", 1, 3), ("local", 1, 6), ("local", 2, 3), ("local", 2, 6), ("s3", 2, 3), ("s3", 2, 6),
        ("s3-unsaturated", 2, 2), ("s3-unsaturated", 2, 4)]
    assert [f["storage"] for f in data["fits"]] == ["local", "local", "s3", "s3-unsaturated"]
    assert [s["workers"] for s in data["scaling_local"]] == [1, 2]
    assert data["scaling_local"][0]["efficiency"] == pytest.approx(1.0)
    assert data["setup"]["jpeg_bytes_per_image"] > 0


def test_worker_memory_bench():
    """Phase by phase memory of real relabel workers: one line per phase, the set held decoded as uint8."""
    proc = run_bench("worker_memory.py", "--images", "1000", "--sets", "2", "--epochs", "2",
                     "--epochs-per-shard", "1", "--only", "relabel")
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["case"] == "data" and lines[0]["images"] == 1000
    phases = [p["phase"] for p in lines[1:]]
    assert phases == ["open", "load prism", "units prism", "drop prism", "load sre2l", "units sre2l", "drop sre2l"]
    loads = [p for p in lines[1:] if p["phase"].startswith("load")]
    assert all(p["holding"] == "host" and p["set_gb"] == round(1000 * 3 * 224 * 224 / 1e9, 2) for p in loads)
    units = [p for p in lines[1:] if p["phase"].startswith("units")]
    assert all(p["units"] == 2 and p["shard_mb"] > 0 for p in units)  # 2 epochs, one per shard
    assert all(p["peak_gb"] >= p["rss_gb"] > 0 for p in lines[1:])


def test_bf16_effect_bench(tmp_path):
    out = tmp_path / "bf16.json"
    proc = run_bench("bf16_effect.py", "--resolution", "32", "--images", "2", "--iterations", "3", "--calibration",
                     "4", "--student-images", "10", "--student-epochs", "1", "--held-out", "4", "--out", str(out))
    data = json.loads(out.read_text())
    rec, stu = data["recover"], data["students"]
    assert set(rec["psnr_db"]) == {"bf16_vs_fp32", "fp32_other_seed_vs_fp32", "fp32_final_vs_init"}
    assert rec["psnr_db"]["bf16_vs_fp32"] < float("inf")  # bf16 changed the images: it ran
    assert [r["teacher"] for r in rec["bn_input_statistics_gap_bf16_vs_fp32"]] == [
        "resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5"]  # alexnet has no BN layers
    assert -1.0 <= rec["first_step_gradient_cosine_bf16_vs_fp32"] <= 1.0
    assert set(stu["held_out_logits"]) == {"bf16_vs_fp32", "fp32_other_init_vs_fp32"}
    assert stu["weights_relative_gap"]["bf16_vs_fp32"] > 0
    assert "PSNR bf16 vs fp32" in proc.stdout


def test_nhwc_cpu_bench(tmp_path):
    out = tmp_path / "nhwc.json"
    proc = run_bench("nhwc_cpu.py", "--repeats", "1", "--steps", "2", "--epochs", "1", "--images", "256",
                     "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["what"].split()[0].rstrip(",") for r in rows] == ["squeeze"] * 3 + ["recover"] + ["student"] * 2 + \
        ["scoring"] * 2
    assert all(r["nchw_s"] > 0 and r["nhwc_s"] > 0 and r["speedup"] > 0 for r in rows)
    assert "| what | nchw_s | nhwc_s | speedup |" in proc.stdout
