"""Where curation images come from: a folder (S3 prefix or any fsspec URL) or a manifest of URIs.

Listing is lazy so a prefix with millions of keys streams into the pipeline instead of being held
in memory. Each image's URI is its id for the rest of the run, so URIs are returned with their
protocol (`s3://bucket/key`, `file:///path`) and in a deterministic order.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator
from typing import Any

from pydantic import Field, model_validator

from prefect_rayllm.rayllm_stages.config.base import StrictModel, storage_block_field
from prefect_rayllm.rayllm_stages.io.storage import Location


class ImageSourceConfig(StrictModel):
    """One image source: `url` (a folder listed recursively) or `manifest` (a file of URIs)."""

    url: str | None = Field(None, description="fsspec folder URL listed recursively, e.g. s3://bucket/images/")
    manifest: str | None = Field(
        None, description="fsspec URL of a file with one URI per line, or JSONL objects with a 'uri' field"
    )
    include: list[str] = Field(default_factory=list, description="globs; an image is kept if any matches (empty: all)")
    exclude: list[str] = Field(default_factory=list, description="globs; an image is dropped if any matches")
    limit: int | None = Field(None, ge=1, description="stop after this many URIs")
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False, description="fsspec options for the source")
    storage_block: str | None = storage_block_field()

    @model_validator(mode="after")
    def _one_source(self) -> ImageSourceConfig:
        if (self.url is None) == (self.manifest is None):
            raise ValueError("give exactly one of url or manifest")
        return self


def matches_globs(name: str, include: list[str], exclude: list[str]) -> bool:
    """Whether `name` passes the globs.

    A glob is tried against the whole name and against its last path part, so `*.jpg` works for
    nested keys and `cats/*.png` can pin a subfolder (fnmatch: `*` also crosses `/`).
    """
    candidates = (name, name.rsplit("/", 1)[-1])

    def hit(patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(c, p) for p in patterns for c in candidates)

    return (not include or hit(include)) and not hit(exclude)


def iter_folder_uris(location: Location) -> Iterator[tuple[str, str]]:
    """(uri, path relative to the folder) for every file below it.

    Order: the files of a folder sorted by name, then its subfolders sorted by name, depth first.
    `walk` lists one folder at a time (a delimiter listing on S3), so memory stays at one folder's
    worth of names.
    """
    root = location.path.rstrip("/")
    for folder, dirs, files in location.fs.walk(root, topdown=True):
        dirs.sort()  # walk descends in the order left in `dirs`
        for name in sorted(files):
            path = f"{folder.rstrip('/')}/{name}"
            yield location.fs.unstrip_protocol(path), path[len(root) :].lstrip("/")


def iter_manifest_uris(location: Location) -> Iterator[str]:
    """URIs from a manifest, in file order: plain lines, or JSON objects with a `uri` field.

    Blank lines and lines starting with `#` are skipped. A line that is JSON but has no string
    `uri` is a broken manifest, not a missing image, so it raises naming the line.
    """
    for number, line in enumerate(location.iter_lines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("{"):
            try:
                uri = json.loads(text).get("uri")
            except json.JSONDecodeError as exc:
                raise ValueError(f"manifest {location.url} line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(uri, str) or not uri:
                raise ValueError(f"manifest {location.url} line {number}: no string 'uri' field")
            yield uri
        else:
            yield text


def iter_image_uris(config: ImageSourceConfig) -> Iterator[str]:
    """Image URIs of the source after globs and limit, lazily and in a deterministic order.

    A manifest entry whose object does not exist is still yielded: the fetch stage turns it into
    an error row, so the run's accounting counts it.
    """
    if config.url is not None:
        pairs = iter_folder_uris(Location(config.url, config.storage_options))
    else:
        pairs = ((uri, uri) for uri in iter_manifest_uris(Location(config.manifest, config.storage_options)))
    count = 0
    for uri, name in pairs:
        if not matches_globs(name, config.include, config.exclude):
            continue
        yield uri
        count += 1
        if config.limit is not None and count >= config.limit:
            return
