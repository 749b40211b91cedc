"""Results bound to the inputs they were made from: upstream checks, lineage, resets that cannot be adopted,
checkpoints that cannot outlive a config change, committed units never computed twice, and names and records
that cannot leak or escape the run. Real Ray on loopback, real Parquet, real images; S3 where storage matters."""
from __future__ import annotations

import os
import pickle
import shutil

import pytest
import yaml

from prism_ray import pipeline
from prism_ray.cli import main
from prism_ray.config import ConfigError
from prism_ray.orchestration.local import run_stage_local
from prism_ray.stages.evaluate import Checkpoints, StudentStage
from prism_ray.status import verify_run
from prism_ray.storage import ShardStore, Storage, sha256
from tests.orchestration.helpers import check_exactly_once, pipeline_config, recover_config

pytestmark = pytest.mark.usefixtures("ray_local", "runs_share_kept_workers")


def write_config(cfg, path) -> str:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


# labels for 6 epochs, students trained 4: a test can train 6 epochs (checkpoints at 2 and 4) on the same labels
RELABEL = {"mode": "stored", "mix_group": 4, "epochs_per_shard": 2, "epochs": 6}
EVALUATE = {"recipe": "prism", "students": ["convnet"], "seeds": [0, 1], "epochs": 4, "batch_size": 8,
            "checkpoint_every": 2}


def integrity_config(output: str):
    return pipeline_config(output, relabel=RELABEL, evaluate=EVALUATE)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, kept_workers):
    """A finished run of every stage (PRISM and random real, stored labels, two students): copied per test."""
    cfg = integrity_config(str(tmp_path_factory.mktemp("integrity") / "run"))
    reports = pipeline.execute(cfg, list(cfg.run.stages), quiet=True, idle=kept_workers)
    assert all(r.complete for r in reports)
    return cfg


def copy_run(finished, tmp_path, name: str = "run") -> tuple[str, Storage]:
    """(config file, storage) of a copy of the finished run."""
    out = tmp_path / name
    shutil.copytree(finished.run.output, out)
    return write_config(integrity_config(str(out)), tmp_path / f"{name}.yaml"), Storage(str(out))


@pytest.fixture
def run(finished, tmp_path):
    return copy_run(finished, tmp_path)


def generations(storage: Storage) -> dict[str, str | None]:
    return {p: ShardStore(storage, p).generation for p in ("recover/prism", "recover/random_real", "relabel",
                                                            "evaluate/students", "evaluate/diversity")}


def test_a_finished_run_verifies_and_its_report_states_one_lineage(run):
    path, storage = run
    assert verify_run(storage) == []
    report = storage.read_json("report/report.json")
    by_stage = {r["stage"]: r for r in report["lineage"]}
    gens = generations(storage)
    assert by_stage["evaluate/students"]["upstream"]["recover/prism"]["generation"] == gens["recover/prism"]
    assert by_stage["evaluate/students"]["upstream"]["relabel"]["generation"] == gens["relabel"]
    assert by_stage["relabel"]["upstream"]["recover/random_real"]["generation"] == gens["recover/random_real"]
    assert "## Lineage" in storage.read_bytes("report/report.md").decode()


