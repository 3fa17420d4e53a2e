"""The ranks' side of `paragen serve`: rounds in which the output rank hands out its next request and every rank
says whether it was asked to stop; then every rank makes the request together.

A round is one small all-gather over the world: the output rank's ticket (or nothing, after `heartbeat_s` idle
seconds, so that no collective waits past `--timeout`) and each rank's stop flag. Any rank's SIGTERM stops every
rank at the next round, after the request in flight. A request is checked on every rank and the verdicts
exchanged before any rank starts it, and after it every rank says how it went: a refusal (ValueError/TypeError,
the user's input) answers 400, a failure on any rank (an output that could not be written, …) 500, and the
server goes on. A failed collective (a dead or stuck rank) leaves the process group unusable: it propagates.
"""
from __future__ import annotations

import threading
import time
import traceback

from paragen.comms import all_gather_objects, world_comm
from paragen.launch.runner import JobRunner
from paragen.launch.serve.front import Front, Outcome, Ticket
from paragen.log import get_logger

REFUSED, FAILED = "refused", "failed"


def serve_ranks(runner: JobRunner, front: Front | None, stopping: threading.Event, heartbeat_s: float) -> None:
    """Make the requests `front` (the output rank's; None elsewhere) hands out until some rank sets `stopping`."""
    comm = world_comm()
    ticket: Ticket | None = None
    try:
        while True:
            ticket = front.next(heartbeat_s, stopping) if front is not None else None
            message = None if ticket is None else (ticket.id, ticket.request)
            votes = all_gather_objects(comm, (message, stopping.is_set()))
            if any(stop for _, stop in votes):
                if ticket is not None:
                    front.finish(ticket, outcome=Outcome(503, "the server is stopping"))
                return
            if votes[0][0] is None:
                continue
            request_id, request = votes[0][0]
            started = time.perf_counter()
            report, outcome = _make(runner, comm, request)
            if ticket is not None:
                _log(request_id, outcome, time.perf_counter() - started)
                front.finish(ticket, report, outcome, time.perf_counter() - started)
                ticket = None
    except BaseException:
        if ticket is not None:
            front.finish(ticket, outcome=Outcome(503, "a rank failed while making this request; the server stops"))
        raise


def _make(runner: JobRunner, comm, request) -> tuple[dict | None, Outcome | None]:
    """Check `request` on every rank, then (if every rank agrees) make it; its report, or why not."""
    item, verdict = _attempt(runner.check, request)
    verdicts = all_gather_objects(comm, verdict)
    if any(verdicts):
        return None, _outcome(verdicts)
    report, verdict = _attempt(runner.generate, item)
    verdicts = all_gather_objects(comm, verdict)
    return (report, None) if not any(verdicts) else (None, _outcome(verdicts))


def _attempt(step, value):
    """`step(value)` and None, or None and this rank's verdict: (REFUSED | FAILED, message)."""
    try:
        return step(value), None
    except (ValueError, TypeError) as error:
        return None, (REFUSED, str(error))
    except Exception as error:  # noqa: BLE001 — reported to the client; a broken group fails the next round
        get_logger().error("request failed on this rank:\n%s", traceback.format_exc())
        return None, (FAILED, f"{type(error).__name__}: {error}")


def _outcome(verdicts: list) -> Outcome:
    """400 when every failing rank refused the request, else 500 naming each failing rank."""
    failing = [(rank, verdict) for rank, verdict in enumerate(verdicts) if verdict is not None]
    if all(kind == REFUSED for _, (kind, _) in failing):
        return Outcome(400, failing[0][1][1])
    return Outcome(500, "; ".join(f"rank {rank}: {message}" for rank, (_, message) in failing))


def _log(request_id: str, outcome: Outcome | None, seconds: float) -> None:
    status = 200 if outcome is None else outcome.status
    detail = "" if outcome is None else f": {outcome.message}"
    get_logger().info("request %s: %d in %.2f s%s", request_id, status, seconds, detail)
