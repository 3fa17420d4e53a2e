"""`ClipTemporalConv`: a stack of temporal convolutions (diffusers' `TemporalConvLayer`) on one clip.

The stack is four (GroupNorm, SiLU, Dropout, Conv3d (3,1,1)) blocks. Each conv reaches one frame past either
side, so the stack reaches four: the clip fetches that many edge frames from each neighbouring clip once,
by P2P, and computes the blocks on the extended clip; each conv consumes one halo frame per side (at the
video's ends it zero-pads, as the conv does on one device). The GroupNorms use the whole video's
statistics, taken from the clips' own frames (halo frames are normalised with them too), so the result is
exact.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from paragen.parallel.clip.context import ClipContext
from paragen.parallel.clip.norm import ClipGroupNorm
from paragen.parallel.group_norm import normalise_with


def _temporal_reach(conv: nn.Conv3d) -> int:
    """Frames a (k,1,1)-style Conv3d reads on each side; ValueError for a conv this layer cannot split."""
    k, stride, pad, dil = conv.kernel_size[0], conv.stride[0], conv.padding, conv.dilation[0]
    if isinstance(pad, str) or stride != 1 or conv.padding_mode != "zeros" or pad[0] * 2 != dil * (k - 1):
        raise ValueError(f"clip parallelism splits stride-1, symmetric zero-padded temporal convs, not {conv}")
    return pad[0]


class ClipTemporalConv(nn.Module):
    """In-place replacement of a `TemporalConvLayer`'s class (same parameters and state-dict keys)."""

    clip_ctx: ClipContext
    halo: int

    @classmethod
    def convert(cls, layer: nn.Module, ctx: ClipContext) -> "ClipTemporalConv":
        """Turn diffusers' `TemporalConvLayer` `layer` into a ClipTemporalConv in place and return it."""
        blocks = [layer.conv1, layer.conv2, layer.conv3, layer.conv4]
        for block in blocks:
            if not (isinstance(block[0], nn.GroupNorm) and isinstance(block[-1], nn.Conv3d)):
                raise ValueError(f"unexpected temporal conv block {block}")
            ClipGroupNorm.convert(block[0], ctx)
        layer.__class__ = cls
        layer.clip_ctx = ctx
        layer.halo = sum(_temporal_reach(block[-1]) for block in blocks)
        return layer  # type: ignore[return-value]

    def forward(self, hidden_states: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        x = hidden_states[None, :].reshape((-1, num_frames) + hidden_states.shape[1:]).permute(0, 2, 1, 3, 4)
        ctx, halo = self.clip_ctx, self.halo
        pending = ctx.comm.exchange_neighbours_async(x[:, :, :halo], x[:, :, num_frames - halo :], "clip.conv_halo")
        first_stats = self.conv1[0].video_stats(x)  # needs only our own frames: runs while the halo travels
        from_prev, from_next = pending.wait()
        h = torch.cat([t for t in (from_prev, x, from_next) if t is not None], dim=2)
        left = 0 if from_prev is None else halo
        right = 0 if from_next is None else halo
        for index, block in enumerate((self.conv1, self.conv2, self.conv3, self.conv4)):
            norm, conv = block[0], block[-1]
            stats = first_stats if index == 0 else norm.video_stats(h[:, :, left : h.shape[2] - right])
            h = normalise_with(norm, h, *stats)
            for module in block[1:-1]:
                h = module(h)
            reach = conv.padding[0]
            pad_left, pad_right = (reach if from_prev is None else 0), (reach if from_next is None else 0)
            h = F.pad(h, (0, 0, 0, 0, pad_left, pad_right))
            h = F.conv3d(h, conv.weight, conv.bias, conv.stride, (0,) + tuple(conv.padding[1:]), conv.dilation, conv.groups)
            left -= reach - pad_left
            right -= reach - pad_right
        out = x + h
        return out.permute(0, 2, 1, 3, 4).reshape((out.shape[0] * out.shape[2], -1) + out.shape[3:])

