"""Stopping a driver cleanly on SIGTERM (`ray job stop`, a KubeRay deadline, a pod eviction) or SIGINT (Ctrl-C).

Ray's core worker installs a C++ handler that answers SIGTERM with a stack dump ("*** SIGTERM received ***").
`install` replaces it, once Ray is up, with one that asks the dispatch loop to stop: the loop stops handing
out units, ends its actors and raises `Interrupted`, and the CLI prints one line (what is committed, how to
resume) and exits 128 + the signal number. Outside the dispatch loop the handler raises `Interrupted` at
once. `ray job stop` sends SIGKILL 3 s after SIGTERM (RAY_JOB_STOP_WAIT_TIME_S), so nothing here waits for
units in flight: their commits are atomic, and a rerun redoes them.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:
    from prism_ray.orchestration.progress import StageReport


class Interrupted(Exception):
    """The driver was asked to stop; `report` is the interrupted stage's report, if a stage was running."""

    def __init__(self, signum: int, report: Optional["StageReport"] = None, noun: str = "unit"):
        self.signum, self.report, self.noun = signum, report, noun
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def summary(self) -> str:
        """One line: the signal, what is committed, and how to resume."""
        head = f"stopped by {signal.Signals(self.signum).name}"
        r = self.report
        if r is None:
            return f"{head}; committed units are kept: rerun the same command to resume"
        committed = r.skipped + r.ran + r.duplicates + r.already
        return (f"{head} during {r.stage}: {committed} of {r.total} {self.noun}s committed ({r.ran} by this run), "
                f"{r.total - committed} left; committed units are kept: rerun the same command to finish the rest")


class _State:
    signum: Optional[int] = None  # the first stop signal received, None while running
    polling = 0  # >0 while a dispatch loop checks `requested()` itself


_state = _State()


def requested() -> Optional[int]:
    """The stop signal received, if any (the dispatch loop checks this between waits)."""
    return _state.signum


def _handler(signum, frame) -> None:
    if _state.signum is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the tidy exit
    _state.signum = signum
    if not _state.polling:
        raise Interrupted(signum)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Handle SIGTERM and SIGINT as a stop request while the block runs (main thread only; a driver run from
    another thread, as in tests, keeps the process's handlers). Call it after `ray.init`, which installs its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
    _state.signum = None
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)  # None: a handler installed from C
        _state.signum = None


@contextlib.contextmanager
def polling() -> Iterator[None]:
    """Inside this block a stop signal only sets `requested()`: the caller stops at its next check."""
    _state.polling += 1
    try:
        yield
    finally:
        _state.polling -= 1
