"""Asynchronous jobs over HTTP: `POST /v1/videos` (and an image body with `"async": true`) answers 202 with a job;
`GET /v1/videos` lists the jobs the server remembers, `GET …/{id}` one's status and progress, `GET …/{id}/content`
the file, `GET /v1/videos/{id}/clips/{k}` clip k of a clip-parallel video as soon as it is decoded, `DELETE …/{id}`
cancels it between steps (or deletes a finished job's files).

A job is OpenAI's video job object: `{id, object, model, status (queued, in_progress, completed, failed, cancelled),
progress (percent), created_at, completed_at, error}`, with paragen's `{step, steps, clips, clips_ready, report}`.
Jobs survive their client: the ranks make them whether or not anyone polls. The server remembers the last
`front.KEPT_JOBS` finished jobs; an older (or a previous server's) job is found by its report in `--out`, named by its
id. An image job batched with others (`--max-batch`) is made with its batch: a DELETE stops the batch between steps
once every request in it is cancelled, else the job completes. A cancelled or failed job has no content: the job
writes its outputs only once the whole request is made, and a clip file is written only once the clip is whole.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from paragen.launch.serve.front import COMPLETED, Front, Outcome, Ticket
from paragen.pipelines.jobs import schema

MEDIA_TYPES = {".png": "image/png", ".mp4": "video/mp4", ".gif": "image/gif"}


def job_object(kind: str, model: str, ticket: Ticket | None, report: dict | None = None,
               job_id: str | None = None) -> dict:
    """The job's state as the client sees it: from the ticket this server holds, or from a report found on disk."""
    if ticket is None:  # finished before this server remembered it: its report in --out
        return {"id": job_id, "object": kind, "model": model, "status": COMPLETED, "progress": 100,
                "created_at": None, "completed_at": None, "error": None, "paragen": {"report": report}}
    progress = dict(ticket.progress)
    steps, step = progress.get("steps"), progress.get("step")
    percent = 100 if ticket.state == COMPLETED else (int(100 * step / steps) if steps else 0)
    error = None
    if ticket.future.done() and ticket.future.exception() is not None:
        failure = ticket.future.exception()
        error = {"code": getattr(failure, "status", 500), "message": str(failure)}
    files = progress.get("clip_files") or []  # one entry a clip, its path once written
    return {"id": ticket.id, "object": kind, "model": model, "status": ticket.state, "progress": percent,
            "created_at": int(ticket.created),
            "completed_at": None if ticket.finished is None else int(ticket.finished),
            "error": error,
            "paragen": {"step": step, "steps": steps, "clips": len(files) or None,
                        "clips_ready": [k for k, path in enumerate(files) if path is not None],
                        "report": ticket.future.result() if ticket.state == COMPLETED else None}}


def add_job_routes(app: FastAPI, path: str, kind: str, output: str, model: str, front: Front, out_dir: str,
                   authorize: Any) -> None:
    """The routes of the asynchronous `kind` jobs under `path` (`/v1/videos`): status, content, clips, cancel.
    `output` is the report's key of the written file; `authorize(request)` checks the API key."""
    def find(job_id: str) -> tuple[Ticket | None, dict | None]:
        """The job's ticket, or its report in --out; 404 when neither."""
        try:
            schema.check_id(job_id)
        except ValueError as error:
            raise Outcome(404, str(error)) from None
        ticket = front.job(job_id)
        if ticket is not None:
            return ticket, None
        report = Path(out_dir) / f"{job_id}.json"
        if report.is_file():
            return None, json.loads(report.read_text())
        raise Outcome(404, f"no {kind} job {job_id!r} on this server or in its output folder")

    async def status(job_id: str, request: Request) -> JSONResponse:
        authorize(request)
        ticket, report = find(job_id)
        return JSONResponse(job_object(kind, model, ticket, report, job_id))

    async def content(job_id: str, request: Request) -> FileResponse:
        authorize(request)
        ticket, report = find(job_id)
        if ticket is not None:
            if ticket.state != COMPLETED:
                raise Outcome(409, f"job {job_id!r} is {ticket.state}: it has no content"
                                   + ("" if ticket.finished else " yet"))
            report = ticket.future.result()
        return _file(Path(report[output]))

    async def clip(job_id: str, index: int, request: Request) -> FileResponse:
        authorize(request)
        ticket, report = find(job_id)
        files = (ticket.progress.get("clip_files") if ticket is not None else report.get("clip_files")) or []
        finished = ticket is None or ticket.finished is not None
        if finished and ticket is not None and ticket.state != COMPLETED:
            raise Outcome(409, f"job {job_id!r} is {ticket.state}: its clips were removed")
        if not files:  # none decoded yet, or none at all
            if finished:
                raise Outcome(404, f"job {job_id!r} streams no clips (its model decodes the video whole)")
            raise Outcome(409, f"job {job_id!r} has decoded no clip yet; poll the job's clips_ready")
        if not 0 <= index < len(files):
            raise Outcome(404, f"job {job_id!r} has {len(files)} clips; clip {index} is not one of them")
        if files[index] is None:
            raise Outcome(409, f"clip {index} of job {job_id!r} is not decoded yet; poll the job's clips_ready")
        return _file(Path(files[index]))

    async def cancel(job_id: str, request: Request) -> JSONResponse:
        authorize(request)
        ticket, report = find(job_id)
        if ticket is not None and ticket.finished is None:
            front.cancel([ticket], "cancelled by DELETE")
            return JSONResponse(job_object(kind, model, ticket))
        _delete_outputs(job_id, report if ticket is None else
                        (ticket.future.result() if ticket.state == COMPLETED else None), output)
        front.forget(job_id)
        return JSONResponse({"id": job_id, "object": kind, "deleted": True})

    async def listed(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [job_object(kind, model, ticket) for ticket in front.jobs()]})

    app.add_api_route(path, listed, methods=["GET"])
    app.add_api_route(f"{path}/{{job_id}}", status, methods=["GET"])
    app.add_api_route(f"{path}/{{job_id}}/content", content, methods=["GET"])
    app.add_api_route(f"{path}/{{job_id}}/clips/{{index}}", clip, methods=["GET"])
    app.add_api_route(f"{path}/{{job_id}}", cancel, methods=["DELETE"])


def _file(path: Path) -> FileResponse:
    if not path.is_file():
        raise Outcome(410, f"{path.name} is no longer in the output folder")
    return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"))


def _delete_outputs(job_id: str, report: dict | None, output: str) -> None:
    """A finished job's files: its output, its clips and its report."""
    if report is None:
        return
    for name in [report.get(output), *(report.get("clip_files") or []), str(Path(report[output]).with_suffix(".json"))
                 if report.get(output) else None]:
        if name:
            Path(name).unlink(missing_ok=True)


def accepted(kind: str, model: str, ticket: Ticket, path: str) -> JSONResponse:
    """202 with the new job, located under `path`."""
    return JSONResponse(job_object(kind, model, ticket), status_code=202,
                        headers={"Location": f"{path}/{ticket.id}", "Retry-After": "1"})


__all__ = ["accepted", "add_job_routes", "job_object"]
