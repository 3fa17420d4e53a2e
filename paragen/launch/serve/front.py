"""Between the HTTP thread and the ranks, on the output rank: the queues of requests, the batches the ranks take
from them, the asynchronous jobs and their progress, the server's state and its counters (`/health`, `/metrics`).

Two queues: requests whose client waits on its connection (interactive) and asynchronous jobs (background, `POST
/v1/videos`, `"async": true`), with one bound (`--max-queue`) on all that waits. The ranks take from the interactive
queue first, and from the background one when the interactive one is empty or has been served `FAIR_TURNS` times
while a job waited, so a small request waits behind at most the one job in flight, not the queue of jobs, and no
job starves. A request in flight is never preempted: its state lives in the pipeline's runtime for the length of
the call, and interleaving two requests' steps would need a second copy of it on every rank.

A batch (`--max-batch`, `--batch-wait-ms`) is the queue's first request and the requests behind it in the same queue
with the same batch key (the job's: equal but for prompt, seed and name), in their order, up to `max_batch`; when
fewer are waiting, the ranks wait for more until the first has waited `batch_wait_s`. The output rank decides the
batch here and every rank receives it in the round's message.

A request whose client goes away is dropped from the queue at once (the ranks never see it), or, in flight, marked
so that the ranks stop it at their next step (`paragen.parallel.interrupt`) once every request of its batch is
marked; the others of its batch are made. The server is stopping from the moment a stop signal arrives (`stopping`
is set by the signal handler, read here without a lock): `/health` answers 503 and new requests 503 while the batch
in flight finishes."""
from __future__ import annotations

import collections
import statistics
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

LOADING, SERVING, STOPPING, BROKEN = "loading", "serving", "stopping", "broken"
CLIENT_GONE = 499  # nginx's "client closed request": nobody reads the answer
RECENT = 256  # requests whose times the latency quantiles cover
FAIR_TURNS = 4  # interactive batches the ranks take while a background job waits, before they take the job
KEPT_JOBS = 1024  # finished asynchronous jobs remembered (older ones are still found by their files in --out)
INTERACTIVE, BACKGROUND = "interactive", "background"
QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = "queued", "in_progress", "completed", "failed", "cancelled"