def test_a_changed_recover_is_never_mixed_with_old_labels(run, capsys):
    """recover.lr changed: evaluate refuses with or without --fresh (its labels were made from the old images);
    recover --fresh resets every stage after it too, so evaluate can only run once relabel has run again."""
    path, storage = run
    before = generations(storage)
    assert main(["evaluate", path, "--set", "recover.lr=0.1", "--quiet"]) == 2
    assert "reads recover/prism, whose outputs were made with another config (differing: recover.lr" in \
        capsys.readouterr().err
    assert main(["evaluate", path, "--set", "recover.lr=0.1", "--fresh", "--quiet"]) == 2
    assert "run that stage for this config first (prism-ray recover CONFIG --fresh)" in capsys.readouterr().err
    assert generations(storage) == before  # nothing was touched by the refusals

    assert main(["recover", path, "--set", "recover.lr=0.1", "--fresh", "--quiet"]) == 0
    after = generations(storage)
    assert all(after[p] != before[p] for p in after)  # recover and every stage downstream of it: new generations
    for prefix in ("relabel", "evaluate/students", "evaluate/diversity"):
        assert ShardStore(storage, prefix).committed() == set()
    assert not storage.exists("report/report.md") and storage.list("report/superseded")  # the stale report moved
    assert main(["evaluate", path, "--set", "recover.lr=0.1", "--fresh", "--quiet"]) == 2
    assert "the stored soft labels are not complete; run the relabel stage first" in capsys.readouterr().err

    assert main(["run", path, "--set", "recover.lr=0.1", "--quiet"]) == 0
    report = storage.read_json("report/report.json")
    students = next(r for r in report["lineage"] if r["stage"] == "evaluate/students")
    assert students["upstream"]["recover/prism"]["generation"] == after["recover/prism"]
    assert ShardStore(storage, "relabel").record()["config"]["sets"]["recover"]["prism"]["lr"] == 0.1
    assert verify_run(storage) == []


def test_a_raised_ipc_is_refused_until_recover_has_grown_the_set(run, capsys):
    path, storage = run
    for fresh in ([], ["--fresh"]):
        assert main(["evaluate", path, "--set", "recover.ipc=3", "--quiet", *fresh]) == 2
        err = capsys.readouterr().err
        assert "reads recover/prism" in err and "recover.ipc (raised from 2 to 3)" in err
        assert "run that stage for this config first (prism-ray recover CONFIG)" in err
    assert storage.read_json("report/report.json")["ipc"] == 2


def test_upstream_outputs_made_again_make_committed_outputs_stale(run, capsys):
    """recover/random_real made again under the same config (as after a lost output folder): relabel's committed
    labels were made from the earlier images, so evaluate refuses and relabel must be redone with --fresh."""
    path, storage = run
    store = ShardStore(storage, "recover/random_real")
    storage.delete(store.combined_key)  # the stage is finished again from its committed shards: a new manifest
    sid = sorted(store.committed())[0]
    storage.delete(store.manifest_key(sid))
    assert main(["recover", path, "--quiet"]) == 0
    assert main(["evaluate", path, "--quiet"]) == 2
    assert "evaluate/diversity: its committed outputs were made from other outputs of recover/random_real (made " \
           "again since); rerun it with --fresh" in capsys.readouterr().err
    assert main(["relabel", path, "--quiet"]) == 2
    assert "relabel: its committed outputs were made from other outputs of recover/random_real (made again since); " \
           "rerun it with --fresh" in capsys.readouterr().err
    assert main(["run", path, "--stages", "relabel,evaluate", "--fresh", "--quiet"]) == 0
    assert verify_run(storage) == []


def _interrupted_students(path: str, monkeypatch) -> None:
    """Train the students 6 epochs in this process (--local, from scratch) with every student commit failing: they
    train to the end and leave their checkpoints (epochs 2 and 4); nothing of them commits."""
    real = ShardStore.commit

    def failing(self, shard_id, *args, **kwargs):
        if self.prefix == "evaluate/students":
            raise RuntimeError("injected: the worker was lost before its commit")
        return real(self, shard_id, *args, **kwargs)

    monkeypatch.setattr(ShardStore, "commit", failing)
    assert main(["evaluate", path, "--local", "--quiet", "--fresh", "--set", "ray.max_attempts=1",
                 "--set", "evaluate.epochs=6"]) == 1
    monkeypatch.setattr(ShardStore, "commit", real)


