"""Fetch stage: read many objects at once per worker, retry transient failures, record permanent ones.

Fetching is bound by the network round trip, not CPU, so one Ray worker keeps `max_concurrency`
reads in flight with a thread pool over fsspec's `cat_file` (works for s3://, file://, memory://...).

Retries live here and only here. By default a single `cat_file` on s3fs can turn into
botocore retries (up to 5) inside s3fs `_error_wrapper` retries (5, nested twice), i.e. dozens of
hidden attempts with their own waits, and the attempt count we report would be meaningless. For
S3 we therefore set the filesystem's `retries` attribute to 1 (s3fs has no init argument for it)
and botocore `retries.total_max_attempts=1` (unless the caller set `config_kwargs.retries`), so
each of our attempts is exactly one HTTP GET and `fetch_attempts` is the number of GETs made. The
S3 filesystem is a private instance (`skip_instance_cache`) so that change never leaks into other
users of s3fs in the same process.
s3fs's `cat_file` also sends a HEAD before every GET when its `max_concurrency` is above 1 (the
default is 10), to split objects larger than its block size into parallel ranged GETs. Images are
far below that size, so the HEAD only doubles the requests, the signing and a round trip per
object; we set `max_concurrency` to 1 (unless the caller set it): one request per attempt.
One retry remains below us: aiohttp resends an idempotent GET once when a reused keep-alive
connection turns out to be closed or reset, so a reset can cost two GETs for one attempt.
"""

from __future__ import annotations

import copy
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fsspec.core import url_to_fs
from pydantic import Field

from prefect_rayllm.rayllm_stages.config.base import StrictModel, storage_block_field

FETCH_COLUMNS = ("uri", "image_bytes", "fetch_error", "fetch_attempts")

# Errors that retrying cannot fix. Anything else (5xx/SlowDown surface as OSError(EBUSY) from s3fs,
# timeouts, resets, aiohttp/botocore connection errors) is treated as transient and retried.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
)
# Programming or configuration mistakes (e.g. an unknown storage option) fail the batch loudly
# instead of quietly turning every row into an error.
BUG_ERRORS: tuple[type[BaseException], ...] = (TypeError, AttributeError, NameError)


class FetchConfig(StrictModel):
    """How the fetch stage reads objects."""

    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False, description="fsspec options for the URIs")
    storage_block: str | None = storage_block_field()
    max_concurrency: int = Field(32, ge=1, le=1024, description="reads in flight per worker")
    max_attempts: int = Field(5, ge=1, le=50, description="attempts per object, the first included")
    backoff_base_s: float = Field(0.05, ge=0.0, description="first retry waits up to this (full jitter)")
    backoff_max_s: float = Field(2.0, ge=0.0, description="cap on one retry wait")
    timeout_s: float = Field(30.0, gt=0.0, description="S3: connect and read timeout of one attempt")
    max_bytes: int | None = Field(None, ge=1, description="objects larger than this become an error row (None: no limit)")


def is_transient(error: BaseException) -> bool:
    """Whether another attempt may succeed."""
    return not isinstance(error, PERMANENT_ERRORS)


def backoff_delay(attempt: int, config: FetchConfig, rng: random.Random) -> float:
    """Wait before attempt `attempt + 1`: full jitter over an exponential cap.

    Full jitter spreads the retries of many workers hit by the same throttling burst, so they do
    not come back in lockstep.
    """
    cap = min(config.backoff_max_s, config.backoff_base_s * (2 ** (attempt - 1)))
    return rng.uniform(0.0, cap)


def describe_error(error: BaseException) -> str:
    text = str(error).strip() or repr(error)
    return f"{type(error).__name__}: {text}"


