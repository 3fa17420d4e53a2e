"""The HTTP front of `paragen serve` (FastAPI, run by uvicorn in a thread of the output rank).

Routes: the served job's endpoints (`api.ENDPOINTS`; a text endpoint's answer streamed when asked, `stream.py`;
an image or video job's asynchronous jobs, `jobs.py`), `GET /health` (200 while serving, 503 while loading, stopping
or broken) and `GET /metrics` (Prometheus text). The other jobs' endpoints answer 404 saying which job this server
runs. With an API key, the job's endpoints want `Authorization: Bearer <key>`; health and metrics stay open. Every
error, an unexpected one too, comes back as JSON in OpenAI's shape, `{"error": {"message", "type", "code"}}`.

The job's endpoint reads a request in this order, each step before the next costs anything: the API key (401,
before a byte of the body is read), the body's size (413 as soon as its Content-Length, or the bytes read so far,
pass `--max-body-bytes`), its JSON against the job's body schema (400: strict types, finite numbers, no unknown
field), the server's limits (400), the job's own checks (400), then the queue (429, 503). While a request waits or
runs, its connection is watched: a client that goes away has its request dropped from the queue, or stopped by
the ranks at their next step.
"""
from __future__ import annotations

import asyncio
import hmac
import uuid
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from paragen.launch.serve.api import ENDPOINTS, Endpoint, Limits
from paragen.launch.serve.front import Front, Outcome, Ticket
from paragen.launch.serve.jobs import accepted, add_job_routes
from paragen.launch.serve.stream import WATCH_S, TokenFeed, events
from paragen.pipelines.jobs import schema
from paragen.pipelines.jobs.llm_text import TextStream

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 409: "conflict_error", 410: "not_found_error", 413: "invalid_request_error",
               429: "server_busy",
               499: "client_closed_request", 500: "server_error", 503: "unavailable"}


def error_response(status: int, message: str) -> JSONResponse:
    """An error in OpenAI's shape."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(_error_body(Outcome(status, message)), status_code=status, headers=headers)


def _error_body(outcome: Outcome) -> dict:
    return {"error": {"message": outcome.message, "type": ERROR_TYPES.get(outcome.status, "error"),
                      "code": outcome.status}}


def build_app(job: str, model: str, runner: Any, front: Front, out_dir: str, check_lock: Any,
              api_key: str | None, limits: Limits) -> FastAPI:
    """The app serving `job` (`model` as clients name it) through `runner`'s checks and `front`'s queue, within
    `limits`."""
    app = FastAPI(title="paragen", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Outcome)
    async def outcome(_: Request, error: Outcome) -> JSONResponse:
        return error_response(error.status, error.message)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        return error_response(500, f"{type(error).__name__}: {error}")

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = front.health()
        return JSONResponse({**body, "job": job, "model": model}, status_code=status)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(front.metrics(), media_type="text/plain; version=0.0.4")

    for name, others in ENDPOINTS.items():
        for other in others if name != job else ():
            app.add_api_route(other.path, _elsewhere(name, job, ENDPOINTS[job][0]), methods=["POST"])
    for endpoint in ENDPOINTS[job]:
        make = _maker(endpoint, model, runner, front, out_dir, check_lock, limits)
        app.add_api_route(endpoint.path, _route(endpoint, make, api_key, limits), methods=["POST"])
        if endpoint.jobs is not None:
            app.add_api_route(endpoint.jobs, _route(endpoint, make, api_key, limits, background=True), methods=["POST"])
            add_job_routes(app, endpoint.jobs, endpoint.job, endpoint.output, model, front, out_dir,
                           lambda request: _authorize(request, api_key))
    return app


def _route(endpoint: Endpoint, make: Callable, api_key: str | None, limits: Limits,
           background: bool = False) -> Callable:
    """The handler of one endpoint: the API key, the body's size, its schema, then the job (`background`: always as
    an asynchronous job)."""
    body_model = endpoint.body()

    async def generate(request: Request) -> Response:
        _authorize(request, api_key)
        raw = await _read_body(request, limits.body_bytes)
        try:
            body = schema.parse_fields(body_model, raw)
        except ValueError as error:
            raise Outcome(400, str(error)) from None
        return await make(body, request, background)

    return generate


async def _read_body(request: Request, most: int) -> bytes:
    """The request's body, refused (413) as soon as its declared or read length passes `most` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > most):
        raise Outcome(413, f"the body ({declared} bytes) is larger than this server takes (--max-body-bytes {most})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > most:
            raise Outcome(413, f"the body is larger than this server takes (--max-body-bytes {most})")
        chunks.append(chunk)
    return b"".join(chunks)


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


def _maker(endpoint: Endpoint, model: str, runner: Any, front: Front, out_dir: str, check_lock: Any,
           limits: Limits) -> Callable:
    """The coroutine that turns a parsed body into job requests, queues them, and waits for their reports while
    watching the client's connection."""

    def tickets(body) -> tuple[str, list[Ticket], list[Any]]:
        """The body's requests, each checked on this rank (and its checked item) before it is queued."""
        if body.model is not None and body.model not in (model, runner.job.request.model):
            raise Outcome(404, f"model {body.model!r} is not served here (this server runs {model!r})")
        try:
            request_id = schema.check_id(body.id) if body.id is not None else uuid.uuid4().hex[:16]
            fields = endpoint.fields(body)
        except ValueError as error:
            raise Outcome(400, str(error)) from None
        ids = [request_id] if len(fields) == 1 else [f"{request_id}-{i}" for i in range(len(fields))]
        out, items = [], []
        for one_id, one in zip(ids, fields):
            if (Path(out_dir) / f"{one_id}.json").exists():
                raise Outcome(409, f"id {one_id!r} already names outputs in {out_dir}; pick another id")
            try:
                request = runner.request(**one, name=one_id)
                limits.check(request)
                with check_lock:  # the ranks' loop checks on this rank too; tokenizers are not thread-safe
                    items.append(runner.check(request))
            except (ValueError, TypeError) as error:
                raise Outcome(400, str(error)) from None
            out.append(Ticket(one_id, request, key=runner.batch_key(items[-1])))
        return request_id, out, items

    async def make(body, connection: Request, background: bool) -> Response:
        request_id, made, items = await run_in_threadpool(tickets, body)
        if background or getattr(body, "run_async", False):
            made[0].background = True
            front.submit(made)
            return accepted(endpoint.job, model, made[0], endpoint.jobs)
        if getattr(body, "stream", False):
            return stream(body, connection, request_id, made[0], items[0])
        waiting = [asyncio.wrap_future(future) for future in front.submit(made)]
        while not all(future.done() for future in waiting):
            await asyncio.wait(waiting, timeout=WATCH_S)
            if not all(future.done() for future in waiting) and await connection.is_disconnected():
                front.cancel(made, "the client went away")
                await asyncio.wait(waiting)
        reports = [future.result() for future in waiting]
        return JSONResponse(await run_in_threadpool(endpoint.response, request_id, model, reports))

    def stream(body, connection: Request, request_id: str, ticket: Ticket, item: Any) -> StreamingResponse:
        """Queue the ticket with a feed for its tokens; the events of its answer as the ranks decode it."""
        feed = TokenFeed()
        ticket.on_tokens = feed.put
        (future,) = front.submit([ticket])
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        answer = events(endpoint.text, request_id, model, feed, asyncio.wrap_future(future), TextStream(item.tokenizer),
                        include_usage, connection.is_disconnected,
                        lambda: front.cancel([ticket], "the client went away"), _error_body)
        return StreamingResponse(answer, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return make
