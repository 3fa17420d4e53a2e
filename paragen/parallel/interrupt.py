"""Following a request in flight: stopping it between its steps on every rank at the same step, and receiving an
LLM's tokens as they are decided.

A caller that may want to stop a request in flight (`paragen serve`, when the client has gone away) hands the job
an `Interrupt`: a function every rank calls between two steps (denoising steps, decoded tokens) and that returns
the same answer on every rank — its decision is made on one rank and broadcast, see `broadcast_stop`. When it says
stop, the runtime raises `RequestCancelled` on every rank at that step, before the step's first collective, so no
rank is left waiting and nothing is written. A caller that streams an LLM's answer adds `on_tokens`, called with
the new token ids each time the ranks have decided some (every token; a speculative round's accepted tokens
together). A caller that reports progress adds `on_step` (the step about to run and the request's steps, on every
rank), and one that streams a video's clips adds `on_clip` (the path of each clip's file, written by the job on the
output rank as soon as the clip is decoded; the job hears of the decoded frames from the pipeline through
`on_frames`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from paragen.comms import GroupComm, broadcast_int

Interrupt = Callable[[], bool]


@dataclass(frozen=True)
class Watch:
    """How a caller follows one request: `interrupt` (asked between steps, the same answer on every rank),
    `on_tokens` (new token ids as they are decided; set on the rank that streams them, None elsewhere), `on_step`
    (step index and steps in all, before each denoising step), `on_frames` (clip index, clips in all, and the clip's
    decoded frames `[B, C, F, H, W]` in the decoder's range, on the output rank as each clip is decoded: the pipeline
    calls it) and `on_clip` (clip index, clips in all, and the path of the clip's written file: the job calls it)."""

    interrupt: Interrupt | None = None
    on_tokens: Callable[[list[int]], None] | None = None
    on_step: Callable[[int, int], None] | None = None
    on_frames: Callable[[int, int, Any], None] | None = None
    on_clip: Callable[[int, int, str], None] | None = None


def interrupt_of(watch: Watch | None) -> Interrupt | None:
    """The watch's interrupt (None without a watch)."""
    return None if watch is None else watch.interrupt


class RequestCancelled(Exception):
    """A request stopped between steps on every rank (nothing was written)."""


def broadcast_stop(comm: GroupComm, wants_stop: Callable[[], bool], src: int = 0) -> Interrupt:
    """An Interrupt whose answer is rank `src`'s `wants_stop()`, broadcast over `comm` (one tiny host-side message
    per call)."""
    def interrupt() -> bool:
        return bool(broadcast_int(comm, int(comm.rank == src and wants_stop()), src))
    return interrupt


def check_interrupt(interrupt: Interrupt | None, where: str, *values: object) -> None:
    """Raise RequestCancelled (on every rank alike) when `interrupt` says stop, saying where (`where % values`,
    formatted only then: this runs every step and every token)."""
    if interrupt is not None and interrupt():
        raise RequestCancelled(f"cancelled {where % values}")


__all__ = ["Interrupt", "RequestCancelled", "Watch", "broadcast_stop", "check_interrupt", "interrupt_of"]
