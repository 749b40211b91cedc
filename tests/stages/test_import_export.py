"""Sets made elsewhere evaluated like the run's own, and every set exported in the formats people train from.

Run A makes its sets; its `prism` set is exported as an ImageFolder tree (to a local folder and to S3) and as
Hugging Face Parquet with its soft labels. Run B imports a set written in SRe2L's folder layout (RGB JPEGs of
another size) and those exports, on real Ray, and relabels and evaluates them with the demo's protocol
(the prism recipe, stored soft labels) at toy size; its report lists them beside its own sets.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from prism_ray import pipeline
from prism_ray.cli import main
from prism_ray.report import collect
from prism_ray.status import run_status
from prism_ray.storage import ShardStore, Storage
from tests.orchestration.helpers import pipeline_config, recover_config
from tests.support.distilled_sets import image_bytes, write_sre2l_tree

pytestmark = pytest.mark.slow

IMPORTED = ("sre2l_release", "prism_folder", "prism_parquet")


def set_files(storage: Storage, set_name: str) -> list[tuple[int, int, bytes]]:
    """(class, ipc, bytes) of a committed set, in the set's order, read through its combined manifest."""
    store = ShardStore(storage, f"recover/{set_name}")
    rows = sorted(store.read_combined().to_pylist(), key=lambda r: (r["class_id"], r["ipc_index"]))
    return [(r["class_id"], r["ipc_index"], store.read_output(r)) for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local, kept_workers, s3_endpoint):
    import boto3

    base = tmp_path_factory.mktemp("import")
    cfg_a = pipeline_config(str(base / "run-a"))
    assert all(r.complete for r in pipeline.execute(cfg_a, ["recover", "relabel", "evaluate"], quiet=True,
                                                    idle=kept_workers))
    bucket = "prism-exports"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    exports = {"folder": str(base / "export-folder"), "s3": f"s3://{bucket}/prism-folder",
               "parquet": str(base / "export-parquet")}
    for key, fmt, extra in (("folder", "imagefolder", []), ("s3", "imagefolder", ["--endpoint-url", s3_endpoint]),
                            ("parquet", "parquet", ["--soft-labels"])):
        assert main(["export", cfg_a.run.output, "--set", "prism", "--to", exports[key], "--format", fmt,
                     *extra]) == 0
    sre2l = write_sre2l_tree(base / "syn_data" / "sre2l_in1k", classes=4, ipc=2, size=32)
    cfg_b = pipeline_config(str(base / "run-b"), storage={"endpoint_url": s3_endpoint}, baselines={
        "random_real": True, "imported": {
            "sre2l_release": {"uri": str(sre2l), "method": "SRe2L recover (their save_images layout)"},
            "prism_folder": {"uri": exports["s3"]}, "prism_parquet": {"uri": exports["parquet"]}}})
    assert all(r.complete for r in pipeline.execute(cfg_b, ["recover", "relabel", "evaluate"], quiet=True,
                                                    idle=kept_workers))
    return cfg_a, cfg_b, exports, sre2l


def test_imported_sets_are_committed_like_the_runs_own(runs):
    _, cfg_b, _, _ = runs
    storage = pipeline.open_storage(cfg_b)
    stages = {s["stage"]: s for s in run_status(storage)["stages"]}
    for name in IMPORTED:
        st = stages[f"recover/{name}"]
        assert st["complete"] and st["images_committed"] == 8 and st["combined_manifest"], name
    assert stages["evaluate/students"]["committed"] == 5 * 2  # (prism, random_real, 3 imported) x 2 seeds
    # SRe2L's 32-px RGB JPEGs became 28-px greyscale PNGs; the source of each is recorded
    rows = ShardStore(storage, "recover/sre2l_release").read_combined().to_pylist()
    assert all(r["converted"] for r in rows)
    assert sorted(r["source"] for r in rows)[:2] == ["new000/class000_id000.jpg", "new000/class000_id001.jpg"]
    for _, _, blob in set_files(storage, "sre2l_release"):
        im = Image.open(io.BytesIO(blob))
        assert (im.format, im.mode, im.size) == ("PNG", "L", (28, 28))


