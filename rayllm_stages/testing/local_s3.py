"""A real S3-protocol server on loopback (moto), for the demo, tests and benchmarks."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalS3:
    """A running moto S3 server; `storage_options` reach it through fsspec/s3fs."""

    endpoint_url: str
    _server: Any

    @property
    def storage_options(self) -> dict[str, Any]:
        # No region: moto then refuses bucket creation with InvalidLocationConstraint.
        return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": self.endpoint_url}}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)

    def create_bucket(self, name: str) -> str:
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        self._server.stop()


def start_local_s3(port: int | None = None) -> LocalS3:
    """Start moto's S3 server on 127.0.0.1 (a free port unless given)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise ImportError('the local S3 server needs moto: pip install "prefect-rayllm[dev]"') from exc
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per S3 call
    port = port or _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return LocalS3(endpoint_url=f"http://127.0.0.1:{port}", _server=server)