def test_checkpoints_resume_the_same_config_but_never_a_changed_one(finished, monkeypatch, tmp_path):
    # the same config resumes from the checkpoint of epoch 4 (the test can tell a resume from a fresh start)
    path, storage = copy_run(finished, tmp_path, "same")
    _interrupted_students(path, monkeypatch)
    assert main(["evaluate", path, "--local", "--quiet", "--set", "evaluate.epochs=6"]) == 0
    rows = ShardStore(storage, "evaluate/students").read_combined().to_pylist()
    assert {r["resumed_from_epoch"] for r in rows} == {4}

    # evaluate.lr changed after the interruption: a new generation; the old checkpoints are neither used nor kept
    path, storage = copy_run(finished, tmp_path, "changed")
    _interrupted_students(path, monkeypatch)
    old = ShardStore(storage, "evaluate/students")
    assert old.committed() == set() and storage.list(old.key("checkpoints"))
    assert main(["evaluate", path, "--local", "--quiet", "--set", "evaluate.epochs=6",
                 "--set", "evaluate.lr=0.002"]) == 0
    store = ShardStore(storage, "evaluate/students")
    assert store.generation != old.generation
    assert {r["resumed_from_epoch"] for r in store.read_combined().to_pylist()} == {0}
    assert not storage.list(f"evaluate/students/{old.generation}")


def test_a_checkpoint_is_loaded_as_weights_only(run, tmp_path):
    """Anyone who can write the run prefix could plant a pickle: it is never executed, the unit trains from 0."""
    path, storage = run
    from prism_ray.config_loader import load_config
    cfg = load_config(path, ["evaluate.seeds=[0]", "evaluate.epochs=6"])
    context = pipeline.data_context(cfg)
    stage = StudentStage(cfg, pipeline.open_storage(cfg), context)
    stage.prepare(fresh=True)
    stage.bind()
    unit = stage.units()[0]
    planted = tmp_path / "planted"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {planted}",))

    blob = pickle.dumps({"epoch": 4, "model": Exploit()})
    ckpt = Checkpoints(stage.store, unit, stage.lineage_digest)
    rel = f"{ckpt.base}.e00004.pt"
    storage.write_bytes(stage.store.key(rel), blob)
    storage.write_json(ckpt.pointer, {"path": rel, "bytes": len(blob), "sha256": sha256(blob), "epoch": 4})
    report = run_stage_local(stage, quiet=True)
    assert report.complete and not planted.exists()
    row = stage.store.read(unit.id).to_pylist()[0]
    assert row["resumed_from_epoch"] == 0


