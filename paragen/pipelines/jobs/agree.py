"""Ranks agree by construction: whatever decides whether a request runs is checked on every rank and the verdicts
gathered before the request's first collective, so one rank's refusal is every rank's and no rank waits in a
collective that another never enters.

A step (a request's checks, its generation) is `attempt`ed on every rank; `settle` gathers the verdicts over the
world and raises the same exception on every rank when any rank did not succeed:
- `RequestRefused` (a ValueError) when every rank that did not succeed refused the request: the user's input, or a
  limit of some rank's machine (its free memory, its output folder); the message names the ranks when not all
  refused, since the ranks then disagree about the same request;
- `RequestCancelled` when the request was cancelled (on every rank alike: the decision is broadcast, see
  `paragen.parallel.interrupt`);
- `RequestFailed` (a RuntimeError) when some rank failed (an output that could not be written, …), naming each.
`same_everywhere` compares what each rank read of shared state (a journal, a prompt) and refuses when they differ.
The command line, request files, `paragen serve` and `JobRunner` all go through here.
"""
from __future__ import annotations

import traceback
from typing import Any, Callable

from paragen.comms import GroupComm, all_gather_objects
from paragen.log import get_logger
from paragen.parallel.interrupt import RequestCancelled

REFUSED, CANCELLED, FAILED = "refused", "cancelled", "failed"
Verdict = tuple[str, str] | None  # (kind, message), None: the step succeeded


class RequestRefused(ValueError):
    """Every rank refuses the request (the same message everywhere)."""


class RequestFailed(RuntimeError):
    """The request failed on some rank (the same message everywhere, naming each failing rank)."""


def attempt(step: Callable[[Any], Any], value: Any) -> tuple[Any, Verdict]:
    """`step(value)` and None, or None and this rank's verdict."""
    try:
        return step(value), None
    except RequestCancelled as error:
        return None, (CANCELLED, str(error))
    except (ValueError, TypeError, FileNotFoundError) as error:
        return None, (REFUSED, str(error))
    except Exception as error:  # noqa: BLE001 — every rank learns it in `settle`; a broken group fails there
        get_logger().error("request failed on this rank:\n%s", traceback.format_exc())
        return None, (FAILED, f"{type(error).__name__}: {error}")


def settle(comm: GroupComm, verdict: Verdict) -> None:
    """Gather every rank's verdict; raise the agreed exception on every rank if any rank did not succeed."""
    verdicts = all_gather_objects(comm, verdict)
    failing = [(rank, found) for rank, found in enumerate(verdicts) if found is not None]
    if not failing:
        return
    kinds = {kind for _, (kind, _) in failing}
    if kinds == {CANCELLED}:
        raise RequestCancelled(failing[0][1][1])
    named = "; ".join(f"rank {rank}: {message}" for rank, (_, message) in failing)
    if kinds - {REFUSED, CANCELLED}:
        raise RequestFailed(named)
    messages = {message for _, (_, message) in failing}
    if len(failing) == len(verdicts) and len(messages) == 1:
        raise RequestRefused(messages.pop())
    passed = [rank for rank, found in enumerate(verdicts) if found is None]
    others = f" (rank {', '.join(map(str, passed))} accepted it)" if passed else ""
    raise RequestRefused(f"the ranks disagree about this request: {named}{others}")


def agreed(comm: GroupComm, step: Callable[[Any], Any], value: Any) -> Any:
    """`step(value)` on every rank, or the agreed exception on every rank."""
    result, verdict = attempt(step, value)
    settle(comm, verdict)
    return result


def same_everywhere(comm: GroupComm, what: str, seen: Any, hint: str = "") -> None:
    """RequestRefused on every rank when the ranks' `seen` (a small summary of what each read of `what`) differ."""
    views = all_gather_objects(comm, seen)
    if any(view != views[0] for view in views):
        listed = "; ".join(f"rank {rank}: {view}" for rank, view in enumerate(views))
        raise RequestRefused(f"the ranks see different {what} ({listed}){hint}")


__all__ = ["CANCELLED", "FAILED", "REFUSED", "RequestFailed", "RequestRefused", "Verdict", "agreed", "attempt",
           "same_everywhere", "settle"]
