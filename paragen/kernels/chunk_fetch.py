"""Copying keys and values (and blocks' weights) from host memory to the device, behind other work.

`ChunkFetcher.start` (chosen chunks), `start_range` (a run of positions) and `start_whole` (a whole tensor: a
block's weights, `paragen.parallel.offload`) hand the copy to a worker thread
and return at once; the caller computes meanwhile (rebuilds keys, attends the previous block) and calls
`wait` when it needs the result. On CUDA the host tensors are pinned: chosen chunks are gathered into a
pinned staging buffer, a run of positions is copied straight from the store (one contiguous piece per
batch row and head), both on a side stream, and `wait` makes the compute stream wait for that copy; on
CPU the worker's gather (or a view) is the copy. PyTorch releases the GIL inside its kernels, so the
worker's work and the caller's run at the same time.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch


def to_host(states: torch.Tensor) -> torch.Tensor:
    """A host-memory copy of `states` (pinned when CUDA is in use, so device copies can be asynchronous)."""
    if states.device.type != "cuda":
        return states.detach().to("cpu", copy=True)
    host = torch.empty(states.shape, dtype=states.dtype, device="cpu", pin_memory=True)  # one copy, into pinned memory
    return host.copy_(states.detach())


class ChunkFetcher:
    """One worker that gathers rows of a host tensor and puts them on `device`."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paragen-fetch")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def start(self, host: torch.Tensor, index: tuple[torch.Tensor, ...]) -> "Future[tuple[torch.Tensor, object]]":
        """Begin fetching `host[index]` (advanced indexing on host tensors) to the device."""
        return self._pool.submit(self._fetch, host, tuple(i.cpu() for i in index))

    def start_range(self, host: torch.Tensor, start: int, length: int) -> "Future[tuple[torch.Tensor, object]]":
        """Begin fetching positions `[start, start + length)` (dim 2) of a host tensor `[B, H, S, D]`."""
        return self._pool.submit(self._fetch_range, host, start, length)

    def start_whole(self, host: torch.Tensor) -> "Future[tuple[torch.Tensor, object]]":
        """Begin fetching a whole (contiguous) host tensor to the device."""
        return self._pool.submit(self._fetch_whole, host)

    def _fetch_whole(self, host: torch.Tensor) -> tuple[torch.Tensor, object]:
        if self._stream is None:
            return host, None
        return self._on_side_stream(lambda: host.to(self.device, non_blocking=True), host)

    def _fetch(self, host: torch.Tensor, index: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, object]:
        picked = host[index]
        if self._stream is None:
            return picked, None
        staged = picked.pin_memory()
        return self._on_side_stream(lambda: staged.to(self.device, non_blocking=True), staged)

    def _fetch_range(self, host: torch.Tensor, start: int, length: int) -> tuple[torch.Tensor, object]:
        view = host.narrow(2, start, length)
        if self._stream is None:
            return view, None

        def copy() -> torch.Tensor:
            moved = torch.empty(view.shape, dtype=view.dtype, device=self.device)
            for row in range(view.shape[0]):
                for head in range(view.shape[1]):  # each [length, D] piece is contiguous in the pinned store
                    moved[row, head].copy_(view[row, head], non_blocking=True)
            return moved

        return self._on_side_stream(copy, host)

    def _on_side_stream(self, copy, source: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Run `copy` on the side stream and record its end; `source` is kept alive until the copy is waited for."""
        # The worker thread has its own current device: name the fetcher's for the stream, event and copy.
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            moved = copy()
            done = torch.cuda.Event()
            done.record(self._stream)
        return moved, (done, source)

    def wait(self, pending: "Future[tuple[torch.Tensor, object]]") -> torch.Tensor:
        """The fetched tensor, safe to use on the current stream."""
        moved, sync = pending.result()
        if sync is not None:
            done, _source = sync
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            moved.record_stream(compute)  # allocated on the side stream, read on this one: not reused before
        return moved

    def close(self) -> None:
        """Stop the worker thread."""
        self._pool.shutdown(wait=True)
