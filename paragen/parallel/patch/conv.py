"""`PatchConv2d`: a Conv2d on a row band that fetches its halo rows from the neighbouring bands."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from paragen.comms import Pending, Slot
from paragen.parallel.partition import band_bounds, conv_halo, conv_span
from paragen.parallel.patch.context import PatchContext

Halo = tuple[torch.Tensor | None, torch.Tensor | None]


class PatchConv2d(nn.Conv2d):
    """In-place subclass of `nn.Conv2d` (same parameters and state-dict keys).

    The band is extended by `top` rows from the band above and `bottom` rows from the band below
    (zeros at the image edges, which is the conv's own zero padding), then convolved with no
    padding along rows. Fresh steps exchange the halo by P2P with the two neighbours, and convolve the
    band's interior rows (those whose window lies inside the band) while the halo travels; the few
    output rows at each edge follow once it has arrived. Stale steps use the halo of the previous step,
    and publish this step's edge rows in the flat async all-gather with every other stale tensor (as
    DistriFusion does): gloo can block for tens of milliseconds while *posting* a P2P receive whose data
    already arrived, which would stall the conv.
    """

    patch_ctx: PatchContext
    overlap_halo = True  # fresh steps convolve the interior rows while the halo travels

    @classmethod
    def convert(cls, conv: nn.Conv2d, ctx: PatchContext) -> "PatchConv2d":
        """Turn `conv` into a PatchConv2d in place and return it."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"patch parallelism supports zero-padded convs with numeric padding, not {conv}")
        conv.__class__ = cls
        conv.patch_ctx = ctx
        conv.halo = conv_halo(conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0])
        conv.span = conv_span(conv.kernel_size[0], conv.dilation[0])
        conv._stale: Pending[Halo] | Slot | None = None
        ctx.on_reset(conv.reset)
        return conv  # type: ignore[return-value]

    def reset(self) -> None:
        """Drop the halo kept for the next step."""
        self._stale = None

    def _edges(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This band's first `bottom` rows (the band above needs them) and last `top` rows (for the band below)."""
        top, bottom = self.halo
        return x[:, :, :bottom], x[:, :, x.shape[2] - top :]

    def _start_exchange(self, x: torch.Tensor) -> Pending[Halo]:
        """A fresh step: send this band's edges to the neighbours and receive theirs (kept if the next step is
        stale)."""
        ctx = self.patch_ctx
        pending = ctx.comm.exchange_neighbours_async(*self._edges(x), ctx.label("conv_halo"))
        self._stale = pending if ctx.publish else None
        return pending

    def _exchange(self, x: torch.Tensor) -> Halo:
        ctx = self.patch_ctx
        if not ctx.stale:
            return self._start_exchange(x).wait()
        halo = self._stale.wait()  # type: ignore[union-attr]
        if isinstance(self._stale, Slot):  # copied: a full bucket relaunches into the gathered buffer
            halo = tuple(None if h is None else h.clone() for h in self._neighbours_edges(halo))
        if ctx.publish:  # else kept: a served step's successor reads it again
            self._stale = ctx.stale_gather.submit(torch.cat(self._edges(x), dim=2), ctx.label("conv_halo"))
        return halo

    def _neighbours_edges(self, everyone: torch.Tensor) -> Halo:
        """From every band's gathered `[first bottom rows | last top rows]`, the two neighbours' halo."""
        rank, size, bottom = self.patch_ctx.comm.rank, self.patch_ctx.comm.size, self.halo[1]
        from_prev = everyone[rank - 1][:, :, bottom:] if rank > 0 else None
        from_next = everyone[rank + 1][:, :, :bottom] if rank < size - 1 else None
        return from_prev, from_next

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        interior = self._interior(x.shape[2])
        if interior is None or self.patch_ctx.stale or not self.overlap_halo:
            return self.convolve(torch.cat(self._padded_halo(x, self._exchange(x)), dim=2))
        first, last = interior  # output rows [first, last) read only this band's rows
        pending = self._start_exchange(x)
        top, stride, span = self.halo[0], self.stride[0], self.span
        middle = self.convolve(x[:, :, first * stride - top : (last - 1) * stride + span - top])
        from_prev, band, from_next = self._padded_halo(x, pending.wait())
        upper = self.convolve(torch.cat([from_prev, band[:, :, : (first - 1) * stride + span - top]], dim=2))
        lower = self.convolve(torch.cat([band[:, :, last * stride - top :], from_next], dim=2))
        return torch.cat([upper, middle, lower], dim=2)

    def _interior(self, rows: int) -> tuple[int, int] | None:
        """Output rows `[first, last)` whose input window lies inside a band of `rows` rows (None when there
        is no such row, or no edge row either side, so nothing is gained by splitting the conv)."""
        top, bottom = self.halo
        stride, span = self.stride[0], self.span
        outputs = (top + rows + bottom - span) // stride + 1
        first = -(-top // stride)
        last = (top + rows - span) // stride + 1
        if first < 1 or last >= outputs or last - first < 1:
            return None
        return first, last

    @staticmethod
    def _zeros_for(x: torch.Tensor, rows: int) -> torch.Tensor:
        return x.new_zeros(x.shape[0], x.shape[1], rows, x.shape[3])

    def _padded_halo(self, x: torch.Tensor, halo: Halo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows above, the band, rows below), zeros standing in at the image's edges."""
        from_prev, from_next = halo
        top, bottom = self.halo
        return (self._zeros_for(x, top) if from_prev is None else from_prev, x,
                self._zeros_for(x, bottom) if from_next is None else from_next)

    def convolve(self, padded: torch.Tensor) -> torch.Tensor:
        """The conv over rows already padded (its own padding along columns only)."""
        return F.conv2d(padded, self.weight, self.bias, self.stride, (0, self.padding[1]), self.dilation, self.groups)


class PatchInputConv2d(PatchConv2d):
    """The model's first conv (`conv_in`), whose input every rank holds whole (the latent): its halo rows are read
    from that input, fresh in every step and with no exchange. (A stale halo there would put last step's latent
    rows at every band's edge, for no saving.)"""

    overlap_halo = False  # nothing travels

    def _exchange(self, x: torch.Tensor) -> Halo:
        ctx, (top, bottom) = self.patch_ctx, self.halo
        whole = ctx.whole_input
        if whole is None or whole.shape[2] != ctx.latent_shape[0]:
            raise RuntimeError("the first conv of a patch-parallel model needs the whole input of the step")
        rows = whole.shape[2]
        start, stop = band_bounds(rows, ctx.comm.size, ctx.comm.rank)
        from_prev = whole[:, :, start - top : start] if start > 0 and top else None
        from_next = whole[:, :, stop : stop + bottom] if stop < rows and bottom else None
        return from_prev, from_next
