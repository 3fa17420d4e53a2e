"""The ranks' side of `paragen serve`: rounds in which the output rank hands out its next request and every rank
says whether it was asked to stop; then every rank makes the request together.

A round is one small all-gather over the world: the output rank's ticket (or nothing, after `heartbeat_s` idle
seconds, so that no collective waits past `--timeout`) and each rank's stop flag. Any rank's SIGTERM stops every
rank at the next round, after the request in flight. A request is checked on every rank and the verdicts
gathered before any rank starts it, and after it every rank says how it went (`paragen.pipelines.jobs.agree`): a
refusal (the user's input, or some rank's room) answers 400, a failure on any rank (an output that could not be
written, …) 500, and the server goes on. Between its steps the ranks ask the output rank whether the request's
client is still there (one broadcast a step); when it has gone, every rank stops the request at that step (499,
nothing written). A failed collective (a dead or stuck rank) leaves the process group unusable: it propagates.
"""
from __future__ import annotations

import threading
import time

from paragen.comms import all_gather_objects, world_comm
from paragen.launch.runner import JobRunner
from paragen.launch.serve.front import CLIENT_GONE, Front, Outcome, Ticket
from paragen.log import get_logger
from paragen.parallel.interrupt import RequestCancelled, Watch, broadcast_stop
from paragen.pipelines.jobs.agree import RequestFailed, RequestRefused, agreed


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
            watch = Watch(broadcast_stop(comm, lambda made=ticket: made is not None and made.cancelled),
                          None if ticket is None else ticket.on_tokens)
            report, outcome = _make(runner, comm, request, watch)
            if ticket is not None:
                _log(request_id, outcome, time.perf_counter() - started)
                front.finish(ticket, report, outcome, time.perf_counter() - started)
                ticket = None
    except BaseException:
        if ticket is not None:
            front.finish(ticket, outcome=Outcome(503, "a rank failed while making this request; the server stops"))
        raise


def _make(runner: JobRunner, comm, request, watch: Watch) -> tuple[dict | None, Outcome | None]:
    """Check `request` on every rank, then (if every rank agrees) make it, followed by `watch` (stopped between
    steps when its client goes away, its tokens streamed); its report, or why not."""
    try:
        item = runner.checked(request)
        return agreed(comm, lambda checked: runner.generate(checked, watch), item), None
    except RequestRefused as error:
        return None, Outcome(400, str(error))
    except RequestCancelled as error:
        return None, Outcome(CLIENT_GONE, f"{error}: the client went away")
    except RequestFailed as error:
        return None, Outcome(500, str(error))


def _log(request_id: str, outcome: Outcome | None, seconds: float) -> None:
    status = 200 if outcome is None else outcome.status
    detail = "" if outcome is None else f": {outcome.message}"
    get_logger().info("request %s: %d in %.2f s%s", request_id, status, seconds, detail)
