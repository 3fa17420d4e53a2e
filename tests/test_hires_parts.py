"""The parts of the hires mode, one process: window layout and balance, LR noise, weight schedule, mask
normalisation, x̂0 against the schedulers' own, the map-recording attention processor, option checks."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from paragen.parallel.hires import HiresConfig
from paragen.parallel.hires.attention_map import MapAttnProcessor, MapRecorder
from paragen.parallel.hires.guidance import low_res_size, normalise_map, pooled_noise, weight
from paragen.parallel.hires.windows import assign, coverage, window_grid, window_starts
from paragen.pipelines.scheduler_math import predicted_original


@pytest.mark.parametrize("length,window,stride", [(64, 64, 32), (128, 64, 32), (100, 64, 32), (200, 64, 48), (70, 16, 5)])
def test_windows_cover_evenly_within_the_stride(length, window, stride):
    starts = window_starts(length, window, stride)
    assert starts[0] == 0 and starts[-1] + window == length
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(0 < g <= stride for g in gaps) and (not gaps or max(gaps) - min(gaps) <= 1)


def test_coverage_counts_every_window():
    windows = window_grid(24, 40, 16, 8)
    count = coverage(24, 40, windows)
    assert count.min() >= 1 and count.sum() == len(windows) * 16 * 16
    assert len(windows) == 2 * 4


@pytest.mark.parametrize("windows,ranks", [(9, 2), (9, 4), (6, 4), (3, 4), (1, 2)])
def test_assignment_is_balanced_in_units(windows, ranks):
    a = assign(windows, ranks, "interleaved")
    loads = [a.load(r) for r in range(ranks)]
    assert sum(loads) == windows + 1 and max(loads) - min(loads) <= 1
    assert sorted(i for owned in a.windows for i in owned) == list(range(windows))
    d = assign(windows, ranks, "dedicated")
    assert d.windows[d.lr_rank] == () and sorted(i for owned in d.windows for i in owned) == list(range(windows))


def test_too_many_ranks_for_the_windows():
    with pytest.raises(ValueError, match="no work"):
        assign(2, 4, "interleaved")


def test_low_res_keeps_the_aspect_with_the_window_as_longer_side():
    assert low_res_size(128, 128, 64, 4) == (64, 64)
    assert low_res_size(96, 192, 64, 4) == (32, 64)
    assert low_res_size(130, 70, 64, 8) == (64, 32)


def test_pooled_noise_has_unit_variance():
    noise = torch.randn(4, 4, 300, 200, generator=torch.Generator().manual_seed(0))
    for size in ((150, 100), (64, 64), (77, 31)):
        pooled = pooled_noise(noise, size)
        assert pooled.shape[-2:] == size
        assert abs(pooled.std().item() - 1) < 0.05 and abs(pooled.mean().item()) < 0.05


def test_weight_decays_from_w0_to_zero():
    ws = [weight(s, 2, 12, 0.8, 1.0) for s in range(2, 12)]
    assert ws[0] == pytest.approx(0.8) and all(a > b for a, b in zip(ws, ws[1:])) and ws[-1] > 0
    assert weight(7, 2, 12, 0.8, 1.0) == pytest.approx(0.8 * 0.5)  # halfway: (1 + cos(π/2)) / 2
    assert weight(9, 2, 12, 0.5, 0.0) == 0.5


def test_map_normalisation():
    maps = torch.stack([torch.arange(12.0).view(3, 4), torch.full((3, 4), 2.0)])
    out = normalise_map(maps)
    assert out[0].min() == 0 and out[0].max() == 1 and torch.all(out[1] == 0)


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, EulerDiscreteScheduler])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_predicted_original_matches_the_schedulers_own(scheduler_class, prediction):
    sched = scheduler_class(prediction_type=prediction)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps[:3]:
        out = torch.randn(1, 4, 8, 8, generator=g)
        sched.scale_model_input(sample, t)
        mine = predicted_original(sched, sample, out, t)
        theirs = sched.step(out, t, sample).pred_original_sample
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        sample = torch.randn(1, 4, 8, 8, generator=g) * 3


def test_map_processor_equals_diffusers_and_records_the_attention():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8)
    x, text = torch.randn(2, 8 * 4, 32), torch.randn(2, 7, 16)
    attn.set_processor(AttnProcessor2_0())
    expected = attn(x, text)
    recorder = MapRecorder()
    attn.set_processor(MapAttnProcessor(recorder))
    torch.testing.assert_close(attn(x, text), expected)
    recorder.start((8, 4), slice(1, 3), slice(1, 2))
    torch.testing.assert_close(attn(x, text), expected, rtol=1e-5, atol=1e-5)
    got = recorder.stop()
    q = attn.to_q(x[1:]).view(1, 32, 4, 8).transpose(1, 2)
    k = attn.to_k(text[1:]).view(1, 7, 4, 8).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    raw = probs[..., 1:3].mean(dim=(1, 3)).view(1, 8, 4)
    torch.testing.assert_close(got[:, 0], normalise_map(raw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options,message", [
    ({"window": 16, "stride": 17}, "larger than the window"),
    ({"guidance_weight": 1.5}, r"\[0, 1\]"),
    ({"guidance_weight": -0.1}, r"\[0, 1\]"),
    ({"guidance": "later"}, "async, sync"),
    ({"structure_fraction": 1.0}, r"\[0, 1\)"),
    ({"map_layers": ()}, "map_layers"),
    ({"window_batch": 0}, "window_batch"),
    ({"placement": "anywhere"}, "interleaved, dedicated"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        HiresConfig(**options)
