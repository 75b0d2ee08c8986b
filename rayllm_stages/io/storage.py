"""Storage through fsspec: one `Location` per URL (s3://, file://, memory://, plain paths)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.core import url_to_fs


@dataclass
class Location:
    """A folder or file URL and the filesystem that serves it."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fs, self.path = url_to_fs(self.url, **self.storage_options)
        self.path = self.path.rstrip("/") or self.path

    def child(self, *names: str) -> Location:
        joined = "/".join(n.strip("/") for n in names)
        return Location(self.url.rstrip("/") + "/" + joined, self.storage_options)

    @property
    def is_local(self) -> bool:
        protocol = self.fs.protocol
        return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))

    def exists(self) -> bool:
        # Fresh, not from the filesystem's listing cache: Ray workers write outputs and run-log parts
        # this process never listed.
        self.fs.invalidate_cache(self.path)
        return self.fs.exists(self.path)

    def open(self, mode: str = "rb", **kwargs):
        if "w" in mode and self.is_local:
            self.fs.makedirs(self.fs._parent(self.path), exist_ok=True)
        return self.fs.open(self.path, mode, **kwargs)

    def read_text(self) -> str:
        with self.open("r", encoding="utf-8") as handle:
            return handle.read()

    def write_text(self, text: str) -> None:
        with self.open("w", encoding="utf-8") as handle:
            handle.write(text)

    def write_bytes(self, data: bytes) -> None:
        with self.open("wb") as handle:
            handle.write(data)

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def write_json(self, data: Any) -> None:
        self.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")

    def list_files(self, suffix: str = "") -> list[Location]:
        """Files directly in this folder, sorted by name; empty if the folder does not exist."""
        try:
            names = self.fs.ls(self.path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        files = sorted(n for n in names if n.endswith(suffix) and not self.fs.isdir(n))
        return [self.child(n.rsplit("/", 1)[-1]) for n in files]

    def remove(self) -> None:
        if self.exists():
            self.fs.rm(self.path, recursive=True)

    def size(self) -> int:
        return int(self.fs.size(self.path))

    def identity(self) -> dict[str, Any]:
        """What changes when the file changes: size plus the store's etag or mtime."""
        info = self.fs.info(self.path)
        marker = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        return {"size": info.get("size"), "version": str(marker) if marker is not None else None}

    def iter_lines(self) -> Iterator[str]:
        with self.open("r", encoding="utf-8") as handle:
            yield from handle

    def __str__(self) -> str:
        return self.url


def open_url(url: str, mode: str = "rb", **storage_options):
    """`fsspec.open` for one-off reads and writes outside a job."""
    return fsspec.open(url, mode, **storage_options)
