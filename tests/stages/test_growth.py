"""Growing a run's IPC on real Ray: committed shards are kept byte for byte, only the new IPC indices run,
relabel and evaluate are redone; lowering the IPC or changing a shard-shaping field is refused. Also the
real-init retention column of the recover manifests, and the report's paired comparison."""
from __future__ import annotations

import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from prism_ray import pipeline
from prism_ray.algo.similarity import ssim
from prism_ray.cli import main
from prism_ray.data import build_dataset
from prism_ray.stages.base import classify_change
from prism_ray.stats import paired_difference
from prism_ray.storage import ShardStore
from tests.orchestration.helpers import pipeline_config

pytestmark = pytest.mark.usefixtures("ray_local")
SETS = ("prism", "sre2l", "random_real")


def growth_config(output: str, ipc: int, **recover):
    return pipeline_config(
        output, recover={"ipc": ipc, "class_group": 2, "iterations": 4, **recover},
        baselines={"random_real": True, "recover": {"sre2l": {"preset": "sre2l", "iterations": 4, "jitter": 2,
                                                             "crop_scale": [0.8, 1.0]}}},
        evaluate={"recipe": "prism", "students": ["convnet"], "seeds": [0, 1], "epochs": 2, "batch_size": 8,
                  "checkpoint_every": 2})


