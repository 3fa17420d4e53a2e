"""The parts of clip parallelism checked on their own: layout, masks, merged attention, GroupNorm statistics
with uneven clips, frame positions, segments, options, and the embedded video models."""
from __future__ import annotations

import math

import pytest
import torch

from paragen.kernels.attention import masked_attention_with_lse, merge_attention_states
from paragen.parallel.clip import TemporalAttention, global_frame_indices, plan_clips
from paragen.parallel.clip.attention import window_mask
from paragen.parallel.clip.context import ClipContext
from paragen.parallel.clip.positions import sinusoid
from paragen.parallel.group_norm import combine_group_stats, part_stats
from paragen.parallel.partition import split_sizes
from paragen.pipelines.loading import load_pipeline
from paragen.pipelines.segments import segment_bounds


def test_clips_are_contiguous_and_as_even_as_possible():
    assert split_sizes(18, 4) == [5, 5, 4, 4]
    layout = plan_clips(18, 4, TemporalAttention(local=4, global_frames=6), conv_halo=4)
    assert [layout.bounds(i) for i in range(4)] == [(0, 5), (5, 10), (10, 14), (14, 18)]
    assert layout.global_frames == (0, 3, 7, 10, 14, 17)
    assert layout.global_in(1) == [2] and layout.global_in(3) == [0, 3]


def test_global_frames_are_even_and_capped():
    assert global_frame_indices(5, 16) == [0, 1, 2, 3, 4]
    picked = global_frame_indices(2300, 16)
    assert len(picked) == 16 and picked[0] == 0 and picked[-1] == 2299
    gaps = [b - a for a, b in zip(picked, picked[1:])]
    assert max(gaps) - min(gaps) <= 1


@pytest.mark.parametrize("frames,clips,halo,message", [
    (3, 4, 0, "more ranks than frames"),
    (12, 2, 0, "clips shorter than the halo"),  # the ±8 window
    (0, 1, 0, "positive"),
])
def test_bad_layouts_are_refused(frames, clips, halo, message):
    with pytest.raises(ValueError, match=message):
        plan_clips(frames, clips, TemporalAttention(), conv_halo=halo)


def test_full_scope_needs_only_the_conv_halo():
    plan_clips(8, 2, TemporalAttention(scope="full"), conv_halo=4)
    with pytest.raises(ValueError, match="stacked halo of 4"):
        plan_clips(6, 2, TemporalAttention(scope="full"), conv_halo=4)


def test_masked_parts_merge_to_attention_over_the_union():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 8) for _ in range(3))
    frames = torch.arange(6)
    near = window_mask(frames, frames, 1)
    # the part of the keys within ±1, merged with the part beyond: attention over all keys
    a = masked_attention_with_lse(q, k, v, near)
    b = masked_attention_with_lse(q, k, v, torch.where(near == 0, float("-inf"), 0.0))
    out, lse = merge_attention_states(*a, *b)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    assert torch.allclose(out, torch.softmax(scores, -1) @ v, atol=1e-5)
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-5)


def test_a_query_that_sees_no_key_adds_nothing():
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    out, lse = masked_attention_with_lse(q, k, v, torch.full((2, 3), float("-inf")))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
    other = masked_attention_with_lse(q, k, v, torch.zeros(2, 3))
    merged, _ = merge_attention_states(out, lse, *other)
    assert torch.allclose(merged, other[0])


def test_group_stats_of_uneven_clips_equal_the_whole_video():
    torch.manual_seed(1)
    video = torch.randn(2, 8, 11, 3, 3) * 3 + 1
    parts = [video[:, :, :6], video[:, :, 6:]]
    stats = [part_stats(p, 4) for p in parts]
    mean, var = combine_group_stats(torch.stack([s for s, _ in stats]), [n for _, n in stats])
    grouped = video.reshape(2, 4, -1)
    assert torch.allclose(mean, grouped.mean(-1), atol=1e-5)
    assert torch.allclose(var, grouped.var(-1, correction=0), atol=1e-4)


def test_frame_positions_are_global_and_stretched_beyond_the_table():
    ctx = ClipContext(comm=type("C", (), {"rank": 1, "size": 2})(), temporal=TemporalAttention())
    ctx.layout = plan_clips(20, 2, TemporalAttention(local=4), 0)
    assert ctx.frame_positions(32).tolist() == list(range(10, 20))
    ctx.layout = plan_clips(64, 2, TemporalAttention(), 0)
    stretched = ctx.frame_positions(32)
    assert stretched[-1].item() == pytest.approx(31.0) and stretched[0].item() == pytest.approx(32 * 31 / 63)
    assert (stretched.diff() > 0).all()


def test_sinusoid_matches_the_models_table_at_whole_positions():
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    table = SinusoidalPositionalEmbedding(16, 32).pe[0]
    assert torch.allclose(sinusoid(torch.arange(32, dtype=torch.float32), 16), table, atol=1e-6)


def test_bias_switches_from_global_to_local():
    ctx = ClipContext(comm=None, temporal=TemporalAttention(bias=10.0, bias_switch=800))
    ctx.timestep = 900
    assert ctx.biases() == (0.0, 10.0)
    ctx.timestep = 500
    assert ctx.biases() == (10.0, 0.0)


def test_segments():
    assert segment_bounds(5, 2, None) == [0, 0, 0, 1, 1]
    assert segment_bounds(4, 2, [1, 3]) == [0, 1, 1, 1]
    with pytest.raises(ValueError, match="but 3 segment lengths"):
        segment_bounds(6, 2, [2, 2, 2])
    with pytest.raises(ValueError, match="at least one frame"):
        segment_bounds(2, 3, None)


@pytest.mark.parametrize("options,message", [
    ({"scope": "both"}, "scope"), ({"local": 0}, "half width"), ({"global_frames": 0}, "global_frames"),
    ({"bias_switch": -1}, "bias_switch"),
])
def test_temporal_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        TemporalAttention(**options)


@pytest.mark.parametrize("name,cls", [("tiny-t2v", "TextToVideoSDPipeline"), ("tiny-animatediff", "AnimateDiffPipeline")])
def test_embedded_video_models(name, cls):
    pipe = load_pipeline(name)
    assert type(pipe).__name__ == cls
    zero = [n for n, p in pipe.unet.named_parameters() if p.dim() > 1 and not p.any()]
    assert not zero, f"zero-initialised layers would make the temporal parts an identity: {zero}"
