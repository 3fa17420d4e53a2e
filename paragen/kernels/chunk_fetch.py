"""Copying chosen value chunks from host memory to the device, behind other work.

`ChunkFetcher.start` hands the copy to a worker thread and returns at once; the caller rebuilds keys
meanwhile and calls `wait` when it needs the values. On CUDA the host store is pinned, the worker
gathers the chunks into a pinned staging buffer and copies them on a side stream, and `wait` makes the
compute stream wait for that copy; on CPU the worker's gather is the copy. PyTorch releases the GIL
inside its kernels, so the gather and the key rebuild run at the same time.
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

    def _fetch(self, host: torch.Tensor, index: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, object]:
        picked = host[index]
        if self._stream is None:
            return picked, None
        staged = picked.pin_memory()
        # The worker thread has its own current device: name the fetcher's for the stream, event and copy.
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            moved = staged.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        return moved, (done, staged)

    def wait(self, pending: "Future[tuple[torch.Tensor, object]]") -> torch.Tensor:
        """The fetched tensor, safe to use on the current stream."""
        moved, sync = pending.result()
        if sync is not None:
            done, _staged = sync
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            moved.record_stream(compute)  # allocated on the side stream, read on this one: not reused before
        return moved

    def close(self) -> None:
        """Stop the worker thread."""
        self._pool.shutdown(wait=True)
