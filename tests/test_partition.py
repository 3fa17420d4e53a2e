"""Partition and halo maths, and the checks on sizes and degrees (no process group needed)."""
import pytest
import torch
import torch.nn.functional as F

from paragen.parallel import ExchangeConfig, HiresConfig, ParallelConfig
from paragen.parallel.partition import band_bounds, check_image_size, conv_halo, partial_rows


def test_bands_tile_the_rows():
    bounds = [band_bounds(24, 4, i) for i in range(4)]
    assert bounds == [(0, 6), (6, 12), (12, 18), (18, 24)]
    with pytest.raises(ValueError, match="equal bands"):
        band_bounds(10, 4, 0)


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1), (3, 1, 2, 2), (1, 1, 0, 1)])
def test_conv_on_bands_with_halo_equals_full_conv(kernel, stride, padding, dilation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 16, 5, generator=g)
    w = torch.randn(3, 2, kernel, kernel, generator=g)
    full = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
    top, bottom = conv_halo(kernel, stride, padding, dilation)
    padded = F.pad(x, (0, 0, top, bottom))  # zeros beyond the image, like the conv's padding
    outs = []
    for i in range(4):
        start, stop = band_bounds(16, 4, i)
        band = padded[:, :, start : stop + top + bottom]
        outs.append(F.conv2d(band, w, stride=stride, padding=(0, padding), dilation=dilation))
    assert torch.allclose(torch.cat(outs, dim=2), full, atol=1e-5)


def test_conv_halo_refuses_convs_that_drop_rows():
    with pytest.raises(ValueError):
        conv_halo(1, 2, 0)


def test_partial_rows():
    assert partial_rows(10, 0.3) == 3
    assert partial_rows(2, 0.3) == 1  # at least one row
    assert partial_rows(4, 1.0) == 4


def test_image_size_checks():
    check_image_size(512, 512, vae_factor=8, unet_factor=4, patch=2, decode_parts=2)
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        check_image_size(500, 512, vae_factor=8, unet_factor=4, patch=2, decode_parts=2)
    with pytest.raises(ValueError, match="more ranks than latent rows"):
        check_image_size(64, 64, vae_factor=8, unet_factor=1, patch=16, decode_parts=16)
    with pytest.raises(ValueError, match="multiple of 128"):
        check_image_size(192, 256, vae_factor=8, unet_factor=4, patch=4, decode_parts=4)
    with pytest.raises(ValueError, match="must be positive"):
        check_image_size(0, 64, vae_factor=8, unet_factor=4, patch=1, decode_parts=1)


def test_config_resolves_and_names_every_factor():
    assert ParallelConfig().resolve(4).patch == 4
    assert ParallelConfig(cfg=2).resolve(4).patch == 2
    with pytest.raises(ValueError, match=r"cfg \(1\) × clip \(1\) × patch \(3\) × ulysses \(1\) × ring \(1\) = 3, but the world size is 4"):
        ParallelConfig(patch=3).resolve(4)
    resolved = ParallelConfig(ulysses=2, ring=2).resolve(4)
    assert (resolved.patch, resolved.sequence) == (1, 4)
    with pytest.raises(ValueError, match=r"ulysses \(2\) × ring \(1\) = 2, but the world size is 4"):
        ParallelConfig(ulysses=2, patch=1).resolve(4)
    with pytest.raises(ValueError, match="even world size"):
        ParallelConfig(cfg=2).resolve(3)
    for bad in (dict(cfg=3), dict(patch=0), dict(ulysses=0), dict(ring=0), dict(tp=-1)):
        with pytest.raises(ValueError):
            ParallelConfig(**bad)
    for bad in (dict(mode="fast"), dict(warmup_steps=-1), dict(partial_fraction=0)):
        with pytest.raises(ValueError):
            ExchangeConfig(**bad)


def test_workload_options_given_the_old_way_still_work_with_a_warning():
    with pytest.warns(DeprecationWarning, match="ExchangeConfig"):
        config = ParallelConfig(cfg=2, mode="displaced", warmup_steps=2)
    assert config == ParallelConfig(cfg=2) and config.legacy_options == ExchangeConfig(mode="displaced", warmup_steps=2)
    with pytest.warns(DeprecationWarning, match="HiresConfig"):
        assert ParallelConfig(hires=HiresConfig(guidance="sync")).legacy_options == HiresConfig(guidance="sync")
    with pytest.raises(ValueError, match="different workloads"):
        ParallelConfig(mode="displaced", hires=HiresConfig())
    with pytest.raises(TypeError, match="unexpected arguments fast"):
        ParallelConfig(fast=True)
