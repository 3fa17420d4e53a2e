"""Handles for communication in flight: wait at the point of use, and account the time waited."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

from paragen.comms.stats import CommStats

T = TypeVar("T")


class CommError(RuntimeError):
    """A communication failed: a peer rank died, hung past the timeout, or the connection broke."""

    def __init__(self, label: str, cause: BaseException) -> None:
        super().__init__(f"{label or 'collective'}: {cause}")
        self.label = label


@contextmanager
def backend_call(label: str) -> Iterator[None]:
    """Re-raise a backend failure (gloo/NCCL report them as plain RuntimeErrors) as a CommError."""
    try:
        yield
    except CommError:
        raise
    except RuntimeError as error:
        raise CommError(label, error) from error


class Pending(Generic[T]):
    """The result of an async operation; `wait()` blocks until it is there and returns it.

    `finish` turns the raw receive buffers into the value the caller wants (runs once, after the
    backend's works completed). Waiting twice returns the same value.
    """

    def __init__(
        self,
        works: Sequence[Any],
        finish: Callable[[], T],
        stats: CommStats | None = None,
        label: str = "",
    ) -> None:
        self._works = list(works)
        self._finish = finish
        self._stats = stats
        self._label = label
        self._value: T | None = None
        self._done = False

    def wait(self) -> T:
        """Block until the data has arrived; return it."""
        if not self._done:
            start = time.perf_counter()
            with backend_call(self._label):
                for work in self._works:
                    work.wait()
            if self._stats is not None:
                self._stats.add_wait(self._label, time.perf_counter() - start)
            self._value = self._finish()
            self._done = True
            self._works = []
        return self._value  # type: ignore[return-value]


def ready(value: T) -> Pending[T]:
    """A handle that is already complete (what a synchronous step leaves for the next one)."""
    return Pending([], lambda: value)
