"""Stopping a request between its steps, on every rank at the same step.

A caller that may want to stop a request in flight (`paragen serve`, when the client has gone away) hands the job
an `Interrupt`: a function every rank calls between two steps (denoising steps, decoded tokens) and that returns
the same answer on every rank — its decision is made on one rank and broadcast, see `broadcast_stop`. When it says
stop, the runtime raises `RequestCancelled` on every rank at that step, before the step's first collective, so no
rank is left waiting and nothing is written.
"""
from __future__ import annotations

from typing import Callable

from paragen.comms import GroupComm, broadcast_int

Interrupt = Callable[[], bool]


class RequestCancelled(Exception):
    """A request stopped between steps on every rank (nothing was written)."""


def broadcast_stop(comm: GroupComm, wants_stop: Callable[[], bool], src: int = 0) -> Interrupt:
    """An Interrupt whose answer is rank `src`'s `wants_stop()`, broadcast over `comm` (one tiny host-side message
    per call)."""
    def interrupt() -> bool:
        return bool(broadcast_int(comm, int(comm.rank == src and wants_stop()), src))
    return interrupt


def check_interrupt(interrupt: Interrupt | None, where: str) -> None:
    """Raise RequestCancelled (on every rank alike) when `interrupt` says stop."""
    if interrupt is not None and interrupt():
        raise RequestCancelled(f"cancelled {where}")


__all__ = ["Interrupt", "RequestCancelled", "broadcast_stop", "check_interrupt"]