def test_a_driver_killed_mid_reset_on_s3_leaves_nothing_to_adopt(s3_endpoint, s3_bucket, monkeypatch):
    """--fresh dies half-way through deleting the old outputs: the rerun adopts none of them."""
    cfg = recover_config(f"s3://{s3_bucket}/runs/reset", ipc=2, classes=4, group=2, iterations=3,
                         storage={"endpoint_url": s3_endpoint})
    (first,) = pipeline.execute(cfg, ["recover"], quiet=True)
    assert first.complete and first.ran == 4
    storage = pipeline.open_storage(cfg)
    real_delete = Storage.delete

    def dies_half_way(self, key):
        if key.startswith("recover/prism"):
            paths = sorted(self.fs.find(self.path(key)))
            for p in paths[: len(paths) // 2]:  # sorted batches, as a bulk delete goes, then the driver is gone
                self.fs.rm_file(p)
            raise SystemExit("killed mid-reset")
        return real_delete(self, key)

    monkeypatch.setattr(Storage, "delete", dies_half_way)
    with pytest.raises(SystemExit):
        pipeline.execute(cfg, ["recover"], fresh=True, quiet=True)
    monkeypatch.setattr(Storage, "delete", real_delete)
    (again,) = pipeline.execute(cfg, ["recover"], quiet=True)
    assert (again.skipped, again.ran) == (0, 4)  # nothing of the interrupted reset's old outputs was adopted
    check_exactly_once(storage, "prism", 4, 8)


# ---- a unit is never computed twice once its manifest has landed


def _counting_stage(cfg, storage, context, count_file, die_file, victim):
    from prism_ray.stages.recover import RecoverStage, RecoverWorker

    class DyingWorker(RecoverWorker):
        def compute(self, unit):
            with open(self.stage.count_file, "a") as f:
                f.write(unit.id + "\n")
            return super().compute(unit)

        def commit(self, unit, computed):
            summary = super().commit(unit, computed)
            if unit.id == self.stage.victim and not os.path.exists(self.stage.die_file):
                open(self.stage.die_file, "w").close()
                os._exit(1)  # the worker is lost right after its manifest landed, before it could answer
            return summary

    class CountingStage(RecoverStage):
        def open_worker(self):
            return DyingWorker(self)

    (stage,) = [s for s in pipeline.build_stages(cfg, storage, context, ["recover"])]
    counting = CountingStage(cfg, storage, context, stage.set_name, stage.rc)
    counting.count_file, counting.die_file, counting.victim = count_file, die_file, victim
    return counting


def test_a_worker_lost_after_its_manifest_landed_is_not_computed_again(tmp_path):
    from prism_ray.orchestration.dispatch import run_stage_ray
    # one unit per worker at a time: only the unit whose manifest landed is handed out again
    cfg = recover_config(str(tmp_path / "run"), ipc=2, classes=4, group=2, iterations=3,
                         ray={"workers": 2, "cpus_per_worker": 1, "in_flight_per_worker": 1})
    storage = pipeline.open_storage(cfg)
    context = pipeline.data_context(cfg)
    pipeline.record_run(cfg, storage, context)
    count_file, die_file = str(tmp_path / "computes.txt"), str(tmp_path / "died")
    stage = _counting_stage(cfg, storage, context, count_file, die_file, victim="ipc0000-cls0000-0001")
    stage.prepare()
    stage.bind()
    report = run_stage_ray(stage, cfg.ray, quiet=True)
    assert os.path.exists(die_file) and report.workers_lost == 1 and report.complete
    computes = open(count_file).read().split()
    assert sorted(computes) == sorted(u.id for u in stage.units())  # each unit computed exactly once
    assert report.already == 1 and report.ran == 3
    check_exactly_once(storage, "prism", 4, 8)


# ---- names and records


@pytest.mark.parametrize("name", ["../outside", "a/b", "x..y", "-lead"])
def test_teacher_names_are_plain_identifiers(tmp_path, name):
    with pytest.raises(ConfigError, match=r"teachers.models\[0\].name: got"):
        recover_config(str(tmp_path / "run"), teachers={"models": [{"name": name, "arch": "convnet",
                                                                   "weights": "random"}]})


def test_credentials_in_uris_are_never_recorded_or_printed(tmp_path, capsys):
    secret = "s3cr3t-do-not-leak"
    cfg = recover_config(str(tmp_path / "run"), ipc=1, iterations=1,
                         storage={"endpoint_url": f"http://user:{secret}@127.0.0.1:9"})
    spec = {"name": "t2", "arch": "convnet", "weights": f"https://h/w.pt?X-Amz-Signature={secret}&x=1"}
    assert pipeline.execute(cfg, ["recover"], quiet=True)[0].complete
    storage = pipeline.open_storage(cfg)
    for key in ("run.json", "recover/prism/stage.json"):
        assert secret not in storage.read_bytes(key).decode(), key
    from prism_ray.stages.recover import RecoverStage
    signed = recover_config(str(tmp_path / "run2"), teachers={"models": [cfg.teachers.models[0].__dict__, spec]})
    stage = RecoverStage(signed, storage, pipeline.data_context(signed), "prism", signed.recover)
    assert secret not in str(stage.current_config()) and "X-Amz-Signature=***" in str(stage.current_config())
    capsys.readouterr()
    assert main(["recover", write_config(cfg, tmp_path / "c.yaml"), "--quiet", "--set",
                 f"run.output=s3://AKIAEXAMPLE:{secret}@bucket/run"]) == 2
    err = capsys.readouterr().err
    assert "run.output: s3://***@bucket/run holds credentials" in err and secret not in err
    # an unexpected failure's traceback is redacted too
    assert main(["status", f"https://user:{secret}@127.0.0.1:9/run"]) in (1, 2)
    assert secret not in capsys.readouterr().err
