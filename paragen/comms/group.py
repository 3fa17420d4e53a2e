"""Collectives over one process group, each accounted under a label.

Ranks here are `rank_in_group` (0..size-1 inside this group); the global rank is only used where
torch.distributed asks for it. Every operation exists in an async form that returns a `Pending`;
the blocking form is the async one waited on at once, so both are accounted the same way.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist

from paragen.comms.pending import Pending, backend_call, ready
from paragen.comms.stats import CommStats
from paragen.comms.world import apply_operation_timeout, is_initialized, world_groups

# torch 2.13 renamed all_gather_into_tensor; keep working on the older name.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Gloo matches P2P messages by tag; tags cycle through this range (NCCL ignores them).
_TAG_RANGE = 1 << 20


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class GroupComm:
    """One process group (or a single process, when `group` is None and size is 1)."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        stats: CommStats,
        p2p_group: dist.ProcessGroup | None = None,
        stale_group: dist.ProcessGroup | None = None,
        cpu_group: dist.ProcessGroup | None = None,
    ) -> None:
        """`p2p_group` and `stale_group`: the same ranks in separate groups (default: `group`) for
        neighbour/ring P2P and for the step-long stale all-gathers. `cpu_group`: the same ranks on gloo
        (default: `group`), for host-side metadata (`broadcast_int`, `all_gather_objects`), so that no CPU
        tensor enters an NCCL collective.

        Gloo runs one group's operations in order over one set of connections: a small halo, or the
        blocking gather at the end of a step, queued behind a multi-megabyte stale all-gather that is
        meant to take a whole step would wait for it.
        """
        self.group = group
        self.p2p_group = p2p_group or group
        self.stale_group = stale_group or group
        self.cpu_group = cpu_group or group
        self.stats = stats
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self._tag = 0
        for handle in {group, self.p2p_group, self.stale_group, self.cpu_group} - {None}:
            apply_operation_timeout(handle)

    # ---- all-gather -------------------------------------------------------------------------
    def all_gather_async(self, tensor: torch.Tensor, label: str) -> Pending[torch.Tensor]:
        """Start gathering `tensor` from every rank; the result is `[size, *tensor.shape]`."""
        if self.size == 1:
            return ready(tensor.unsqueeze(0))
        flat = tensor.contiguous().view(-1)
        out = torch.empty(self.size * flat.numel(), dtype=flat.dtype, device=flat.device)
        with backend_call(label):
            work = _all_gather_flat(out, flat, group=self.group, async_op=True)
        volume = (self.size - 1) * _nbytes(flat)
        self.stats.record(label, sent=volume, recv=volume)
        return Pending([work], lambda: out.view(self.size, *tensor.shape), self.stats, label)

    def all_gather(self, tensor: torch.Tensor, label: str) -> torch.Tensor:
        """Blocking all-gather; returns `[size, *tensor.shape]` in rank order."""
        return self.all_gather_async(tensor, label).wait()

    def all_gather_into_async(
        self, out: torch.Tensor, flat: torch.Tensor, label: str, calls: int = 1
    ) -> Pending[torch.Tensor]:
        """All-gather a flat buffer into a preallocated flat `out` of `size × |flat|` elements, on the
        stale group (this is the stale activations' path; see `FlatAllGather`).

        Bytes are accounted by the caller; `calls` counts the launch.
        """
        with backend_call(label):
            work = _all_gather_flat(out, flat, group=self.stale_group, async_op=True)
        self.stats.record(label, sent=0, recv=0, calls=calls)
        return Pending([work], lambda: out, self.stats, label)

    def all_gather_varlen(self, tensor: torch.Tensor, dim: int, sizes: list[int], label: str) -> torch.Tensor:
        """Concatenate every rank's `tensor` along `dim`, where rank i's has `sizes[i]` entries there.

        The shards are padded to the longest for one flat all-gather (the padding is accounted).
        """
        if self.size == 1:
            return tensor
        if tensor.shape[dim] != sizes[self.rank]:
            raise ValueError(f"{label}: this rank holds {tensor.shape[dim]} entries along dim {dim}, the layout says {sizes[self.rank]}")
        longest = max(sizes)
        if tensor.shape[dim] < longest:
            pad_shape = list(tensor.shape)
            pad_shape[dim] = longest - tensor.shape[dim]
            tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
        everyone = self.all_gather(tensor, label)
        return torch.cat([part.narrow(dim, 0, n) for part, n in zip(everyone, sizes)], dim=dim)

    def gather_varlen(self, tensor: torch.Tensor, dim: int, sizes: list[int], dst: int, label: str,
                      on_part: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor | None:
        """Concatenate every rank's `tensor` along `dim` on rank `dst` only (rank i's has `sizes[i]` entries
        there), by P2P; the other ranks send theirs and get None. On `dst`, `on_part(i, part)` is called with each
        rank's part as it arrives, in rank order (its own at once)."""
        if tensor.shape[dim] != sizes[self.rank]:
            raise ValueError(f"{label}: this rank holds {tensor.shape[dim]} entries along dim {dim}, the layout says {sizes[self.rank]}")
        if self.size == 1:
            if on_part is not None:
                on_part(0, tensor)
            return tensor
        payload = tensor.contiguous()
        tag = self._next_tag()
        if self.rank != dst:
            with backend_call(label):
                work = dist.isend(payload, group=self.p2p_group, group_dst=dst, tag=tag)
            self.stats.record(label, sent=_nbytes(payload), recv=0)
            Pending([work], lambda: None, self.stats, label).wait()
            return None
        parts: list[torch.Tensor] = []
        works: dict[int, Any] = {}
        with backend_call(label):
            for src, n in enumerate(sizes):
                if src == dst:
                    parts.append(payload)
                    continue
                shape = list(payload.shape)
                shape[dim] = n
                parts.append(torch.empty(shape, dtype=payload.dtype, device=payload.device))
                works[src] = dist.irecv(parts[-1], group=self.p2p_group, group_src=src, tag=tag)
        self.stats.record(label, sent=0, recv=sum(_nbytes(p) for i, p in enumerate(parts) if i != dst))
        if on_part is None:
            return Pending(list(works.values()), lambda: torch.cat(parts, dim=dim), self.stats, label).wait()
        for src, part in enumerate(parts):
            if src in works:
                Pending([works[src]], lambda: None, self.stats, label).wait()
            on_part(src, part)
        return torch.cat(parts, dim=dim)

    # ---- broadcast ----------------------------------------------------------------------------
    def broadcast_async(self, tensor: torch.Tensor, src: int, label: str, stale: bool = False) -> Pending[torch.Tensor]:
        """Start sending rank `src`'s `tensor` to every rank; the others receive into their `tensor`
        (same shape and dtype on every rank). `stale=True` runs it on the stale group, so a broadcast
        meant to arrive a whole step later does not hold up this step's blocking collectives."""
        if self.size == 1:
            return ready(tensor)
        size = _nbytes(tensor)
        sent, recv = ((self.size - 1) * size, 0) if self.rank == src else (0, size)
        self.stats.record(label, sent=sent, recv=recv)
        with backend_call(label):
            work = dist.broadcast(tensor, group=self.stale_group if stale else self.group, group_src=src, async_op=True)
        return Pending([work], lambda: tensor, self.stats, label)

    # ---- reductions ---------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, label: str, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """Blocking in-place all-reduce (for large tensors, where the backend's ring wins)."""
        if self.size > 1:
            volume = 2 * (self.size - 1) * _nbytes(tensor) // self.size
            self.stats.record(label, sent=volume, recv=volume)
            with backend_call(label):
                work = dist.all_reduce(tensor, op=op, group=self.group, async_op=True)
            Pending([work], lambda: None, self.stats, label).wait()
        return tensor

    # ---- all-to-all ---------------------------------------------------------------------------
    def all_to_all_flat_async(
        self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int], label: str
    ) -> Pending[torch.Tensor]:
        """Send consecutive pieces of the flat `send` (`send_counts[j]` elements to rank j); the result
        is a flat tensor of what arrived, in rank order (`recv_counts[i]` elements from rank i).

        Pieces may differ in size (uneven sequence shards)."""
        if self.size == 1:
            return ready(send)
        out = torch.empty(sum(recv_counts), dtype=send.dtype, device=send.device)
        size = send.element_size()
        self.stats.record(
            label,
            sent=size * (sum(send_counts) - send_counts[self.rank]),
            recv=size * (sum(recv_counts) - recv_counts[self.rank]),
        )
        with backend_call(label):
            work = dist.all_to_all_single(
                out, send.contiguous().view(-1), output_split_sizes=recv_counts, input_split_sizes=send_counts,
                group=self.group, async_op=True,
            )
        return Pending([work], lambda: out, self.stats, label)

    def ring_shift_async(
        self, tensor: torch.Tensor, recv_shape: tuple[int, ...], label: str, *, send: bool = True, recv: bool = True
    ) -> Pending[torch.Tensor | None]:
        """Send `tensor` to the next rank on the ring and receive a `recv_shape` tensor (same dtype) from the previous one.

        `send=False` or `recv=False` skips that side (nothing received: the result is None); the call still
        takes its message tag, so ranks that skip a side in some steps stay matched in later calls.
        """
        tag = self._next_tag()
        if self.size == 1:
            return ready(tensor)
        payload = tensor.contiguous()
        incoming = torch.empty(recv_shape, dtype=payload.dtype, device=payload.device) if recv else None
        works = []
        with backend_call(label):
            if send:
                works.append(dist.isend(payload, group=self.p2p_group, group_dst=(self.rank + 1) % self.size, tag=tag))
            if recv:
                works.append(dist.irecv(incoming, group=self.p2p_group, group_src=(self.rank - 1) % self.size, tag=tag))
        self.stats.record(label, sent=_nbytes(payload) if send else 0, recv=_nbytes(incoming) if recv else 0)
        return Pending(works, lambda: incoming, self.stats, label)

    def share_async(self, tensor: torch.Tensor, shapes: list[tuple[int, ...]], label: str) -> Pending[list]:
        """Send `tensor` to every other rank by P2P and receive each one's (rank i's has `shapes[i]`).

        The result lists every rank's tensor, None at this rank's place. An all-gather built from
        point-to-point messages: shards may differ in size, and nothing runs in the backend's worker
        threads between the sends and the wait at use.
        """
        return self.send_pieces_async([tensor] * self.size, shapes, label)

    def send_pieces_async(self, pieces: list[torch.Tensor], shapes: list[tuple[int, ...]], label: str) -> Pending[list]:
        """Send `pieces[j]` to rank j by P2P and receive from each rank i a tensor of `shapes[i]` (same dtype).

        An all-to-all whose pieces may differ in shape, from point-to-point messages started at once and
        waited for at use. Empty pieces are not sent (their receivers know their shapes); the result lists
        what arrived from every rank, None at this rank's place.
        """
        payloads = [piece.contiguous() for piece in pieces]
        dtype, device = payloads[self.rank].dtype, payloads[self.rank].device
        received: list[torch.Tensor | None] = [None] * self.size
        works, sent, recv = [], 0, 0
        tag = self._next_tag()
        with backend_call(label):
            for offset in range(1, self.size):
                dst, src = (self.rank + offset) % self.size, (self.rank - offset) % self.size
                if payloads[dst].numel():
                    works.append(dist.isend(payloads[dst], group=self.p2p_group, group_dst=dst, tag=tag))
                    sent += _nbytes(payloads[dst])
                received[src] = torch.empty(shapes[src], dtype=dtype, device=device)
                if received[src].numel():
                    works.append(dist.irecv(received[src], group=self.p2p_group, group_src=src, tag=tag))
                recv += _nbytes(received[src])
        self.stats.record(label, sent=sent, recv=recv)
        return Pending(works, lambda: received, self.stats, label)

    # ---- a state handed down the ranks ---------------------------------------------------------
    def send_to_next(self, items: list, label: str) -> None:
        """Send `items` (tensors of one dtype and device, and picklable markers such as None) to rank+1, which
        takes them with `recv_from_prev`; nothing on the last rank. Blocking: a hand-over along a pipeline."""
        if self.rank == self.size - 1:
            return
        tensors = [item for item in items if isinstance(item, torch.Tensor)]
        if len({(t.dtype, t.device) for t in tensors}) > 1:
            raise ValueError(f"{label}: the tensors handed on must share one dtype and device")
        layout = [tuple(item.shape) if isinstance(item, torch.Tensor) else ("marker", item) for item in items]
        flat = torch.cat([t.reshape(-1) for t in tensors]) if tensors else None
        with backend_call(label):
            dist.send_object_list([layout, None if flat is None else str(flat.dtype).removeprefix("torch.")],
                                  group=self.cpu_group, group_dst=self.rank + 1)
            if flat is not None:
                dist.send(flat, group=self.p2p_group, group_dst=self.rank + 1)
        self.stats.record(label, sent=0 if flat is None else _nbytes(flat), recv=0)

    def recv_from_prev(self, device: torch.device, label: str) -> list | None:
        """What rank-1 handed on with `send_to_next` (tensors on `device`); None on the first rank."""
        if self.rank == 0:
            return None
        header: list = [None, None]
        with backend_call(label):
            dist.recv_object_list(header, group=self.cpu_group, group_src=self.rank - 1)
            layout, dtype = header
            shapes = [shape for shape in layout if shape[:1] != ("marker",)]
            flat = None
            if dtype is not None:
                flat = torch.empty(sum(math.prod(shape) for shape in shapes), dtype=getattr(torch, dtype), device=device)
                dist.recv(flat, group=self.p2p_group, group_src=self.rank - 1)
        self.stats.record(label, sent=0, recv=0 if flat is None else _nbytes(flat))
        pieces = iter([] if flat is None else flat.split([math.prod(shape) for shape in shapes]))
        return [entry[1] if entry[:1] == ("marker",) else next(pieces).view(entry) for entry in layout]

    # ---- neighbours ---------------------------------------------------------------------------
    def exchange_neighbours_async(
        self, to_prev: torch.Tensor | None, to_next: torch.Tensor | None, label: str
    ) -> Pending[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Send `to_prev` to rank-1 and `to_next` to rank+1 by P2P; receive theirs.

        Every rank runs the same layer, so what arrives from rank-1 has the shape of our own
        `to_next`, and what arrives from rank+1 the shape of our `to_prev`. The first rank gets
        None from before, the last None from after (and their sends there are skipped).
        """
        with backend_call(label):
            return self._exchange_neighbours(to_prev, to_next, label)

    def _exchange_neighbours(
        self, to_prev: torch.Tensor | None, to_next: torch.Tensor | None, label: str
    ) -> Pending[tuple[torch.Tensor | None, torch.Tensor | None]]:
        has_prev, has_next = self.rank > 0, self.rank < self.size - 1
        tag = self._next_tag()
        works, sent, recv = [], 0, 0
        from_prev = from_next = None
        if has_prev and to_prev is not None and to_prev.numel():
            payload = to_prev.contiguous()
            works.append(dist.isend(payload, group=self.p2p_group, group_dst=self.rank - 1, tag=tag))
            sent += _nbytes(payload)
        if has_next and to_next is not None and to_next.numel():
            payload = to_next.contiguous()
            works.append(dist.isend(payload, group=self.p2p_group, group_dst=self.rank + 1, tag=tag))
            sent += _nbytes(payload)
        if has_prev and to_next is not None and to_next.numel():
            from_prev = torch.empty_like(to_next, memory_format=torch.contiguous_format)
            works.append(dist.irecv(from_prev, group=self.p2p_group, group_src=self.rank - 1, tag=tag))
            recv += _nbytes(from_prev)
        if has_next and to_prev is not None and to_prev.numel():
            from_next = torch.empty_like(to_prev, memory_format=torch.contiguous_format)
            works.append(dist.irecv(from_next, group=self.p2p_group, group_src=self.rank + 1, tag=tag))
            recv += _nbytes(from_next)
        self.stats.record(label, sent=sent, recv=recv)
        return Pending(works, lambda: (from_prev, from_next), self.stats, label)

    def _next_tag(self) -> int:
        self._tag = (self._tag + 1) % _TAG_RANGE
        return self._tag


def broadcast_int(comm: GroupComm, value: int, src: int = 0) -> int:
    """`value` of rank `src` on every rank of `comm` (e.g. a seed everyone must share)."""
    if comm.size == 1:
        return value
    buf = torch.tensor([value], dtype=torch.int64, device="cpu")  # host-side metadata: over the gloo twin
    comm.stats.record("broadcast", sent=8 if comm.rank == src else 0, recv=0 if comm.rank == src else 8)
    with backend_call("broadcast"):
        dist.broadcast(buf, group=comm.cpu_group, group_src=src)
    return int(buf.item())


def all_gather_objects(comm: GroupComm, obj: object) -> list[object]:
    """Every rank's picklable `obj`, in rank order (for small reports, not tensors)."""
    if comm.size == 1:
        return [obj]
    out: list[object] = [None] * comm.size
    with backend_call("all_gather_objects"):
        dist.all_gather_object(out, obj, group=comm.cpu_group)
    return out


def broadcast_object(comm: GroupComm, obj: object, src: int = 0) -> object:
    """Rank `src`'s picklable `obj` on every rank of `comm` (what one rank decided, for all to follow)."""
    if comm.size == 1:
        return obj
    box = [obj if comm.rank == src else None]
    with backend_call("broadcast_object"):
        dist.broadcast_object_list(box, group=comm.cpu_group, group_src=src)
    return box[0]


def world_comm() -> GroupComm:
    """A communicator over every rank (its host-side twin for objects); one rank alone without a process group."""
    if not is_initialized():
        return GroupComm(None, CommStats())
    group, cpu_group = world_groups()
    return GroupComm(group, CommStats(), cpu_group=cpu_group)