class Outcome(Exception):
    """A request that made nothing, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(eq=False)
class Ticket:
    """One job request waiting for, or being made by, the ranks."""

    id: str
    request: Any  # the job's request (a frozen dataclass: it travels to every rank)
    future: Future = field(default_factory=Future)  # the report, or an Outcome
    queued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # its client went away: the ranks stop it at their next step
    reason: str = ""  # why it was cancelled
    on_tokens: Callable[[list[int]], None] | None = None  # a streamed answer's feed (the ranks' thread calls it)
    key: Any = None  # its batch key (None: made alone); tickets of one queue with equal keys may be made together
    background: bool = False  # an asynchronous job, in the background queue and kept after it finishes
    state: str = QUEUED
    progress: dict = field(default_factory=dict)  # step, steps, clip_files (the ranks' thread writes it)
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def on_step(self, step: int, steps: int) -> None:
        """The ranks are about to make step `step` of `steps` (the ranks' thread)."""
        self.progress.update(step=step, steps=steps)

    def on_clip(self, index: int, count: int, path: str) -> None:
        """Clip `index` of `count` was written to `path` (the ranks' thread)."""
        files = list(self.progress.get("clip_files", [None] * count))
        files[index] = path
        self.progress["clip_files"] = files


class Front:
    """The output rank's queues of tickets (at most `max_queue` waiting in all), the batches the ranks take (at most
    `max_batch` tickets; waiting up to `batch_wait_s` for more), the asynchronous jobs, and the server's state;
    `stopping` is set by the stop signal's handler."""

    def __init__(self, max_queue: int, stopping: threading.Event | None = None, max_batch: int = 1,
                 batch_wait_s: float = 0.0) -> None:
        self._queues: dict[str, collections.deque[Ticket]] = {INTERACTIVE: collections.deque(),
                                                                BACKGROUND: collections.deque()}
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._max_queue, self._max_batch, self._batch_wait_s = max_queue, max_batch, batch_wait_s
        self._stopping = stopping or threading.Event()
        self._active: set[str] = set()  # ids queued or being made
        self._jobs: collections.OrderedDict[str, Ticket] = collections.OrderedDict()  # asynchronous, by id
        self._turns = 0  # interactive batches taken while a background job waited
        self._state, self._reason = LOADING, "loading the model"
        self.in_flight: list[Ticket] = []
        self.counts = {"ok": 0, "refused": 0, "failed": 0, "unavailable": 0, "cancelled": 0}
        self.batches = {"batches": 0, "requests": 0}
        self._times = {"request": _Times(), "generate": _Times()}

    @property
    def state(self) -> str:
        """loading, serving, stopping (from the stop signal on) or broken."""
        return STOPPING if self._stopping.is_set() and self._state in (LOADING, SERVING) else self._state

    @property
    def reason(self) -> str:
        return "a stop signal arrived" if self.state == STOPPING and self._state != STOPPING else self._reason

    def _waiting(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    # ---- the HTTP side ---------------------------------------------------------------------------
    def submit(self, tickets: list[Ticket]) -> list[Future]:
        """Queue all `tickets` or none: Outcome 503 when the server does not take work, 400 when they can never fit
        the queue, 429 when it has no room for them now, 409 when an id is already queued, being made, or names a
        job this server remembers."""
        with self._lock:
            if self.state != SERVING:
                raise Outcome(503, f"the server is {self.state}: {self.reason}")
            if len(tickets) > self._max_queue:
                raise Outcome(400, f"{len(tickets)} requests at once are more than the queue holds "
                                   f"({self._max_queue}); ask for at most {self._max_queue}")
            if self._waiting() + len(tickets) > self._max_queue:
                raise Outcome(429, f"the queue ({self._max_queue} requests) is full; try again later")
            busy = [ticket.id for ticket in tickets if ticket.id in self._active or ticket.id in self._jobs]
            if busy:
                raise Outcome(409, f"id {busy[0]!r} is queued, being made, or names a job")
            for ticket in tickets:
                self._active.add(ticket.id)
                self._queues[BACKGROUND if ticket.background else INTERACTIVE].append(ticket)
                if ticket.background:
                    self._jobs[ticket.id] = ticket
            self._forget_old_jobs()
            self._arrived.notify()
        return [ticket.future for ticket in tickets]

    def cancel(self, tickets: list[Ticket], reason: str) -> None:
        """Their client went away (or cancelled the job): drop the queued ones now (the ranks never see them), mark
        those in flight so that the ranks stop them at their next step."""
        dropped = []
        with self._lock:
            for ticket in tickets:
                ticket.cancelled, ticket.reason = True, reason
                for queue in self._queues.values():
                    if ticket in queue:
                        queue.remove(ticket)
                        dropped.append(ticket)
        for ticket in dropped:
            self.finish(ticket, outcome=Outcome(CLIENT_GONE, f"dropped from the queue: {reason}"))

    def job(self, job_id: str) -> Ticket | None:
        """The asynchronous job of that id this server remembers (None: none)."""
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Ticket]:
        """The asynchronous jobs this server remembers, oldest first."""
        with self._lock:
            return list(self._jobs.values())

    def forget(self, job_id: str) -> None:
        """Forget a finished job (its files were deleted)."""
        with self._lock:
            ticket = self._jobs.get(job_id)
            if ticket is not None and ticket.finished is not None:
                del self._jobs[job_id]

    def health(self) -> tuple[int, dict]:
        """The HTTP status of `/health` (200 only while serving) and its body."""
        with self._lock:
            state = self.state
            body = {"status": state, "queue": self._waiting(), "in_flight": bool(self.in_flight),
                    **({"reason": self.reason} if state != SERVING else {})}
        return (200 if state == SERVING else 503), body

    def metrics(self) -> str:
        """The counters in Prometheus' text format."""
        with self._lock:
            counts, times = dict(self.counts), {name: _Times(**vars(t)) for name, t in self._times.items()}
            queues = {name: len(queue) for name, queue in self._queues.items()}
            busy, up, batches = len(self.in_flight), int(self.state == SERVING), dict(self.batches)
            jobs = collections.Counter(ticket.state for ticket in self._jobs.values())
        lines = ["# HELP paragen_up 1 while the server takes requests.", "# TYPE paragen_up gauge", f"paragen_up {up}",
                 "# HELP paragen_queue_length Requests waiting for the ranks.", "# TYPE paragen_queue_length gauge",
                 f"paragen_queue_length {sum(queues.values())}",
                 *(f'paragen_queue_length{{queue="{name}"}} {count}' for name, count in queues.items()),
                 "# HELP paragen_in_flight Requests the ranks are making.", "# TYPE paragen_in_flight gauge",
                 f"paragen_in_flight {busy}",
                 "# HELP paragen_batches_total Batches the ranks made.", "# TYPE paragen_batches_total counter",
                 f"paragen_batches_total {batches['batches']}",
                 "# HELP paragen_batched_requests_total Requests in those batches.",
                 "# TYPE paragen_batched_requests_total counter",
                 f"paragen_batched_requests_total {batches['requests']}",
                 "# HELP paragen_jobs Asynchronous jobs remembered, by state.", "# TYPE paragen_jobs gauge",
                 *(f'paragen_jobs{{state="{state}"}} {jobs.get(state, 0)}'
                   for state in (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED)),
                 "# HELP paragen_requests_total Requests finished, by outcome.", "# TYPE paragen_requests_total counter"]
        lines += [f'paragen_requests_total{{outcome="{name}"}} {count}' for name, count in counts.items()]
        lines += times["request"].summary("paragen_request_seconds", "Seconds from queueing to the result.")
        lines += times["generate"].summary("paragen_generate_seconds", "Seconds the ranks spent making a request.")
        return "\n".join(lines) + "\n"

    # ---- the ranks' side -------------------------------------------------------------------------
    def open(self) -> None:
        """Take requests (the model is loaded)."""
        with self._lock:
            if self._state == LOADING:
                self._state, self._reason = SERVING, ""

    def next(self, wait_s: float, stopping: threading.Event) -> list[Ticket] | None:
        """The next batch of tickets, or None after `wait_s` seconds without one or once `stopping` is set."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while not stopping.is_set():
                queue = self._pick()
                if queue is not None:
                    batch = self._batch(queue, stopping)
                    if batch:
                        for ticket in batch:
                            ticket.state = RUNNING
                        self.in_flight = batch
                        self.batches["batches"] += 1
                        self.batches["requests"] += len(batch)
                        return batch
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._arrived.wait(min(left, 0.2))
        return None

    def _pick(self) -> collections.deque[Ticket] | None:
        """The queue the next batch comes from (with the lock held): interactive first, a waiting background job
        after `FAIR_TURNS` interactive batches."""
        interactive, background = self._queues[INTERACTIVE], self._queues[BACKGROUND]
        if background and (not interactive or self._turns >= FAIR_TURNS):
            self._turns = 0
            return background
        if interactive:
            self._turns += 1 if background else 0
            return interactive
        return None

    def _batch(self, queue: collections.deque[Ticket], stopping: threading.Event) -> list[Ticket]:
        """The first ticket of `queue` and those behind it with its batch key, taken off the queue (with the lock
        held; it is released while waiting `batch_wait_s` for more)."""
        first = queue[0]
        while True:
            if not queue or queue[0] is not first:  # the first was dropped while waiting
                return []
            mates = [t for t in queue if t is not first and first.key is not None and t.key == first.key]
            batch = [first, *mates][: self._max_batch]
            left = first.queued_at + self._batch_wait_s - time.monotonic()
            if len(batch) >= self._max_batch or first.key is None or left <= 0 or stopping.is_set():
                for ticket in batch:
                    queue.remove(ticket)
                return batch
            self._arrived.wait(min(left, 0.2))

    def finish(self, ticket: Ticket, report: Any = None, outcome: Outcome | None = None,
               generate_s: float | None = None) -> None:
        """Settle `ticket` with its report or its outcome (a cancelled one's saying why) and count it."""
        if (outcome is not None and outcome.status == CLIENT_GONE and ticket.reason
                and ticket.reason not in outcome.message):
            outcome = Outcome(CLIENT_GONE, f"{outcome.message}: {ticket.reason}")
        with self._lock:
            self._active.discard(ticket.id)
            if ticket in self.in_flight:
                self.in_flight = [t for t in self.in_flight if t is not ticket]
            name = "ok" if outcome is None else {400: "refused", 503: "unavailable",
                                                 CLIENT_GONE: "cancelled"}.get(outcome.status, "failed")
            self.counts[name] += 1
            ticket.state = {"ok": COMPLETED, "cancelled": CANCELLED}.get(name, FAILED)
            ticket.finished = time.time()
            if outcome is None:
                self._times["request"].record(time.monotonic() - ticket.queued_at)
                if generate_s is not None:
                    self._times["generate"].record(generate_s)
        if outcome is None:
            ticket.future.set_result(report)
        else:
            ticket.future.set_exception(outcome)

    def close(self, state: str, reason: str) -> None:
        """Stop taking requests (`STOPPING` or `BROKEN`) and answer every waiting one 503."""
        with self._lock:
            self._state, self._reason = state, reason
            waiting = [ticket for queue in self._queues.values() for ticket in queue]
            for queue in self._queues.values():
                queue.clear()
        for ticket in waiting:
            self.finish(ticket, outcome=Outcome(503, f"the server is {state}: {reason}"))

    def _forget_old_jobs(self) -> None:
        """Keep at most `KEPT_JOBS` finished jobs (with the lock held)."""
        finished = [job_id for job_id, ticket in self._jobs.items() if ticket.finished is not None]
        for job_id in finished[: max(0, len(finished) - KEPT_JOBS)]:
            del self._jobs[job_id]


@dataclass
class _Times:
    """A Prometheus summary: count and sum of every value, quantiles of the last `RECENT`."""

    count: int = 0
    total: float = 0.0
    recent: list[float] = field(default_factory=list)

    def record(self, value: float) -> None:
        self.count, self.total, self.recent = self.count + 1, self.total + value, [*self.recent, value][-RECENT:]

    def summary(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text} Quantiles over the last {RECENT}.", f"# TYPE {name} summary"]
        if self.recent:
            cuts = statistics.quantiles(self.recent, n=20, method="inclusive") if len(self.recent) > 1 \
                else self.recent * 19
            lines += [f'{name}{{quantile="0.5"}} {cuts[9]:.6f}', f'{name}{{quantile="0.95"}} {cuts[18]:.6f}']
        return lines + [f"{name}_sum {self.total:.6f}", f"{name}_count {self.count}"]
