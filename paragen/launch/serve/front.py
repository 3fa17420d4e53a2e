"""Between the HTTP thread and the ranks, on the output rank: the queue of requests, what became of each, the
server's state and its counters (`/health`, `/metrics`)."""
from __future__ import annotations

import queue
import statistics
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

LOADING, SERVING, STOPPING, BROKEN = "loading", "serving", "stopping", "broken"
RECENT = 256  # requests whose times the latency quantiles cover


class Outcome(Exception):
    """A request that made nothing, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Ticket:
    """One job request waiting for, or being made by, the ranks."""

    id: str
    request: Any  # the job's request (a frozen dataclass: it travels to every rank)
    future: Future = field(default_factory=Future)  # the report, or an Outcome
    queued_at: float = field(default_factory=time.monotonic)


class Front:
    """The output rank's queue of tickets (at most `max_queue` waiting) and the server's state."""

    def __init__(self, max_queue: int) -> None:
        self._queue: queue.Queue[Ticket] = queue.Queue()
        self._lock = threading.Lock()
        self._max_queue = max_queue
        self._active: set[str] = set()  # ids queued or being made
        self.state, self.reason = LOADING, "loading the model"
        self.in_flight: Ticket | None = None
        self.counts = {"ok": 0, "refused": 0, "failed": 0, "unavailable": 0}
        self._times = {"request": _Times(), "generate": _Times()}

    # ---- the HTTP side ---------------------------------------------------------------------------
    def submit(self, tickets: list[Ticket]) -> list[Future]:
        """Queue all `tickets` or none: Outcome 503 when the server does not take work, 429 when the queue has no
        room for them, 409 when an id is already queued or being made."""
        with self._lock:
            if self.state != SERVING:
                raise Outcome(503, f"the server is {self.state}: {self.reason}")
            if self._queue.qsize() + len(tickets) > self._max_queue:
                raise Outcome(429, f"the queue ({self._max_queue} requests) is full; try again later")
            busy = [ticket.id for ticket in tickets if ticket.id in self._active]
            if busy:
                raise Outcome(409, f"id {busy[0]!r} is queued or being made")
            for ticket in tickets:
                self._active.add(ticket.id)
                self._queue.put(ticket)
        return [ticket.future for ticket in tickets]

    def health(self) -> tuple[int, dict]:
        """The HTTP status of `/health` (200 only while serving) and its body."""
        with self._lock:
            body = {"status": self.state, "queue": self._queue.qsize(), "in_flight": self.in_flight is not None,
                    **({"reason": self.reason} if self.state != SERVING else {})}
        return (200 if self.state == SERVING else 503), body

    def metrics(self) -> str:
        """The counters in Prometheus' text format."""
        with self._lock:
            counts, times = dict(self.counts), {name: _Times(**vars(t)) for name, t in self._times.items()}
            waiting, busy, up = self._queue.qsize(), int(self.in_flight is not None), int(self.state == SERVING)
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
            if self.state == LOADING:
                self.state, self.reason = SERVING, ""

    def next(self, wait_s: float, stopping: threading.Event) -> Ticket | None:
        """The next ticket, or None after `wait_s` seconds without one or once `stopping` is set."""
        deadline = time.monotonic() + wait_s
        while not stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                ticket = self._queue.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            with self._lock:
                self.in_flight = ticket
            return ticket
        return None

    def finish(self, ticket: Ticket, report: Any = None, outcome: Outcome | None = None,
               generate_s: float | None = None) -> None:
        """Settle `ticket` with its report or its outcome and count it."""
        with self._lock:
            self._active.discard(ticket.id)
            if self.in_flight is ticket:
                self.in_flight = None
            name = "ok" if outcome is None else {400: "refused", 503: "unavailable"}.get(outcome.status, "failed")
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
            self.state, self.reason = state, reason
        while True:
            try:
                ticket = self._queue.get_nowait()
            except queue.Empty:
                return
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