def test_export_round_trip_is_byte_for_byte(runs):
    cfg_a, cfg_b, _, _ = runs
    original = set_files(pipeline.open_storage(cfg_a), "prism")
    assert len(original) == 8
    b = pipeline.open_storage(cfg_b)
    for name in ("prism_folder", "prism_parquet"):
        assert set_files(b, name) == original, name
        assert not any(r["converted"] for r in ShardStore(b, f"recover/{name}").read_combined().to_pylist())


def test_the_report_lists_imported_sets_with_paired_comparisons(runs):
    _, cfg_b, _, _ = runs
    storage = pipeline.open_storage(cfg_b)
    md = storage.read_bytes("report/report.md").decode()
    for name in IMPORTED:
        assert re.search(rf"^\| {name} \| convnet \| [\d.]+ ± [\d.]+ \|", md, re.M), name
        assert f"| prism − {name} | convnet | 2 |" in md, name
        assert re.search(rf"^\| {name} \| [\d.]+ \|", md.split("## Diversity")[1], re.M), name
    figures = collect(storage)
    imported = {s["set"]: s for s in figures["imported"]}
    assert imported["sre2l_release"]["method"] == "SRe2L recover (their save_images layout)"
    assert (imported["sre2l_release"]["ipc_min"], imported["sre2l_release"]["converted"]) == (2, 8)
    assert imported["sre2l_release"]["class_rule"] == "numbers" and imported["prism_folder"]["class_rule"] == "names"
    assert "## Imported sets" in md and "| sre2l_release | SRe2L recover" in md


def test_torchvision_reads_the_imagefolder_export(runs):
    from torchvision.datasets import ImageFolder

    cfg_a, _, exports, _ = runs
    storage = pipeline.open_storage(cfg_a)
    ds = ImageFolder(exports["folder"])
    names = json.loads(Path(exports["folder"], "classes.json").read_text())
    # Fashion-MNIST's names do not sort in class order: folders carry the class number first
    assert ds.classes == names["folders"] == ["000_T-shirt_top", "001_Trouser", "002_Pullover", "003_Dress"]
    assert names["names"] == ["T-shirt/top", "Trouser", "Pullover", "Dress"]
    got = [(label, Path(path).read_bytes()) for path, label in ds.samples]
    assert got == [(c, blob) for c, _, blob in set_files(storage, "prism")]
    assert ds[0][0].size == (28, 28)