def s3_options_single_attempt(storage_options: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """s3fs options with s3fs and botocore retries off, no HEAD before each GET, timeouts set (see module docstring).

    Values the caller set explicitly win. The botocore connection pool is sized by the caller's
    concurrency in `FetchImages`, or requests would queue behind botocore's default of 10.
    """
    options = copy.deepcopy(storage_options)
    options["skip_instance_cache"] = True
    options.setdefault("max_concurrency", 1)
    config_kwargs = options.setdefault("config_kwargs", {})
    config_kwargs.setdefault("retries", {"total_max_attempts": 1})
    config_kwargs.setdefault("connect_timeout", timeout_s)
    config_kwargs.setdefault("read_timeout", timeout_s)
    return options


def object_column(values: list[Any]) -> np.ndarray:
    """A 1-D object array (numpy would otherwise guess a fixed-width or 2-D dtype)."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


class FetchImages:
    """Ray Data batch UDF: `uri` column in; `uri`, `image_bytes`, `fetch_error`, `fetch_attempts` out.

    Other input columns pass through. `image_bytes` is empty and `fetch_error` names the URI and the
    cause when the object could not be read; `fetch_error` is "" on success.

    Use as `ds.map_batches(FetchImages, fn_constructor_kwargs={"config": cfg}, concurrency=n)` or
    call an instance directly on a dict of numpy arrays.
    """

    def __init__(
        self,
        config: FetchConfig | dict[str, Any] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ) -> None:
        self.config = FetchConfig.model_validate(config or {})
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._filesystems: dict[str, Any] = {}
        self._fs_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def filesystem(self, uri: str):
        """One fsspec filesystem per protocol, created in the worker (not pickled with the UDF)."""
        protocol = uri.split("://", 1)[0] if "://" in uri else "file"
        with self._fs_lock:
            if protocol not in self._filesystems:
                options = self.config.storage_options
                if protocol in ("s3", "s3a"):
                    options = s3_options_single_attempt(options, self.config.timeout_s)
                    options["config_kwargs"].setdefault("max_pool_connections", self.config.max_concurrency)
                fs, _ = url_to_fs(uri, **options)
                if protocol in ("s3", "s3a"):
                    fs.retries = 1
                self._filesystems[protocol] = fs
            return self._filesystems[protocol]

    def fetch_one(self, uri: str) -> tuple[bytes, str, int]:
        """(bytes, error, attempts) for one URI; never raises for a read failure."""
        try:
            fs = self.filesystem(uri)
        except ValueError as exc:  # e.g. an unknown protocol in a manifest line: this row's fault
            return b"", f"{uri}: {describe_error(exc)}", 0
        attempt = 0
        while True:
            attempt += 1
            try:
                data = fs.cat_file(fs._strip_protocol(uri))
            except BUG_ERRORS:
                raise
            except Exception as exc:
                if not is_transient(exc):
                    return b"", f"{uri}: {describe_error(exc)}", attempt
                if attempt >= self.config.max_attempts:
                    return b"", f"{uri}: gave up after {attempt} attempts: {describe_error(exc)}", attempt
                with self._rng_lock:
                    delay = backoff_delay(attempt, self.config, self._rng)
                self._sleep(delay)
                continue
            if self.config.max_bytes is not None and len(data) > self.config.max_bytes:
                return b"", f"{uri}: object is {len(data)} bytes, over max_bytes {self.config.max_bytes}", attempt
            return bytes(data), "", attempt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "uri" not in batch:
            raise KeyError(f"fetch stage needs a 'uri' column; batch has {sorted(batch)}")
        uris = [str(u) for u in batch["uri"]]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="fetch")
        results = list(self._pool.map(self.fetch_one, uris))
        out = {k: v for k, v in batch.items() if k not in FETCH_COLUMNS}
        out["uri"] = np.array(uris, dtype=object)
        out["image_bytes"] = object_column([r[0] for r in results])
        out["fetch_error"] = object_column([r[1] for r in results])
        out["fetch_attempts"] = np.array([r[2] for r in results], dtype=np.int64)
        return out

    def __del__(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
