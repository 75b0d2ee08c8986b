"""The ASGI app: OpenAI's Files and Batches endpoints as the official `openai` SDK calls them.

    POST   /v1/files                   upload (multipart: file, purpose=batch)
    GET    /v1/files                   list (after, limit, order, purpose)
    GET    /v1/files/{id}              one file
    GET    /v1/files/{id}/content      its bytes
    DELETE /v1/files/{id}              delete it
    POST   /v1/batches                 create (input_file_id, endpoint, completion_window, metadata)
    GET    /v1/batches                 list, newest first (after, limit)
    GET    /v1/batches/{id}            one batch
    POST   /v1/batches/{id}/cancel     cancel it
    GET    /v1/models                  the model names a request may give
    GET    /health                     readiness (no key)

Every /v1 call needs `Authorization: Bearer <key>`; errors have OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`). A sweeper thread observes the active batches
every `sweep_every_s` (expiry, recovery of runs whose process is gone, output files).

Deploy it with any ASGI server, next to a Prefect worker that runs the batch deployment:
    RAYLLM_API_CONFIG=api.yaml uvicorn --factory prefect_rayllm.flows.api.app:app_from_env
(`rayllm api` runs it and, by default, serves the batch deployment in the same process.)
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefect_rayllm.flows.api.config import ApiConfig, load_api_config, resolve_bearer_key
from prefect_rayllm.flows.api.runs import BatchRuns
from prefect_rayllm.flows.api.service import ApiError, BatchService
from prefect_rayllm.rayllm_stages.batch_api.objects import Batch, FileDeleted, FileObject, Page

logger = logging.getLogger("prefect_rayllm.api")
CONFIG_ENV = "RAYLLM_API_CONFIG"


class CreateBatch(BaseModel):
    """`POST /v1/batches` (`openai.types.BatchCreateParams`); `output_expires_after` is accepted and not applied."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None = None
    output_expires_after: dict[str, Any] | None = None


def create_app(config: ApiConfig, key: str, runs: BatchRuns | None = None, sweep: bool = True) -> FastAPI:
    """The API over `config`'s store, for callers presenting `key`.

    Args:
        runs: the batch deployment's runs (default: `config.deployment`, run by workers).
        sweep: run the sweeper thread while the app is up.
    """
    service = BatchService(config, runs or BatchRuns(config.deployment, stale_after_s=config.stale_after_s))
    expected = key.encode()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        sweeper = threading.Thread(
            target=_sweep_until, args=(service, config.sweep_every_s, stop), name="batch-sweeper", daemon=True
        )
        if sweep:
            sweeper.start()
        try:
            yield
        finally:
            stop.set()
            if sweep:
                sweeper.join(timeout=30)

    def authorized(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise ApiError(
                401,
                "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                code="invalid_api_key",
                type="authentication_error",
            )

    app = FastAPI(title="prefect-rayllm Batch API", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    v1 = [Depends(authorized)]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        error = ApiError(
            400, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request", param=where or None
        )
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=v1)
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "rayllm"} for name in sorted(config.models)],
        }

    @app.post("/v1/files", dependencies=v1)
    def upload_file(file: UploadFile = File(...), purpose: str = Form(...)) -> FileObject:
        return service.upload(file.file, file.filename or "upload.jsonl", purpose)

    @app.get("/v1/files", dependencies=v1)
    def list_files(after: str | None = None, limit: int = 10000, order: str = "desc", purpose: str | None = None) -> Page:
        return service.files(after, limit, order, purpose)

    @app.get("/v1/files/{file_id}", dependencies=v1)
    def get_file(file_id: str) -> FileObject:
        return service.file(file_id)

    @app.get("/v1/files/{file_id}/content", dependencies=v1)
    def file_content(file_id: str) -> StreamingResponse:
        record, chunks = service.content(file_id)
        return StreamingResponse(
            chunks,
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{record.filename}"'},
        )

    @app.delete("/v1/files/{file_id}", dependencies=v1)
    def delete_file(file_id: str) -> FileDeleted:
        return service.delete_file(file_id)

    @app.post("/v1/batches", dependencies=v1)
    def create_batch(body: CreateBatch) -> Batch:
        return service.create_batch(body.input_file_id, body.endpoint, body.completion_window, body.metadata)

    @app.get("/v1/batches", dependencies=v1)
    def list_batches(after: str | None = None, limit: int = 20) -> Page:
        return service.batches(after, limit)

    @app.get("/v1/batches/{batch_id}", dependencies=v1)
    def get_batch(batch_id: str) -> Batch:
        return service.batch(batch_id)

    @app.post("/v1/batches/{batch_id}/cancel", dependencies=v1)
    def cancel_batch(batch_id: str) -> Batch:
        return service.cancel(batch_id)

    return app


def app_from_env() -> FastAPI:
    """The app for an ASGI server (`uvicorn --factory prefect_rayllm.flows.api.app:app_from_env`):
    its config from the file named by RAYLLM_API_CONFIG; batches run by the deployment's workers."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"set {CONFIG_ENV} to the API's config file (YAML)")
    config = load_api_config(path)
    return create_app(config, resolve_bearer_key(config))


def _sweep_until(service: BatchService, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        service.sweep()
