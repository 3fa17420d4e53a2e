"""Pieces of the Wan workload that need no process group: the interleaved rotary embedding against a
pair-by-pair reference, the registry's choice and the head check, on the embedded tiny-wan."""
from __future__ import annotations

import math

import pytest
import torch

from paragen.kernels.rope import apply_rope_pairs
from paragen.parallel.config import ExchangeConfig, ParallelConfig
from paragen.pipelines import registry
from paragen.pipelines.loading import load_pipeline


def test_interleaved_rope_rotates_each_pair_by_its_angle():
    torch.manual_seed(0)
    states = torch.randn(2, 5, 3, 8)  # [B, L, H, D]
    angles = torch.rand(5, 4, dtype=torch.float64) * 6  # one angle per position and pair
    cos = angles.cos().repeat_interleave(2, dim=-1)[None, :, None]  # [1, L, 1, D], both members of a pair
    sin = angles.sin().repeat_interleave(2, dim=-1)[None, :, None]
    out = apply_rope_pairs(states, cos, sin)
    assert out.dtype == states.dtype
    for position in range(5):
        for pair in range(4):
            c, s = math.cos(angles[position, pair]), math.sin(angles[position, pair])
            x, y = states[..., position, :, 2 * pair], states[..., position, :, 2 * pair + 1]
            torch.testing.assert_close(out[..., position, :, 2 * pair], x * c - y * s)
            torch.testing.assert_close(out[..., position, :, 2 * pair + 1], x * s + y * c)


def test_wan_pipelines_go_to_the_wan_workload_which_checks_heads_and_modes():
    from paragen.pipelines.wan import check

    workload = registry.find("WanPipeline", ExchangeConfig())
    assert workload.name == "wan" and workload.job == "video"
    with pytest.raises(TypeError, match="got WanPipeline \\(with TemporalAttention options\\)"):
        registry.find("WanPipeline", registry.TemporalAttention())
    pipe = load_pipeline("tiny-wan")
    check(pipe, workload.resolve(ParallelConfig(ulysses=4), 4), ExchangeConfig())
    with pytest.raises(ValueError, match="ulysses=8 does not divide the 4 attention heads"):
        check(pipe, workload.resolve(ParallelConfig(ulysses=8), 8), ExchangeConfig())
    with pytest.raises(ValueError, match="exact sequence parallelism"):
        check(pipe, workload.resolve(ParallelConfig(ring=2), 2), ExchangeConfig(mode="displaced"))
