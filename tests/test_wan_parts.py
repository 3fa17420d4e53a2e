"""Pieces of the Wan workload that need no process group: the interleaved rotary embedding against a
pair-by-pair reference, the registry's choice and the head and bias checks on the embedded tiny-wan, and the
layout of a video's tokens over clips and sequence shards against hand-counted cases."""
from __future__ import annotations

import math

import pytest
import torch

from paragen.kernels.rope import apply_rope_pairs
from paragen.parallel.clip import TemporalAttention, plan_clips
from paragen.parallel.clip.tokens import ClipTokens
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


def test_wan_pipelines_go_to_the_wan_workload_which_checks_heads_and_bias():
    from paragen.pipelines.wan import check

    workload = registry.find("WanPipeline", TemporalAttention())
    assert workload.name == "wan" and workload.job == "video" and "clip" in workload.degrees
    with pytest.raises(TypeError, match="got WanPipeline \\(with ExchangeConfig options\\)"):
        registry.find("WanPipeline", ExchangeConfig())
    pipe = load_pipeline("tiny-wan")
    check(pipe, workload.resolve(ParallelConfig(ulysses=4), 4), TemporalAttention())
    check(pipe, workload.resolve(ParallelConfig(clip=2, ulysses=2), 4), TemporalAttention(bias=0.0))
    with pytest.raises(ValueError, match="ulysses=8 does not divide the 4 attention heads"):
        check(pipe, workload.resolve(ParallelConfig(ulysses=8), 8), TemporalAttention())
    with pytest.raises(ValueError, match="a local/global bias is not supported"):
        check(pipe, workload.resolve(ParallelConfig(clip=2), 2), TemporalAttention(bias=10.0))
    assert workload.resolve(ParallelConfig(clip=-1), 4) == ParallelConfig(clip=1, ring=4).resolve(4)


def _tokens(frames: int, clips: int, shards: int, scope: str = "dual", local: int = 2, count: int = 3) -> ClipTokens:
    temporal = TemporalAttention(scope=scope, local=local, global_frames=count)
    return ClipTokens(plan_clips(frames, clips, temporal, conv_halo=0), 15, shards, scope, local)


def test_clip_tokens_are_cut_by_frames_then_shards_in_video_order():
    layout = _tokens(9, 2, 2)  # clips of 5 and 4 frames: 75 and 60 tokens, each in two shards
    assert layout.sizes == [38, 37, 30, 30]
    assert [layout.bounds(shard) for shard in range(4)] == [(0, 38), (38, 75), (75, 105), (105, 135)]


def test_dual_scope_sees_the_halo_and_the_global_frames_once_and_full_scope_everything():
    layout = _tokens(9, 2, 1)  # clips [0, 5) and [5, 9); global frames 0, 4, 8
    assert layout.seen_frames(0) == [5, 6, 8]  # halo 5, 6; global 8 (0 and 4 are its own)
    assert layout.seen_frames(1) == [0, 3, 4]  # halo 3, 4 (4 is global too: once); global 0
    assert _tokens(9, 2, 1, scope="full").seen_frames(1) == [0, 1, 2, 3, 4]
    middle = _tokens(12, 3, 1, local=1, count=2)  # clips [0, 4), [4, 8), [8, 12); global frames 0, 11
    assert middle.seen_frames(1) == [0, 3, 8, 11]


def test_pieces_are_the_source_tokens_in_the_frames_the_destination_sees():
    layout = _tokens(9, 2, 2)  # shard 0: tokens [0, 38) = frames 0, 1 and 8 tokens of 2; shard 1: [38, 75)
    assert layout.pieces(0, 2) == [(0, 15)]  # clip 1 sees frame 0 of shard 0
    assert layout.pieces(1, 3) == [(45, 75)]  # and frames 3, 4 of shard 1, one range
    assert layout.pieces(0, 1) == [] and layout.seen_tokens(1, 2) == 30
    assert layout.pieces(2, 0) == [(75, 105)] and layout.pieces(3, 0) == [(120, 135)]  # frames 5, 6 | 8
