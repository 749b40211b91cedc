"""`prism-ray status RUN --watch`: refreshes from storage while a run progresses, ends when it completes (0) or
stops with failed units (1)."""
from __future__ import annotations

import io

from prism_ray import pipeline
from prism_ray.cli import main
from prism_ray.orchestration.local import run_stage_local
from prism_ray.status import watch
from tests.data.test_datasets import make_image_folder
from tests.orchestration.helpers import planned_stage, recover_config


def test_watch_refreshes_until_the_run_completes(tmp_path):
    cfg = recover_config(str(tmp_path / "run"), ipc=2, iterations=3)
    stage, storage = planned_stage(cfg)
    units = stage.units()
    worker = stage.open_worker()
    ticks = []

    def progress(_seconds):  # between refreshes, the "driver" commits one more shard
        ticks.append(len(ticks))
        worker.run(units[len(ticks) - 1])

    out = io.StringIO()
    assert watch(storage, interval=0.01, stream=out, sleep=progress) == 0
    text = out.getvalue()
    blocks = [b for b in text.split("-- ") if b.strip()]
    assert len(blocks) == len(units) + 1  # one block per change: 0, 1, ... all committed
    rows = [b.splitlines()[3].split()[:6] for b in blocks]  # time, run, header, then the stage's row
    assert rows == [["recover/prism", "shard", "4", str(n), str(4 - n), "0"] for n in range(5)]
    assert text.rstrip().endswith("run complete")
    assert len(ticks) == len(units)  # it stopped as soon as the run was complete


def test_watch_ends_with_failed_units(tmp_path):
    data = tmp_path / "data"
    make_image_folder(data / "train", classes=("a", "b"), per_class=2)
    (data / "train" / "b" / "img_01.png").write_bytes(b"not a png")  # the shard of IPC index 1 always fails
    cfg = recover_config(str(tmp_path / "run"), ipc=2, classes=2, group=2, iterations=3,
                         data={"dataset": "image_folder", "train": str(data / "train"), "channels": 3,
                               "resolution": 16, "max_per_class": None, "verify": False})  # met by a worker
    stage, storage = planned_stage(cfg)
    report = run_stage_local(stage, max_attempts=1, quiet=True)
    assert list(report.failed) == ["ipc0001-cls0000-0001"]
    out = io.StringIO()
    assert watch(storage, interval=0.01, stream=out, sleep=lambda s: None) == 1
    text = out.getvalue()
    assert "failed (compute) recover/prism ipc0001-cls0000-0001 after 1 attempt(s)" in text
    assert "run failed" in text


def test_watch_through_the_cli_on_a_finished_run(tmp_path, capsys):
    cfg = recover_config(str(tmp_path / "run"), ipc=1, iterations=2)
    stage, storage = planned_stage(cfg)
    assert run_stage_local(stage, quiet=True).complete
    assert main(["status", str(tmp_path / "run"), "--watch", "--interval", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "recover/prism" in out and "run complete" in out
    assert main(["status", str(tmp_path / "run"), "--watch", "--interval", "0"]) == 2
    assert "--interval: got 0; allowed: > 0" in capsys.readouterr().err


def test_watch_waits_for_a_run_that_has_not_started(tmp_path):
    cfg = recover_config(str(tmp_path / "run"), ipc=1, iterations=2)
    calls = []

    def start_and_finish(_seconds):
        calls.append(1)
        if len(calls) == 2:  # the run starts after two refreshes and finishes at once
            stage, _ = planned_stage(cfg)
            run_stage_local(stage, quiet=True)

    out = io.StringIO()
    assert watch(pipeline.open_storage(cfg), interval=0.01, stream=out, sleep=start_and_finish) == 0
    text = out.getvalue()
    assert text.count("waiting for it to start") == 1 and "run complete" in text
