"""Many layers' tensors packed into one flat buffer and all-gathered with one async operation.

In displaced (stale-activation) mode every layer publishes its fresh activations of step t for use in
step t+1. Launching one all-gather per layer costs a backend round-trip each; instead, tensors are
appended to the open *bucket*, and the bucket is launched as one async all-gather once it holds
`bucket_bytes` (or at `flush()`). Each tensor gets a `Slot` that, at the point of use in the next
step, waits for its bucket and returns `[size, *shape]`.

Buffers are allocated once per bucket position (the n-th bucket of a step) and reused every step; they
are only written when a bucket is launched. Each layer reads its slot of step t before it submits
step t+1's tensor, so when the n-th bucket of step t+1 is launched — after all its tensors were
submitted — every slot of the n-th bucket of step t was read. A violation raises instead of
silently serving overwritten data.
"""
from __future__ import annotations

import torch

from paragen.comms.group import GroupComm
from paragen.comms.pending import Pending

DEFAULT_BUCKET_BYTES = 4 << 20


class _Bucket:
    def __init__(self, position: int, buffers: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.position = position
        self.send, self.recv = buffers
        self.tensors: list[torch.Tensor] = []
        self.numel = 0
        self.pending: Pending[torch.Tensor] | None = None
        self.unread = 0


class Slot:
    """Where one submitted tensor will be found once its bucket has arrived."""

    def __init__(self, owner: "FlatAllGather", bucket: _Bucket, offset: int, shape: torch.Size) -> None:
        self._owner, self._bucket, self._offset, self._shape = owner, bucket, offset, shape
        self._read = False

    def wait(self) -> torch.Tensor:
        """Block until the bucket has arrived; return this tensor from every rank `[size, *shape]`.

        The result is a view of the receive buffer, valid only until the gather's next `submit` (which
        may relaunch into the same buffer): copy out what is needed first.
        """
        bucket = self._bucket
        if bucket.pending is None:
            self._owner.flush()
        recv = bucket.pending.wait().view(self._owner.comm.size, -1)  # type: ignore[union-attr]
        numel = self._shape.numel()
        if not self._read:
            self._read = True
            bucket.unread -= 1
        return recv[:, self._offset : self._offset + numel].view(-1, *self._shape)


class FlatAllGather:
    """Bucketed async all-gather over one group; see the module docstring."""

    def __init__(self, comm: GroupComm, label: str, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        """`label` accounts the launches and the waits; each tensor's bytes go to its own label."""
        self.comm = comm
        self.label = label
        self.bucket_bytes = bucket_bytes
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._last_use: list[_Bucket | None] = []
        self._open: _Bucket | None = None
        self._position = 0

    def submit(self, tensor: torch.Tensor, label: str) -> Slot:
        """Queue `tensor` (not copied until launch; do not modify it afterwards)."""
        if self._open is None:
            self._open = self._new_bucket()
        bucket = self._open
        slot = Slot(self, bucket, bucket.numel, tensor.shape)
        bucket.tensors.append(tensor)
        bucket.numel += tensor.numel()
        bucket.unread += 1
        volume = (self.comm.size - 1) * tensor.numel() * tensor.element_size()
        self.comm.stats.record(label, sent=volume, recv=volume, calls=0)
        if bucket.numel * tensor.element_size() >= self.bucket_bytes:
            self.flush()
        return slot

    def flush(self) -> None:
        """Launch the open bucket now (call at the end of each step)."""
        bucket, self._open = self._open, None
        if bucket is None:
            return
        self._release(bucket.position)
        self._last_use[bucket.position] = bucket
        dtype, device = bucket.tensors[0].dtype, bucket.tensors[0].device
        send, recv = bucket.send, bucket.recv
        if send.numel() != bucket.numel or send.dtype != dtype or send.device != device:
            send = torch.empty(bucket.numel, dtype=dtype, device=device)
            recv = torch.empty(self.comm.size * bucket.numel, dtype=dtype, device=device)
            self._buffers[bucket.position] = (send, recv)
            bucket.send, bucket.recv = send, recv
        torch.cat([t.reshape(-1) for t in bucket.tensors], out=send)
        bucket.tensors = []
        bucket.pending = self.comm.all_gather_into_async(recv, send, self.label)

    def end_step(self) -> None:
        """Flush, and start the next step's buckets from the first buffer again."""
        self.flush()
        self._position = 0

    def drain(self) -> None:
        """Wait for every launched bucket (at the end of a request), and forget them."""
        self.flush()
        for bucket in self._last_use:
            if bucket is not None and bucket.pending is not None:
                bucket.pending.wait()
        self._last_use = [None] * len(self._last_use)
        self._position = 0

    def _new_bucket(self) -> _Bucket:
        position = self._position
        self._position += 1
        if position == len(self._buffers):
            empty = torch.empty(0, device="meta")  # a placeholder: replaced at first use on the data's device
            self._buffers.append((empty, empty))
            self._last_use.append(None)
        return _Bucket(position, self._buffers[position])

    def _release(self, position: int) -> None:
        """Make sure the previous bucket at `position` is finished and fully read before reuse."""
        previous = self._last_use[position]
        if previous is None:
            return
        if previous.unread:
            raise RuntimeError(
                "FlatAllGather: a bucket is being relaunched while some of its data was never read; "
                "every layer must read its stale slot before submitting again"
            )
        if previous.pending is not None:
            previous.pending.wait()
