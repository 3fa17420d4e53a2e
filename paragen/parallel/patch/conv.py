"""`PatchConv2d`: a Conv2d on a row band that fetches its halo rows from the neighbouring bands."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from paragen.comms import Pending, Slot, ready
from paragen.parallel.partition import band_bounds, conv_halo
from paragen.parallel.patch.context import PatchContext

Halo = tuple[torch.Tensor | None, torch.Tensor | None]


class PatchConv2d(nn.Conv2d):
    """In-place subclass of `nn.Conv2d` (same parameters and state-dict keys).

    The band is extended by `top` rows from the band above and `bottom` rows from the band below
    (zeros at the image edges, which is the conv's own zero padding), then convolved with no
    padding along rows. Fresh steps exchange the halo by blocking P2P with the two neighbours. Stale
    steps use the halo of the previous step, and publish this step's edge rows in the flat async
    all-gather with every other stale tensor (as DistriFusion does): gloo can block for tens of
    milliseconds while *posting* a P2P receive whose data already arrived, which would stall the conv.
    """

    patch_ctx: PatchContext

    @classmethod
    def convert(cls, conv: nn.Conv2d, ctx: PatchContext) -> "PatchConv2d":
        """Turn `conv` into a PatchConv2d in place and return it."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"patch parallelism supports zero-padded convs with numeric padding, not {conv}")
        conv.__class__ = cls
        conv.patch_ctx = ctx
        conv.halo = conv_halo(conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0])
        conv._stale: Pending[Halo] | Slot | None = None
        ctx.on_reset(conv.reset)
        return conv  # type: ignore[return-value]

    def reset(self) -> None:
        """Drop the halo kept for the next step."""
        self._stale = None

    def _exchange(self, x: torch.Tensor) -> Halo:
        ctx, (top, bottom) = self.patch_ctx, self.halo
        to_prev, to_next = x[:, :, :bottom], x[:, :, x.shape[2] - top :]
        label = ctx.label("conv_halo")
        if ctx.stale:
            halo = self._stale.wait()  # type: ignore[union-attr]
            if isinstance(self._stale, Slot):  # copied: a full bucket relaunches into the gathered buffer
                halo = tuple(None if h is None else h.clone() for h in self._neighbours_edges(halo))
            self._stale = None
            if ctx.publish:
                self._stale = ctx.stale_gather.submit(torch.cat([to_prev, to_next], dim=2), label)
            return halo
        halo = ctx.comm.exchange_neighbours_async(to_prev, to_next, label).wait()
        self._stale = ready(halo) if ctx.publish else None
        return halo

    def _neighbours_edges(self, everyone: torch.Tensor) -> Halo:
        """From every band's gathered `[first bottom rows | last top rows]`, the two neighbours' halo."""
        rank, size, bottom = self.patch_ctx.comm.rank, self.patch_ctx.comm.size, self.halo[1]
        from_prev = everyone[rank - 1][:, :, bottom:] if rank > 0 else None
        from_next = everyone[rank + 1][:, :, :bottom] if rank < size - 1 else None
        return from_prev, from_next

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self.halo
        from_prev, from_next = self._exchange(x)
        batch, channels, _, width = x.shape
        if from_prev is None:
            from_prev = x.new_zeros(batch, channels, top, width)
        if from_next is None:
            from_next = x.new_zeros(batch, channels, bottom, width)
        padded = torch.cat([from_prev, x, from_next], dim=2)
        return F.conv2d(padded, self.weight, self.bias, self.stride, (0, self.padding[1]), self.dilation, self.groups)


class PatchInputConv2d(PatchConv2d):
    """The model's first conv (`conv_in`), whose input every rank holds whole (the latent): its halo rows are read
    from that input, fresh in every step and with no exchange. (A stale halo there would put last step's latent
    rows at every band's edge, for no saving.)"""

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
