"""Accounting of every communication: calls, bytes, and the time a rank spent blocked on it.

Bytes are *logical* payload bytes, independent of the algorithm the backend picks: an all-gather of
`x` over N ranks counts `(N-1)·|x|` received and `(N-1)·|x|` sent; a P2P send counts its tensor once.
Wait time is the wall time a rank spends inside a blocking call or inside `wait()` of an async one, so
communication that finished behind compute costs (almost) nothing here.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass


@dataclass
class OpStats:
    """Totals for one label (what the traffic is for: `conv_halo`, `attn_kv`, `norm_stats`, ...)."""

    calls: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    wait_s: float = 0.0


class CommStats:
    """Per-label totals for one process; run reports and benchmarks read `snapshot()`."""

    def __init__(self) -> None:
        self._ops: dict[str, OpStats] = defaultdict(OpStats)

    def record(self, label: str, sent: int, recv: int, calls: int = 1) -> None:
        """Count one operation's payload (called when the operation is issued)."""
        op = self._ops[label]
        op.calls += calls
        op.bytes_sent += sent
        op.bytes_recv += recv

    def add_wait(self, label: str, seconds: float) -> None:
        """Count time a rank was blocked on an operation of this label."""
        self._ops[label].wait_s += seconds

    def reset(self) -> None:
        """Forget all totals (e.g. after warm-up requests)."""
        self._ops.clear()

    def snapshot(self) -> dict[str, dict[str, float]]:
        """A JSON-ready copy: label → {calls, bytes_sent, bytes_recv, wait_s}, plus a `total` row."""
        rows = {label: asdict(op) for label, op in sorted(self._ops.items())}
        total = OpStats()
        for op in self._ops.values():
            total.calls += op.calls
            total.bytes_sent += op.bytes_sent
            total.bytes_recv += op.bytes_recv
            total.wait_s += op.wait_s
        rows["total"] = asdict(total)
        return rows
