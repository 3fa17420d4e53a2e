"""The ranks' side of `paragen serve`: rounds in which the output rank hands out its next batch of requests and every
rank says whether it was asked to stop; then every rank makes the batch together.

A round is one small all-gather over the world: the output rank's batch (or nothing, after `heartbeat_s` idle
seconds, so that no collective waits past `--timeout`) and each rank's stop flag. Any rank's SIGTERM stops every
rank at the next round, after the batch in flight. Each request is checked on every rank and the verdicts
gathered before any rank starts the batch, and after it every rank says how it went
(`paragen.pipelines.jobs.agree`): a refusal (the user's input, or some rank's room) answers that request 400 and the
rest of its batch is made; a failure on any rank (an output that could not be written, …) answers the batch 500, and
the server goes on. Between its steps the ranks ask the output rank whether the request's
clients are still there (one broadcast a step); when all have gone, every rank stops the batch at that step (499,
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
    """Make the batches `front` (the output rank's; None elsewhere) hands out until some rank sets `stopping`."""
    comm = world_comm()
    batch: list[Ticket] = []
    try:
        while True:
            batch = (front.next(heartbeat_s, stopping) or []) if front is not None else []
            message = [(ticket.id, ticket.request) for ticket in batch] or None
            votes = all_gather_objects(comm, (message, stopping.is_set()))
            if any(stop for _, stop in votes):
                for ticket in batch:
                    front.finish(ticket, outcome=Outcome(503, "the server is stopping"))
                return
            if votes[0][0] is None:
                continue
            ids, requests = zip(*votes[0][0])
            started = time.perf_counter()
            results = _make(runner, comm, list(requests), _watch(comm, batch))
            seconds = time.perf_counter() - started
            for index, (request_id, (report, outcome)) in enumerate(zip(ids, results)):
                if front is not None:
                    _log(request_id, outcome, seconds, len(ids))
                    front.finish(batch[index], report, outcome, seconds)
            batch = []
    except BaseException:
        for ticket in batch:
            if not ticket.future.done():
                front.finish(ticket, outcome=Outcome(503, "a rank failed while making this request; the server stops"))
        raise


def _watch(comm, batch: list[Ticket]) -> Watch:
    """How the ranks follow a batch: stopped between steps once every one of its clients has gone (decided on the
    output rank, broadcast), and on the output rank its progress, a single streamed answer's tokens, and a video's
    clips as they are written."""
    interrupt = broadcast_stop(comm, lambda: bool(batch) and all(ticket.cancelled for ticket in batch))
    if not batch:
        return Watch(interrupt)

    def on_step(step: int, steps: int) -> None:
        for ticket in batch:
            ticket.on_step(step, steps)

    return Watch(interrupt, on_tokens=batch[0].on_tokens if len(batch) == 1 else None, on_step=on_step,
                 on_clip=batch[0].on_clip if len(batch) == 1 else None)


def _make(runner: JobRunner, comm, requests: list, watch: Watch) -> list[tuple[dict | None, Outcome | None]]:
    """Check each request on every rank, then (where every rank agrees) make those together, followed by `watch`
    (stopped between steps when every client has gone; a single answer's tokens streamed); each one's report, or why
    not."""
    results: list[tuple[dict | None, Outcome | None]] = [(None, None)] * len(requests)
    items, kept = [], []
    for index, request in enumerate(requests):
        try:
            items.append(runner.checked(request))
            kept.append(index)
        except RequestRefused as error:
            results[index] = (None, Outcome(400, str(error)))
    if not items:
        return results
    try:
        reports = agreed(comm, lambda checked: runner.generate_batch(checked, watch), items)
        for place, index in enumerate(kept):
            results[index] = (None if reports is None else reports[place], None)
        return results
    except RequestRefused as error:
        failure = Outcome(400, str(error))
    except RequestCancelled as error:
        failure = Outcome(CLIENT_GONE, str(error))  # the front adds why (the client went away, a DELETE)
    except RequestFailed as error:
        failure = Outcome(500, str(error))
    for index in kept:
        results[index] = (None, failure)
    return results


def _log(request_id: str, outcome: Outcome | None, seconds: float, batch: int) -> None:
    status = 200 if outcome is None else outcome.status
    detail = "" if outcome is None else f": {outcome.message}"
    together = f" (in a batch of {batch})" if batch > 1 else ""
    get_logger().info("request %s: %d in %.2f s%s%s", request_id, status, seconds, together, detail)