def snapshot(storage, set_name: str) -> dict[str, tuple[bytes, int]]:
    """Every file of a set's images and manifests: content and modification time (ns)."""
    out = {}
    root = storage.path(ShardStore(storage, f"recover/{set_name}").key(""))
    for sub in ("images", "manifests"):
        for path in storage.fs.find(f"{root}/{sub}"):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (f.read(), os.stat(path).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def grown(tmp_path_factory, kept_workers):
    out = str(tmp_path_factory.mktemp("grow") / "run")
    small = growth_config(out, ipc=2)
    first = pipeline.execute(small, ["recover", "relabel", "evaluate"], quiet=True, idle=kept_workers)
    assert all(r.complete for r in first)
    storage = pipeline.open_storage(small)
    before = {s: snapshot(storage, s) for s in SETS}
    old_results = storage.read_bytes("report/results.parquet")
    big = growth_config(out, ipc=3)
    second = {r.stage: r for r in pipeline.execute(big, ["recover", "relabel", "evaluate"], quiet=True,
                                                    idle=kept_workers)}
    return {"small": small, "big": big, "storage": storage, "before": before, "second": second,
            "old_results": old_results}


def test_growth_runs_only_the_new_ipc_indices(grown):
    second = grown["second"]
    for s in SETS:  # 4 classes in groups of 2: 2 shards per IPC index; IPC 2 -> 3 adds 2 shards per set
        r = second[f"recover/{s}"]
        assert (r.total, r.skipped, r.ran, r.failed) == (6, 4, 2, {}), s
    storage = grown["storage"]
    for s in SETS:
        store = ShardStore(storage, f"recover/{s}")
        assert sorted(storage.list(store.key("manifests"))) == sorted(
            store.manifest_key(f"ipc{k:04d}-cls{a:04d}-{a + 1:04d}") for k in range(3) for a in (0, 2))
        rows = ShardStore(storage, f"recover/{s}").read_combined().to_pylist()
        assert sorted((r["class_id"], r["ipc_index"]) for r in rows) == [(c, k) for c in range(4) for k in range(3)]


def test_old_shards_bytes_and_manifests_are_untouched(grown):
    storage = grown["storage"]
    for s in SETS:
        before, after = grown["before"][s], snapshot(storage, s)
        assert before and set(before) < set(after)
        for path, (data, mtime) in before.items():
            assert after[path] == (data, mtime), f"{s}/{path} was rewritten"
        new = sorted(set(after) - set(before))
        assert all("ipc0002" in p for p in new) and len(new) == 4 + 2  # 4 images, 2 manifests


def test_grown_set_equals_a_fresh_run_of_the_larger_ipc(grown, tmp_path):
    """Shards do not depend on the total IPC: growing 2 -> 3 gives the bytes a fresh IPC-3 run gives, and
    the random-real set keeps its first picks (the prefix of one seeded permutation per class)."""
    fresh_cfg = growth_config(str(tmp_path / "fresh"), ipc=3)
    assert all(r.complete for r in pipeline.execute(fresh_cfg, ["recover"], quiet=True))
    fresh = pipeline.open_storage(fresh_cfg)
    storage = grown["storage"]
    for s in SETS:
        a = ShardStore(storage, f"recover/{s}").read_combined().sort_by([("class_id", "ascending"),
                                                                          ("ipc_index", "ascending")])
        b = ShardStore(fresh, f"recover/{s}").read_combined().sort_by([("class_id", "ascending"),
                                                                       ("ipc_index", "ascending")])
        assert a.column("sha256").to_pylist() == b.column("sha256").to_pylist(), s
    old_picks = {}
    for path, (data, _) in grown["before"]["random_real"].items():
        if path.startswith("manifests/"):
            old_picks.update({(r["class_id"], r["ipc_index"]): r["source_index"]
                              for r in pq.read_table(io.BytesIO(data)).to_pylist()})
    now = {(r["class_id"], r["ipc_index"]): r["source_index"]
           for r in ShardStore(storage, "recover/random_real").read_combined().to_pylist()}
    assert len(old_picks) == 8 and all(now[key] == v for key, v in old_picks.items())
    assert len(set(now.values())) == len(now)  # no real image picked twice


def test_relabel_and_evaluate_are_redone_and_the_old_report_kept(grown):
    second, storage = grown["second"], grown["storage"]
    assert second["relabel"].skipped == 0 and second["relabel"].ran == second["relabel"].total
    assert second["evaluate/students"].skipped == 0 and second["evaluate/students"].ran == 3 * 2
    rows = storage.read_table("report/results.parquet").to_pylist()
    assert {r["images"] for r in rows} == {12}  # 4 classes x IPC 3
    assert storage.read_bytes("report/ipc2/results.parquet") == grown["old_results"]
    assert storage.read_json("report/report.json")["ipc"] == 3 and storage.exists("report/ipc2/report.md")


def test_lowering_the_ipc_or_changing_a_shard_field_is_refused(grown, tmp_path, capsys):
    path = tmp_path / "grown.yaml"
    path.write_text(yaml.safe_dump(grown["big"].to_dict()))
    assert main(["recover", str(path), "--set", "recover.ipc=2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "recover.ipc (lowered from 3 to 2: a set can grow, not shrink)" in err and "--fresh" in err
    assert main(["recover", str(path), "--set", "recover.ipc=4", "--set", "recover.lr=0.2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "recover.lr" in err and "recover.ipc (raised from 3 to 4)" in err
    # nothing was touched by the refusals
    assert main(["status", grown["big"].run.output]) == 0
    assert ShardStore(grown["storage"], "recover/prism").record()["config"]["recover"]["ipc"] == 3


def test_classify_change():
    a = {"recover": {"ipc": 10, "lr": 0.1}, "sets": {"recover": {"prism": {"ipc": 10}}}}
    grow = classify_change(a, {"recover": {"ipc": 50, "lr": 0.1}, "sets": {"recover": {"prism": {"ipc": 50}}}})
    assert grow.is_growth and [g[0] for g in grow.grown] == ["recover.ipc", "sets.recover.prism.ipc"]
    other = classify_change(a, {"recover": {"ipc": 50, "lr": 0.2}, "sets": {"recover": {"prism": {"ipc": 50}}}})
    assert not other.is_growth and other.other == ["recover.lr"]
    lower = classify_change(a, {"recover": {"ipc": 5, "lr": 0.1}, "sets": {"recover": {"prism": {"ipc": 5}}}})
    assert not lower.is_growth and "recover.ipc (lowered from 10 to 5: a set can grow, not shrink)" in lower.describe()


def test_retention_is_recorded_per_image(grown):
    cfg, storage = grown["big"], grown["storage"]
    train = build_dataset(cfg.data, "train")
    means = {}
    for s in SETS:
        rows = ShardStore(storage, f"recover/{s}").read_combined().to_pylist()
        if s == "random_real":
            assert all(r["init_ssim"] is None and r["init_ssim_ref"] is None for r in rows)
            continue
        assert {r["init_ssim_ref"] for r in rows} == {"init" if s == "prism" else "kth_real"}
        for r in rows[:3]:  # the recorded value is the SSIM of the saved (PNG, lossless) image to the real one
            png = Image.open(io.BytesIO(ShardStore(storage, f"recover/{s}").read_output(r)))
            saved = torch.from_numpy(np.asarray(png, dtype=np.float32))[None, None] / 255
            real = train.pixels_at([r["class_id"]], r["ipc_index"])
            real = (real * 255).round() / 255
            assert ssim(saved, real).item() == pytest.approx(r["init_ssim"], abs=1e-5)
        means[s] = sum(r["init_ssim"] for r in rows) / len(rows)
    # 4 steps from a real image keep most of it; from noise, an unrelated real image is matched by chance
    assert means["prism"] > 0.5 > means["sre2l"]


def test_report_shows_paired_differences_and_retention(grown):
    storage = grown["storage"]
    rows = storage.read_table("report/results.parquet").to_pylist()
    report = storage.read_json("report/report.json")
    top1 = {(r["set"], r["seed"]): r["top1"] for r in rows}
    for p in report["paired"]:
        expected = paired_difference({s: top1[("prism", s)] for s in (0, 1)},
                                     {s: top1[(p["baseline"], s)] for s in (0, 1)})
        assert p["mean"] == pytest.approx(expected["mean"]) and p["low"] == pytest.approx(expected["low"])
    assert {p["baseline"] for p in report["paired"]} == {"sre2l", "random_real"}
    assert {r["set"]: r["reference"] for r in report["retention"]} == {"prism": "init", "sre2l": "kth_real"}
    md = storage.read_bytes("report/report.md").decode()
    assert "| prism − sre2l | convnet | 2 |" in md and "| prism − random_real | convnet | 2 |" in md
    assert "## Real-init retention" in md and "| prism | init | 12 |" in md
