"""Ray's own log lines kept out of the user's terminal, in the run's log file.

With `log_to_driver`, Ray's driver prints what its workers write (our units' output: wanted) and also the
error streams of its own processes, the GCS and the raylets: `(gcs_server) ... Failed to kill actor ...
RpcError: Socket closed` at the end of a run reads as if something failed, though Ray is only tidying up
actors during shutdown. Those internal lines go to a log file instead; a line that is not a routine glog
record at level I/W/E (a FATAL, a crash's stack trace) still reaches the terminal too.
"""
from __future__ import annotations

import os
import re
import threading
from typing import Callable, Optional

INTERNAL = ("gcs_server", "raylet")  # the `pid` Ray's log monitor gives lines from its own processes
PRINT_HANDLER = "ray_print_logs"  # the name of the driver's printing handler (ray/_private/worker.py, Ray 2.60)
GLOG = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([IWEF]) \d+ \d+\]")
LOG_NAME = "ray.log"


def matters(line: str) -> bool:
    """Whether an internal line belongs on the terminal: a FATAL record, or anything not a routine glog record."""
    m = GLOG.match(line)
    return m is None or m.group(1) == "F"


def run_log_path(output: str) -> Optional[str]:
    """The run's log file for a run under a local folder (`<output>/logs/ray.log`); None for object stores,
    whose runs keep these lines only in Ray's session logs on the head node."""
    if "://" in output and not output.startswith("file://"):
        return None
    return os.path.join(output.removeprefix("file://"), "logs", LOG_NAME)


class InternalLogFilter:
    """A replacement for the driver's log printer: internal lines to `path`, the rest to `forward`."""

    def __init__(self, forward: Callable[[dict], None], path: Optional[str]):
        self.forward = forward
        self.path = path
        self.diverted = 0
        self._lock = threading.Lock()

    def __call__(self, data: dict) -> None:
        if data.get("pid") not in INTERNAL:
            self.forward(data)
            return
        lines = list(data.get("lines") or [])
        self._write(lines)
        keep = [line for line in lines if matters(line)]
        self.diverted += len(lines) - len(keep)
        if keep:
            self.forward({**data, "lines": keep})

    def _write(self, lines: list[str]) -> None:
        if self.path is None or not lines:
            return
        with self._lock:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in lines)


def divert_internal_logs(path: Optional[str]) -> Optional[InternalLogFilter]:
    """Wrap the connected driver's log printer (after ray.init with log_to_driver); None where Ray's private
    dispatcher is not as expected, which leaves Ray's own printing in place."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - another Ray version
        return None
    with dispatcher._lock:
        printers = [h for name, h in dispatcher.handlers if name == PRINT_HANDLER]
        if len(printers) != 1 or isinstance(printers[0], InternalLogFilter):
            return None
        wrapped = InternalLogFilter(printers[0], path)
        dispatcher.handlers = [(name, wrapped if name == PRINT_HANDLER else h) for name, h in dispatcher.handlers]
    return wrapped
