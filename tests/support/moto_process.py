"""A moto server in a process of its own on 127.0.0.1: the S3 (and IAM) HTTP API the tests speak to.

Its own process, not a thread of pytest's: the pytest process forks DataLoader workers (stages run with
`--local`) and a live server thread in the parent is one more thing a forked child inherits half of; the
server also no longer competes with the tests for the GIL."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request


@contextlib.contextmanager
def moto_server():
    """Yields the server's URL once it answers; stops the server afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the moto server did not start on {url} (exit code {server.poll()})")
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
