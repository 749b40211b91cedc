"""Stop signals in the driver: a request the dispatch loop acts on, or an `Interrupted` raised at once, and the one
line the CLI prints. (Through `ray job stop` and Ctrl-C on a real driver: test_local_cluster, test_elastic.)"""
from __future__ import annotations

import os
import signal

import pytest

from prism_ray.orchestration import stopping
from prism_ray.orchestration.progress import StageReport


def test_signal_inside_the_dispatch_loop_is_a_request():
    before = signal.getsignal(signal.SIGTERM)
    with stopping.installed():
        with stopping.polling():
            os.kill(os.getpid(), signal.SIGTERM)
            assert stopping.requested() == signal.SIGTERM  # the loop stops at its next check
    assert signal.getsignal(signal.SIGTERM) == before and stopping.requested() is None


def test_signal_outside_the_loop_stops_at_once():
    with stopping.installed():
        with pytest.raises(stopping.Interrupted) as info:
            os.kill(os.getpid(), signal.SIGINT)
    assert info.value.exit_code == 130
    assert info.value.summary() == ("stopped by SIGINT; committed units are kept: rerun the same command to "
                                    "resume")


def test_second_ctrl_c_is_a_keyboard_interrupt():
    with stopping.installed(), stopping.polling():
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_summary_says_what_is_committed_and_how_to_resume():
    report = StageReport("recover/prism", total=500, skipped=100, ran=112, duplicates=0)
    e = stopping.Interrupted(signal.SIGTERM, report, "shard")
    assert e.exit_code == 143
    assert e.summary() == ("stopped by SIGTERM during recover/prism: 212 of 500 shards committed (112 by this "
                           "run), 288 left; committed units are kept: rerun the same command to finish the rest")


def test_cluster_line_of_the_stage_summary():
    assert StageReport("squeeze", total=3).cluster_line() == ""
    report = StageReport("recover/prism", total=8, workers_started=5, workers_lost=1, requeued=2, nodes_joined=3,
                         nodes_left=1)
    assert report.cluster_line() == "3 node(s) joined, 1 left; 5 worker(s) started, 1 lost; 2 unit(s) requeued"
    assert {"workers_started", "requeued", "nodes_joined", "nodes_left"} <= set(report.to_json())
