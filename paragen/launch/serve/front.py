"""Between the HTTP thread and the ranks, on the output rank: the queue of requests, what became of each, the
server's state and its counters (`/health`, `/metrics`).

A request whose client goes away is dropped from the queue at once (the ranks never see it), or, in flight, marked
so that the ranks stop it at their next step (`paragen.parallel.interrupt`). The server is stopping from the moment
a stop signal arrives (`stopping` is set by the signal handler, read here without a lock): `/health` answers 503
and new requests 503 while the request in flight finishes."""
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
    on_tokens: Callable[[list[int]], None] | None = None  # a streamed answer's feed (the ranks' thread calls it)


class Front:
    """The output rank's queue of tickets (at most `max_queue` waiting) and the server's state; `stopping` is set
    by the stop signal's handler."""

    def __init__(self, max_queue: int, stopping: threading.Event | None = None) -> None:
        self._queue: collections.deque[Ticket] = collections.deque()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._max_queue = max_queue
        self._stopping = stopping or threading.Event()
        self._active: set[str] = set()  # ids queued or being made
        self._state, self._reason = LOADING, "loading the model"
        self.in_flight: Ticket | None = None
        self.counts = {"ok": 0, "refused": 0, "failed": 0, "unavailable": 0, "cancelled": 0}
        self._times = {"request": _Times(), "generate": _Times()}

    @property
    def state(self) -> str:
        """loading, serving, stopping (from the stop signal on) or broken."""
        return STOPPING if self._stopping.is_set() and self._state in (LOADING, SERVING) else self._state

    @property
    def reason(self) -> str:
        return "a stop signal arrived" if self.state == STOPPING and self._state != STOPPING else self._reason

    # ---- the HTTP side ---------------------------------------------------------------------------
    def submit(self, tickets: list[Ticket]) -> list[Future]:
        """Queue all `tickets` or none: Outcome 503 when the server does not take work, 400 when they can never fit
        the queue, 429 when it has no room for them now, 409 when an id is already queued or being made."""
        with self._lock:
            if self.state != SERVING:
                raise Outcome(503, f"the server is {self.state}: {self.reason}")
            if len(tickets) > self._max_queue:
                raise Outcome(400, f"{len(tickets)} requests at once are more than the queue holds "
                                   f"({self._max_queue}); ask for at most {self._max_queue}")
            if len(self._queue) + len(tickets) > self._max_queue:
                raise Outcome(429, f"the queue ({self._max_queue} requests) is full; try again later")
            busy = [ticket.id for ticket in tickets if ticket.id in self._active]
            if busy:
                raise Outcome(409, f"id {busy[0]!r} is queued or being made")
            for ticket in tickets:
                self._active.add(ticket.id)
                self._queue.append(ticket)
            self._arrived.notify()
        return [ticket.future for ticket in tickets]

    def cancel(self, tickets: list[Ticket], reason: str) -> None:
        """Their client went away: drop the queued ones now (the ranks never see them), mark the one in flight so
        that the ranks stop it at their next step."""
        dropped = []
        with self._lock:
            for ticket in tickets:
                ticket.cancelled = True
                if ticket in self._queue:
                    self._queue.remove(ticket)
                    dropped.append(ticket)
        for ticket in dropped:
            self.finish(ticket, outcome=Outcome(CLIENT_GONE, f"dropped from the queue: {reason}"))

    def health(self) -> tuple[int, dict]:
        """The HTTP status of `/health` (200 only while serving) and its body."""
        with self._lock:
            state = self.state
            body = {"status": state, "queue": len(self._queue), "in_flight": self.in_flight is not None,
                    **({"reason": self.reason} if state != SERVING else {})}
        return (200 if state == SERVING else 503), body

    def metrics(self) -> str:
        """The counters in Prometheus' text format."""
        with self._lock:
            counts, times = dict(self.counts), {name: _Times(**vars(t)) for name, t in self._times.items()}
            waiting, busy, up = len(self._queue), int(self.in_flight is not None), int(self.state == SERVING)
        lines = ["# HELP paragen_up 1 while the server takes requests.", "# TYPE paragen_up gauge", f"paragen_up {up}",
                 "# HELP paragen_queue_length Requests waiting for the ranks.", "# TYPE paragen_queue_length gauge",
                 f"paragen_queue_length {waiting}",
                 "# HELP paragen_in_flight Requests the ranks are making.", "# TYPE paragen_in_flight gauge",
                 f"paragen_in_flight {busy}",
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

    def next(self, wait_s: float, stopping: threading.Event) -> Ticket | None:
        """The next ticket, or None after `wait_s` seconds without one or once `stopping` is set."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while not stopping.is_set():
                if self._queue:
                    self.in_flight = self._queue.popleft()
                    return self.in_flight
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._arrived.wait(min(left, 0.2))
        return None

    def finish(self, ticket: Ticket, report: Any = None, outcome: Outcome | None = None,
               generate_s: float | None = None) -> None:
        """Settle `ticket` with its report or its outcome and count it."""
        with self._lock:
            self._active.discard(ticket.id)
            if self.in_flight is ticket:
                self.in_flight = None
            name = "ok" if outcome is None else {400: "refused", 503: "unavailable",
                                                 CLIENT_GONE: "cancelled"}.get(outcome.status, "failed")
            self.counts[name] += 1
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
            waiting = list(self._queue)
            self._queue.clear()
        for ticket in waiting:
            self.finish(ticket, outcome=Outcome(503, f"the server is {state}: {reason}"))


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
