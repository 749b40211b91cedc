"""Relabel and evaluate on real Ray: stored labels equal live ones, results and report agree."""
from __future__ import annotations

import json
import re
import statistics

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from prism_ray import pipeline
from prism_ray.cli import main
from prism_ray.data import build_dataset
from prism_ray.stages.image_sets import load_image_set
from prism_ray.stages.relabel import LabelSource, read_epoch
from prism_ray.status import run_status
from prism_ray.storage import ShardStore
from prism_ray.teacher_pool import load_pool, model_shape
from tests.orchestration.helpers import pipeline_config

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ray_local):
    cfg = pipeline_config(str(tmp_path_factory.mktemp("e2e") / "run"))
    reports = pipeline.execute(cfg, ["recover", "relabel", "evaluate"], quiet=True)
    assert all(r.complete for r in reports)
    return cfg


def test_every_stage_committed(finished_run):
    storage = pipeline.open_storage(finished_run)
    stages = {s["stage"]: s for s in run_status(storage)["stages"]}
    # 2 sets (prism, random_real) x 6 epochs / 2 per shard; 2 sets x 1 student x 2 seeds; 3 diversity units
    assert stages["relabel"]["committed"] == 6 and stages["relabel"]["missing"] == 0
    assert stages["evaluate/students"]["committed"] == 4
    assert stages["evaluate/diversity"]["committed"] == 3
    labels = storage.list(ShardStore(storage, "relabel").key("labels"))
    assert len(labels) == 6  # one Parquet file per set per two epochs


@pytest.mark.parametrize("holding", ["host", "encoded"])
def test_stored_labels_equal_live_labels(finished_run, holding):
    """Labels the relabel stage stored equal labels computed live from the set as a worker holds it: decoded
    uint8 (on the device; the host here) or encoded and decoded batch by batch in DataLoader workers."""
    cfg = finished_run
    storage = pipeline.open_storage(cfg)
    norm = build_dataset(cfg.data, "train").normalization
    shape = model_shape(cfg, 4)
    pool = load_pool(cfg.relabel_teachers(), shape, cfg, storage, torch.device("cpu"))
    teachers = [pool[n] for n in cfg.relabel_teachers()]
    for set_name in ("prism", "random_real"):
        image_set = load_image_set(storage, set_name, norm, 1, holding=holding, loader_workers=2)
        assert image_set.holding == holding
        images = image_set.images
        stored = LabelSource(cfg, storage, set_name, images, 4, None, torch.device("cpu"))
        live_cfg = pipeline_config(cfg.run.output, relabel={"mode": "live", "mix_group": 4, "epochs_per_shard": 2})
        live = LabelSource(live_cfg, storage, set_name, images, 4, teachers, torch.device("cpu"))
        for epoch in (0, 3, 5):
            plan_s, labels_s = stored(epoch)
            plan_l, labels_l = live(epoch)
            assert torch.equal(labels_s, labels_l)
            for field in ("order", "crops", "flips", "partner", "mix_box", "mix_lam"):
                assert torch.equal(getattr(plan_s, field), getattr(plan_l, field)), field
        # different epochs get different augmentations (the test above is not comparing constants)
        assert not torch.equal(stored(0)[0].crops, stored(1)[0].crops)


def test_workers_record_how_they_held_the_sets(finished_run):
    storage = pipeline.open_storage(finished_run)
    for prefix in ("relabel", "evaluate/students"):
        rows = ShardStore(storage, f"{prefix}").read_combined().to_pylist()
        assert {r["holding"] for r in rows} == {"host"}  # a few KB: decoded, in memory
        assert all(r["peak_rss_bytes"] > 0 for r in rows)
    students = ShardStore(storage, "evaluate/students").read_combined().to_pylist()
    assert {r["val_images"] for r in students} == {200}  # data.max_val, streamed


def test_stored_label_rows_hold_the_plan_and_logits(finished_run):
    storage = pipeline.open_storage(finished_run)
    store = ShardStore(storage, "relabel")
    (row,) = store.read("prism-e0000-0001").to_pylist()
    table = pq.read_table(pa.BufferReader(store.read_output(row)))
    assert table.num_rows == 2 * 8  # two epochs x 8 images
    assert {"epoch", "position", "image", "crop", "flip", "partner", "mix_box", "mix_lam", "logits"} <= set(
        table.column_names)
    assert str(table.schema.field("logits").type) == "fixed_size_list<element: halffloat>[4]"
    plan, values, indices = read_epoch(table, 1, 4)
    assert sorted(plan.order.tolist()) == list(range(8)) and indices is None and values.dtype == torch.float16


def test_report_equals_results_parquet(finished_run, capsys):
    storage = pipeline.open_storage(finished_run)
    for name in ("report.md", "results.parquet", "samples.png", "diversity.png", "report.json"):
        assert storage.exists(f"report/{name}"), name
    assert storage.read_bytes("report/samples.png")[:8] == b"\x89PNG\r\n\x1a\n"
    rows = storage.read_table("report/results.parquet").to_pylist()
    assert len(rows) == 4 and {r["set"] for r in rows} == {"prism", "random_real"}
    # the prism recipe scores every 10 epochs and after the last: epochs 1 and 6 of 6; best and final kept
    for r in rows:
        assert r["scored_epochs"] == 2 and r["best_epoch"] in (1, 6)
        assert r["best_top1"] >= r["top1"] and (r["best_epoch"] != 6 or r["best_top1"] == r["top1"])
    md = storage.read_bytes("report/report.md").decode()
    assert "| final top-1 (%) | final top-5 (%) | best top-1 (%) |" in md and "e % 10 == 0" in md
    for set_name in ("prism", "random_real"):
        top1 = [r["top1"] for r in rows if r["set"] == set_name]
        mean, std = 100 * statistics.fmean(top1), 100 * statistics.stdev(top1)
        line = next(l for l in md.splitlines() if l.startswith(f"| {set_name} | convnet |"))
        shown = re.search(r"\| ([\d.]+) ± ([\d.]+) \|", line)
        assert float(shown.group(1)) == pytest.approx(mean, abs=0.006)
        assert float(shown.group(2)) == pytest.approx(std, abs=0.006)
    assert main(["report", storage.root, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    by_set = {a["set"]: a for a in printed["accuracy"]}
    assert by_set["prism"]["top1_mean"] == pytest.approx(statistics.fmean(r["top1"] for r in rows
                                                                           if r["set"] == "prism"))
    assert {d["set"] for d in printed["diversity"]} == {"prism", "random_real", "real"}


def test_a_run_ends_with_the_report_path_and_its_headline(finished_run, capsys):
    # rerun on the finished run: nothing left to do, the report is rewritten and named last, with its numbers
    from prism_ray.cli import run_command

    assert run_command(finished_run, ["recover", "relabel", "evaluate"]) == 0
    err = capsys.readouterr().err.splitlines()
    storage = pipeline.open_storage(finished_run)
    figures = storage.read_json("report/report.json")
    prism = next(a for a in figures["accuracy"] if a["set"] == "prism")
    paired = next(p for p in figures["paired"] if p["baseline"] == "random_real")
    assert err[-2] == f"report: {storage.uri('report/report.md')}"
    assert err[-1] == (f"  convnet student, 2 seeds: prism top-1 {100 * prism['top1_mean']:.2f} %; prism − random_real "
                       f"{100 * paired['mean']:+.2f} points [{100 * paired['low']:+.2f}, {100 * paired['high']:+.2f}]")
