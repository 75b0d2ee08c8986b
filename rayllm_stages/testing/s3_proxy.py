"""A loopback reverse proxy in front of an S3 endpoint that adds latency and injects faults.

The local moto server answers in well under a millisecond, which hides whether the fetch stage
overlaps its reads; real S3 costs tens of milliseconds per GET and sometimes throttles or drops a
connection. The proxy restores both, for tests and the benchmark:

    with S3Proxy(local_s3.endpoint_url, latency_s=0.02, fault_rate=0.2, seed=1) as proxy:
        fs = s3fs.S3FileSystem(key=..., secret=..., client_kwargs={"endpoint_url": proxy.endpoint_url})

Requests pass through unchanged (method, path, query, headers including Host and the SigV4
Authorization, body), so signed requests stay valid for the upstream. Faults hit only object GETs
(not listings or HEADs), as a share `fault_rate` drawn from a seeded RNG: a 503 SlowDown with S3's
XML error body, or a connection reset (TCP RST, no response).

One more injected fault, for tests that must stop a run half-way: `stall_gets`, a predicate on the
request path; a GET of a matching key hangs (no bytes) until `release()` or `stop()`, as a stuck
S3 connection would. Stalled GETs are counted in `stats.stalled`.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal, Self

FaultKind = Literal["slowdown", "reset"]

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
# The proxy already answered `Expect: 100-continue` itself and holds the whole body.
NOT_FORWARDED = HOP_BY_HOP | {"expect"}

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message>"
    b"<RequestId>rayllm-proxy</RequestId></Error>"
)


@dataclass
class ProxyStats:
    """What the proxy did, for assertions and benchmark reports."""

    requests: int = 0
    object_gets: int = 0
    stalled: int = 0
    faults: dict[str, int] = field(default_factory=lambda: {"slowdown": 0, "reset": 0})
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def is_object_get(method: str, path: str) -> bool:
    """GET of a key (`/bucket/key...` without a listing query); path-style addressing as moto uses."""
    parsed = urllib.parse.urlsplit(path)
    parts = parsed.path.lstrip("/").split("/", 1)
    query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
    return method == "GET" and len(parts) == 2 and bool(parts[1]) and "list-type" not in query


class S3Proxy:
    """Start/stop context manager; `endpoint_url` is where clients connect."""

    def __init__(
        self,
        upstream_url: str,
        latency_s: float = 0.0,
        fault_rate: float = 0.0,
        fault_kinds: tuple[FaultKind, ...] = ("slowdown", "reset"),
        seed: int | None = None,
        timeout_s: float = 30.0,
        stall_gets: Callable[[str], bool] | None = None,
    ) -> None:
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within [0, 1], got {fault_rate}")
        if fault_rate and not fault_kinds:
            raise ValueError("fault_rate > 0 needs at least one fault kind")
        upstream = urllib.parse.urlsplit(upstream_url)
        if upstream.scheme != "http" or not upstream.hostname:
            raise ValueError(f"upstream_url must be http://host:port, got {upstream_url!r}")
        self.upstream = (upstream.hostname, upstream.port or 80)
        self.latency_s = latency_s
        self.fault_rate = fault_rate
        self.fault_kinds = tuple(fault_kinds)
        self.timeout_s = timeout_s
        self.stats = ProxyStats()
        self.stall_gets = stall_gets
        self._released = threading.Event()
        self._rng = random.Random(seed)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("proxy is not running: call start() or use it as a context manager")
        host, port = self._server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{port}"

    def draw_fault(self, method: str, path: str) -> FaultKind | None:
        """Which fault (if any) this request gets; counts requests."""
        with self.stats.lock:
            self.stats.requests += 1
            if not is_object_get(method, path):
                return None
            self.stats.object_gets += 1
            if self.fault_rate and self._rng.random() < self.fault_rate:
                kind = self._rng.choice(self.fault_kinds)
                self.stats.faults[kind] += 1
                return kind
        return None

    def hold_if_stalled(self, method: str, path: str) -> None:
        """Block this request while it matches `stall_gets` and the proxy was not released."""
        if self.stall_gets is None or self._released.is_set() or not is_object_get(method, path):
            return
        if not self.stall_gets(urllib.parse.urlsplit(path).path):
            return
        with self.stats.lock:
            self.stats.stalled += 1
        self._released.wait()

    def release(self) -> None:
        """Let stalled GETs (and later ones) through."""
        self._released.set()

    def start(self) -> Self:
        handler = type("BoundProxyHandler", (ProxyHandler,), {"proxy": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ProxyHandler(BaseHTTPRequestHandler):
    """Forwards one request at a time per client connection; keeps client connections alive."""

    proxy: S3Proxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; with Nagle on, the client's delayed ACK adds
        # ~40 ms to every response, which would swamp the latency we mean to inject.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:
        return None

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def reset_connection(self) -> None:
        """Abort with a TCP RST: SO_LINGER 0 then close, like a peer that died mid-request."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def send_slowdown(self) -> None:
        self.send_response(503, "Slow Down")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
        self.end_headers()
        self.wfile.write(SLOWDOWN_BODY)

    def forward(self, body: bytes) -> None:
        host, port = self.proxy.upstream
        upstream = http.client.HTTPConnection(host, port, timeout=self.proxy.timeout_s)
        try:
            upstream.connect()
            upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in NOT_FORWARDED}
            if body or "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
                headers["Content-Length"] = str(len(body))
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                upstream.putheader(name, value)
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            payload = response.read()
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(payload))
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
        finally:
            upstream.close()

    def handle_any(self) -> None:
        body = self.read_body()
        if self.proxy.latency_s:
            time.sleep(self.proxy.latency_s)
        self.proxy.hold_if_stalled(self.command, self.path)
        fault = self.proxy.draw_fault(self.command, self.path)
        if fault == "reset":
            self.reset_connection()
        elif fault == "slowdown":
            self.send_slowdown()
        else:
            self.forward(body)

    def finish(self) -> None:
        try:
            super().finish()
        except (OSError, ValueError):
            pass  # the socket was reset on purpose

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_any
