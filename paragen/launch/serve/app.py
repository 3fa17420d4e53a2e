"""The HTTP front of `paragen serve` (FastAPI, run by uvicorn in a thread of the output rank).

Routes: the served job's endpoint (`api.ENDPOINTS`), `GET /health` (200 while serving, 503 while loading,
stopping or broken) and `GET /metrics` (Prometheus text). The other jobs' endpoints answer 404 saying which job
this server runs. With an API key, the job's endpoint wants `Authorization: Bearer <key>`; health and metrics
stay open. Errors come back in OpenAI's shape, `{"error": {"message", "type", "code"}}`.
"""
from __future__ import annotations

import asyncio
import hmac
import uuid
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from paragen.launch.serve.api import ENDPOINTS, Endpoint
from paragen.launch.serve.front import Front, Outcome, Ticket

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 409: "conflict_error", 429: "server_busy", 500: "server_error",
               503: "unavailable"}


def error_response(status: int, message: str) -> JSONResponse:
    """An error in OpenAI's shape."""
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "code": status}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
        if problem.get("type") == "json_invalid":
            return f"the body is not valid JSON: {problem.get('ctx', {}).get('error', problem.get('msg'))}"
        parts.append(f"{where or 'body'}: {problem.get('msg')}")
    return "; ".join(parts)


def build_app(job: str, model: str, runner: Any, front: Front, out_dir: str, check_lock: Any,
              api_key: str | None) -> FastAPI:
    """The app serving `job` (`model` as clients name it) through `runner`'s checks and `front`'s queue."""
    app = FastAPI(title="paragen", docs_url=None, redoc_url=None, openapi_url=None)
    endpoint = ENDPOINTS[job]

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(400, _validation_message(error))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Outcome)
    async def outcome(_: Request, error: Outcome) -> JSONResponse:
        return error_response(error.status, error.message)

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = front.health()
        return JSONResponse({**body, "job": job, "model": model}, status_code=status)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(front.metrics(), media_type="text/plain; version=0.0.4")

    for name, other in ENDPOINTS.items():
        if name != job:
            app.add_api_route(other.path, _elsewhere(name, job, endpoint), methods=["POST"])
    make = _maker(endpoint, model, runner, front, out_dir, check_lock)

    async def generate(request: Request, body) -> JSONResponse:
        _authorize(request, api_key)
        return JSONResponse(await make(body))

    generate.__annotations__ = {"request": Request, "body": endpoint.body, "return": JSONResponse}  # FastAPI reads it
    app.add_api_route(endpoint.path, generate, methods=["POST"])
    return app


def _elsewhere(name: str, job: str, endpoint: Endpoint) -> Callable:
    async def not_here() -> JSONResponse:
        return error_response(404, f"this server runs the {job} job (POST {endpoint.path}), not {name}")
    return not_here


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise Outcome(401, "missing or wrong API key (Authorization: Bearer <key>)")


def _maker(endpoint: Endpoint, model: str, runner: Any, front: Front, out_dir: str, check_lock: Any) -> Callable:
    """The coroutine that turns a checked body into job requests, queues them, and waits for their reports."""

    def tickets(body) -> tuple[str, list[Ticket]]:
        if body.model is not None and body.model not in (model, runner.job.request.model):
            raise Outcome(404, f"model {body.model!r} is not served here (this server runs {model!r})")
        request_id = body.id or uuid.uuid4().hex[:16]
        fields = endpoint.fields(body)
        ids = [request_id] if len(fields) == 1 else [f"{request_id}-{i}" for i in range(len(fields))]
        out = []
        for one_id, one in zip(ids, fields):
            if (Path(out_dir) / f"{one_id}.json").exists():
                raise Outcome(409, f"id {one_id!r} already names outputs in {out_dir}; pick another id")
            try:
                request = runner.request(**one, name=one_id)
                with check_lock:  # the ranks' loop checks on this rank too; tokenizers are not thread-safe
                    runner.check(request)
            except (ValueError, TypeError) as error:
                raise Outcome(400, str(error)) from None
            out.append(Ticket(one_id, request))
        return request_id, out

    async def make(body) -> dict:
        request_id, made = await run_in_threadpool(tickets, body)
        futures = front.submit(made)
        reports = [await asyncio.wrap_future(future) for future in futures]
        return await run_in_threadpool(endpoint.response, request_id, model, reports)

    return make
