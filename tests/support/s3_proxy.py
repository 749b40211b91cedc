"""A request-counting HTTP proxy in front of an S3 endpoint (the moto server in tests).

Point `storage.endpoint_url` (or AWS_ENDPOINT_URL) at `proxy.url`: every request of every process (the
driver, Ray workers) passes through it and is counted per bucket and kind before it is forwarded.

    proxy = S3RequestCounter(moto_url).start()
    ...                                      # run something with storage.endpoint_url = proxy.url
    proxy.counts("data-bucket")              # {"LIST": 0, "GET": 48, "HEAD": 0, "PUT": 0, "POST": 0, "DELETE": 0}
    proxy.reset(); proxy.stop()

`drop_headers` removes request headers before forwarding: a stand-in for a store that ignores them.

Kinds: LIST is a GET on a bucket (no key) that lists: `list-type`, `prefix`, `delimiter`, `versions` or
`uploads` in the query, or no query at all; any other GET is a GET. HEAD, PUT, POST (multi-object delete,
multipart uploads) and DELETE count as themselves. Requests are path-style (`/bucket/key`), which botocore
uses for an endpoint given as an IP address.
"""
from __future__ import annotations

import http.client
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

KINDS = ("LIST", "GET", "HEAD", "PUT", "POST", "DELETE")
LIST_QUERY_KEYS = {"list-type", "prefix", "delimiter", "versions", "uploads"}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "upgrade"}


def classify(method: str, target: str) -> tuple[str, str, str]:
    """(kind, bucket, key) of a path-style S3 request."""
    parts = urlsplit(target)
    bucket, _, key = parts.path.lstrip("/").partition("/")
    kind = method.upper()
    if kind == "GET" and not key:
        query = parse_qs(parts.query, keep_blank_values=True)
        if not query or LIST_QUERY_KEYS & set(query):
            kind = "LIST"
    return kind, bucket, key


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    server: _Server

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        pass

    def _read_body(self) -> bytes:
        """The request body exactly as sent (chunked framing included), to be forwarded unchanged."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the blank line that ends the body
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _upstream(self, fresh: bool = False) -> http.client.HTTPConnection:
        conn = getattr(self, "_conn", None)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            host, port = self.server.upstream
            conn = self._conn = http.client.HTTPConnection(host, port, timeout=60)
        return conn

    def _send_upstream(self, body: bytes, fresh: bool) -> http.client.HTTPResponse:
        conn = self._upstream(fresh)
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        dropped = self.server.counter.drop_headers
        for name, value in self.headers.items():
            # this proxy already answered 100-continue to the client; dropped headers stand for a store that
            # ignores them (e.g. If-None-Match on an S3-compatible service without conditional writes)
            if name.lower() != "expect" and name.lower() not in dropped:
                conn.putheader(name, value)
        conn.endheaders(body if body else None)
        return conn.getresponse()

    def _forward(self) -> None:
        self.server.counter._record(self.command, self.path)
        body = self._read_body()
        try:
            resp = self._send_upstream(body, fresh=False)
        except (http.client.HTTPException, ConnectionError, OSError):
            resp = self._send_upstream(body, fresh=True)  # the pooled upstream connection had closed
        data = resp.read()
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        # HEAD answers carry the object's length but no body: pass the upstream length on as it is.
        length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)
        if resp.will_close:
            self._upstream(fresh=True)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def finish(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()
        super().finish()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    upstream: tuple[str, int]
    counter: S3RequestCounter


class S3RequestCounter:
    """Counts S3 requests per bucket and kind while forwarding them to `upstream` (e.g. http://127.0.0.1:5000)."""

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0, drop_headers: tuple[str, ...] = ()):
        self.drop_headers = {h.lower() for h in drop_headers}
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname, parts.port or 80)
        self._address = (host, port)
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(KINDS, 0))
        self._log: list[tuple[str, str, str]] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> S3RequestCounter:
        server = _Server(self._address, _Handler)
        server.upstream, server.counter = self._upstream, self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="s3-request-counter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> S3RequestCounter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ---- counts

    def _record(self, method: str, target: str) -> None:
        kind, bucket, key = classify(method, target)
        with self._lock:
            counts = self._counts[bucket]
            counts[kind] = counts.get(kind, 0) + 1
            self._log.append((kind, bucket, target))

    def counts(self, bucket: str | None = None) -> dict:
        """{kind: n} for one bucket (every kind, zeros included), or {bucket: {kind: n}} for all."""
        with self._lock:
            if bucket is not None:
                return dict(self._counts[bucket]) if bucket in self._counts else dict.fromkeys(KINDS, 0)
            return {b: dict(c) for b, c in self._counts.items()}

    def requests(self, bucket: str | None = None, kind: str | None = None) -> list[tuple[str, str, str]]:
        """The (kind, bucket, method target) of every request counted, in arrival order, optionally filtered."""
        with self._lock:
            return [r for r in self._log if (bucket is None or r[1] == bucket) and (kind is None or r[0] == kind)]

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._log.clear()
