"""A fresh step's halo conv is split: the band's interior rows are convolved while the halo travels, the edge
rows after it arrived. The split output must equal one conv over the band padded with its halo, for every
kernel, stride, padding and dilation a UNet or VAE uses (and odd ones). One process: the "exchange" hands
back a given halo at once."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from paragen.comms import ready
from paragen.parallel.patch.conv import PatchConv2d


class _Comm:
    rank, size = 0, 2
    halo = (None, None)

    def exchange_neighbours_async(self, to_prev, to_next, label):
        return ready(self.halo)


class _Ctx:
    stale = publish = False
    comm = _Comm()

    def label(self, name):
        return name

    def on_reset(self, callback):
        pass


# (kernel, stride, padding, dilation, band rows), leaving out convs that would drop rows of a band (refused)
CASES = [(k, s, p, d, rows) for k, s, p, d, rows in itertools.product([1, 3, 5], [1, 2], [0, 1, 2], [1, 2], [7, 12])
         if d * (k - 1) + 1 - p - s >= 0]


@pytest.mark.parametrize("kernel,stride,padding,dilation,rows", CASES)
@pytest.mark.parametrize("edge", ["first", "middle", "last"])
def test_split_conv_equals_the_padded_conv(kernel, stride, padding, dilation, rows, edge):
    torch.manual_seed(kernel * 100 + stride * 10 + padding + dilation + rows)
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation)
    PatchConv2d.convert(conv, _Ctx())
    top, bottom = conv.halo
    x = torch.randn(2, 3, rows, 13)
    above = torch.randn(2, 3, top, 13) if edge != "first" else None
    below = torch.randn(2, 3, bottom, 13) if edge != "last" else None
    _Comm.halo = (above, below)
    padded = torch.cat([torch.zeros(2, 3, top, 13) if above is None else above, x,
                        torch.zeros(2, 3, bottom, 13) if below is None else below], dim=2)
    expected = F.conv2d(padded, conv.weight, conv.bias, stride, (0, padding), dilation)
    with torch.no_grad():
        out = conv(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_the_split_is_used_for_a_unet_conv():
    conv = PatchConv2d.convert(nn.Conv2d(3, 4, 3, padding=1), _Ctx())
    assert conv._interior(8) == (1, 7)  # outputs 1..6 read only the band; 0 and 7 need the halo
    assert PatchConv2d.convert(nn.Conv2d(3, 4, 3, stride=2, padding=1), _Ctx())._interior(8) is None  # no rows below