def test_datasets_reads_the_parquet_export_as_images_with_class_names(runs, tmp_path):
    datasets = pytest.importorskip("datasets")  # in the test extras (pyproject.toml)
    cfg_a, _, exports, _ = runs
    files = sorted(str(p) for p in Path(exports["parquet"], "data").glob("*.parquet"))
    ds = datasets.Dataset.from_parquet(files, cache_dir=str(tmp_path / "hf-cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["label"].names == ["T-shirt/top", "Trouser", "Pullover", "Dress"]
    assert len(ds) == 8 and ds[0]["image"].size == (28, 28)  # decoded as a PIL image
    raw = ds.cast_column("image", datasets.Image(decode=False))
    original = set_files(pipeline.open_storage(cfg_a), "prism")
    assert [(r["label"], r["image"]["bytes"]) for r in raw] == [(c, blob) for c, _, blob in original]
    assert [ds.features["label"].int2str(r["label"]) for r in raw][::2] == ["T-shirt/top", "Trouser", "Pullover",
                                                                           "Dress"]


def test_the_export_carries_its_soft_labels_and_card(runs):
    cfg_a, _, exports, _ = runs
    storage = pipeline.open_storage(cfg_a)
    stored = [r for r in ShardStore(storage, "relabel").read_combined().to_pylist() if r["set"] == "prism"]
    copied = sorted(Path(exports["parquet"], "soft_labels").iterdir())
    assert [p.name for p in copied] == ["prism-epochs-0000-0001.parquet", "prism-epochs-0002-0003.parquet",
                                        "prism-epochs-0004-0005.parquet"]
    by_start = {r["epoch_start"]: r for r in stored}
    for p in copied:
        start = int(p.name.split("-")[2])
        assert p.read_bytes() == ShardStore(storage, "relabel").read_output(by_start[start])
    card = Path(exports["parquet"], "README.md").read_text()
    record = storage.read_json("run.json")
    from prism_ray.export import config_digest
    assert f"sha256:{config_digest(record['config'])}" in card
    assert "primary teacher**: t1 (convnet, weights random)" in card and "IPC 2" in card
    top1 = [r["top1"] for r in ShardStore(storage, "evaluate/students").read_combined().to_pylist()
            if r["set"] == "prism"]
    assert f"| convnet | {100 * sum(top1) / len(top1):.2f} ±" in card
    assert card.startswith("---\npretty_name:")  # the Hugging Face card header names the data files


def test_export_refuses_an_unknown_set_or_a_used_target(runs, tmp_path, capsys):
    cfg_a, _, exports, _ = runs
    assert main(["export", cfg_a.run.output, "--set", "nope", "--to", str(tmp_path / "x"), "--format",
                 "parquet"]) == 2
    assert "image set 'nope' cannot be read" in capsys.readouterr().err
    assert main(["export", cfg_a.run.output, "--set", "prism", "--to", exports["folder"], "--format",
                 "imagefolder"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds files" in err and len(err.splitlines()) == 1


def test_bad_input_stops_the_run_before_anything_is_committed(tmp_path, capsys):
    """An undecodable file in an imported set: one line naming it, exit 2, and nothing of any set committed."""
    sre2l = write_sre2l_tree(tmp_path / "syn", classes=4, ipc=2)
    (sre2l / "new002" / "class002_id001.jpg").write_bytes(image_bytes(5)[:300])
    cfg = recover_config(str(tmp_path / "run"), ipc=2, baselines={"imported": {"ext": {"uri": str(sre2l)}}})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["recover", str(path), "--local", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "syn/new002/class002_id001.jpg: cannot decode image" in err
    assert not (tmp_path / "run" / "recover").exists()


def test_a_worker_refuses_a_kept_index_its_record_was_not_made_from(runs):
    """The source index lives beside the stage's generations: a worker checks it against the stage's record."""
    from prism_ray.stages.base import StageError
    from prism_ray.stages.imported import SOURCE_INDEX

    _, cfg_b, _, _ = runs
    storage = pipeline.open_storage(cfg_b)
    (stage,) = [s for s in pipeline.build_stages(cfg_b, storage, pipeline.data_context(cfg_b), ["recover"])
                if s.prefix == "recover/prism_folder"]
    stage.open_worker()  # its own index: accepted
    key, other = f"{stage.prefix}/{SOURCE_INDEX}", f"recover/sre2l_release/{SOURCE_INDEX}"
    kept = storage.read_bytes(key)
    storage.write_bytes(key, storage.read_bytes(other))  # another set's images
    try:
        with pytest.raises(StageError, match="is not the index this stage's record was made from"):
            stage.open_worker()
    finally:
        storage.write_bytes(key, kept)


def test_a_resumed_run_reads_the_kept_index_and_lists_no_source(runs):
    """The index kept with an imported set is what a rerun reads: with the source gone, the finished run still
    resumes (nothing to do) instead of listing it again."""
    import shutil

    _, cfg_b, _, sre2l = runs
    shutil.rmtree(sre2l)
    reports = pipeline.execute(cfg_b, ["recover", "relabel", "evaluate"], quiet=True)
    assert all(r.complete and r.ran == 0 for r in reports)
    summary = pipeline.open_storage(cfg_b).read_json("recover/sre2l_release/source.json")
    assert summary["ipc_per_class"] == [2, 2, 2, 2] and summary["uri"] == str(sre2l)
