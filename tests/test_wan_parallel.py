"""Clip and sequence parallelism of the Wan video transformer (embedded tiny-wan) on real gloo ranks against the
single-process pipeline: Ulysses, Ring, both, and CFG over rank halves equal it (fp32, max |Δ| ≤ 1e-4), at a
latent frame count (5) that no rank count divides and token counts that do (80) and do not (75) split evenly;
clips of latent frames (9, over 2 and 4 clips: uneven) with `full` scope equal it too, alone and with Ulysses,
Ring and CFG inside; `dual` scope equals a separately written single-process reference (tests/wan_reference.py:
a frame mask over the whole sequence), overlapped and blocking, and sends each clip exactly the K/V of the frames
it sees;
the VAE decode in time chunks over the ranks equals the one-process decode (chunks of uneven length, and a rank
with no latent frame); frame counts the Wan VAE cannot take and degrees that do not divide the ranks are refused
on every rank. Wan2.2's two experts (tiny-wan22: the high-noise transformer, then the low-noise `transformer_2`)
equal one process too: Ring at 2 ranks, full-scope clips × Ring at 4.
"""
from __future__ import annotations

import pytest

from paragen.pipelines.loading import load_pipeline
from tests.multiproc import run_spec_worker
from tests.wan_reference import install_segment_reference, install_wan_reference
from tests.workers.wan_worker import generate, latent

pytestmark = pytest.mark.slow  # multi-process end-to-end runs (make test-fast skips them)

FRAMES, STEPS = 17, 2  # 17 frames: 5 latent frames
SIZES = {"even": (64, 64), "uneven": (48, 80)}  # 5 × 4 × 4 = 80 and 5 × 3 × 5 = 75 video tokens
EXACT_ATOL = 1e-4
VAE_FRAMES = {2: (5, 2), 4: (5, 3)}  # latent frames: uneven chunks; 4 chunks of 3 frames leave a rank without one
LAYOUTS = {
    2: {"ulysses": {"ulysses": 2}, "ring": {"ring": 2}, "cfg": {"cfg": 2}},
    4: {"ulysses": {"ulysses": 4}, "ring": {"ring": 4}, "ulysses_ring": {"ulysses": 2, "ring": 2},
        "cfg_ring": {"cfg": 2, "ring": 2}},
}
CLIP_FRAMES, LATENT, LOCAL, GLOBAL = 33, 9, 2, 3  # 9 latent frames of 3 × 5 tokens; halo 2, global frames 0, 4, 8
HEADS_DIM, LAYERS = 64, 2  # tiny-wan: 4 heads × 16, 2 blocks
CLIPS = {  # name -> (degrees, scope); "full" must equal the single-process video, "dual" the reference
    2: {"clip_full": ({"clip": 2}, "full"), "clip_dual": ({"clip": 2}, "dual"),
        "clip_dual_blocking": ({"clip": 2, "overlap": False}, "dual")},
    4: {"clip_ring_full": ({"clip": 2, "ring": 2}, "full"), "cfg_clip_full": ({"cfg": 2, "clip": 2}, "full"),
        "clip_ulysses_dual": ({"clip": 2, "ulysses": 2}, "dual"), "clip4_dual": ({"clip": 4}, "dual")},
}
SEGMENTS = ["a red fox running through snow", "a green forest at night"]
SEGMENT_OF_LATENT = [0] * 5 + [1] * 4  # 33 frames: 17 + 16; latent frame l holds frames up to 4l
SEGMENT_RUNS = {2: ("clip_segments_full", {"clip": 2}, "full"), 4: ("cfg_clip_segments_dual", {"cfg": 2, "clip": 2}, "dual")}


def _spec(name: str, size: str, **extra) -> dict:
    height, width = SIZES[size]
    return {"name": f"{name}/{size}", "frames": FRAMES, "height": height, "width": width, "steps": STEPS, **extra}


def _specs(world: int) -> list[dict]:
    specs = [_spec(name, size, **degrees) for name, degrees in LAYOUTS[world].items() for size in SIZES]
    specs += [_spec("frames_16", "even", ring=world, frames=16, expect_error=True),
              _spec("ulysses_3", "even", ulysses=3, expect_error=True) if world == 4 else
              _spec("guidance_1_cfg", "even", cfg=2, guidance=1.0, expect_error=True)]
    specs += [{"name": f"vae/{frames}", "vae_frames": frames, "ring": world} for frames in VAE_FRAMES[world]]
    specs += [_spec(name, "uneven", frames=CLIP_FRAMES, scope=scope, local=LOCAL, global_frames=GLOBAL, **degrees)
              for name, (degrees, scope) in CLIPS[world].items()]
    name, degrees, scope = SEGMENT_RUNS[world]
    specs.append(_spec(name, "uneven", frames=CLIP_FRAMES, scope=scope, local=LOCAL, global_frames=GLOBAL,
                       segments=SEGMENTS, **degrees))
    specs += [_spec("clip_short_halo", "uneven", frames=9, clip=2, local=2, expect_error=True),  # clips of 2 and 1
              _spec("clip_bias", "uneven", frames=CLIP_FRAMES, clip=2, bias=10.0, expect_error=True)]
    specs.append(_spec("wan22_ring", "uneven", model="tiny-wan22", ring=2) if world == 2 else
                 _spec("wan22_clip_ring_full", "uneven", model="tiny-wan22", frames=CLIP_FRAMES, scope="full", clip=2,
                       ring=2))
    return specs


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def parallel(request, tmp_path_factory):
    world = request.param
    folder = tmp_path_factory.mktemp(f"wan{world}")
    return world, run_spec_worker("tests/workers/wan_worker.py", _specs(world), world, folder, timeout=1200)


@pytest.fixture(scope="module")
def single():
    pipe = load_pipeline("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    videos = {size: generate(pipe, _spec("single", size)) for size in SIZES}
    decoded = {frames: pipe.vae.decode(latent(frames), return_dict=False)[0] for frames in (2, 3, 5)}
    clips = {"full": generate(pipe, _spec("single", "uneven", frames=CLIP_FRAMES))}
    for count in (2, 4):
        reference = load_pipeline("tiny-wan")
        reference.set_progress_bar_config(disable=True)
        install_wan_reference(reference, LATENT, count, LOCAL, GLOBAL)
        clips[count] = generate(reference, _spec("reference", "uneven", frames=CLIP_FRAMES))
        install_segment_reference(reference, SEGMENTS, SEGMENT_OF_LATENT, max_sequence_length=24)
        clips[f"segments_{count}"] = generate(reference, _spec("reference", "uneven", frames=CLIP_FRAMES))
    stock = load_pipeline("tiny-wan")
    stock.set_progress_bar_config(disable=True)
    install_segment_reference(stock, SEGMENTS, SEGMENT_OF_LATENT, max_sequence_length=24)
    clips["segments_full"] = generate(stock, _spec("reference", "uneven", frames=CLIP_FRAMES))
    two_experts = load_pipeline("tiny-wan22")
    two_experts.set_progress_bar_config(disable=True)
    wan22 = {frames: generate(two_experts, _spec("single", "uneven", frames=frames)) for frames in (FRAMES, CLIP_FRAMES)}
    return {**videos, "decoded": decoded, "clips": clips, "wan22": wan22}


def test_every_layout_equals_the_single_process_video(parallel, single):
    world, results = parallel
    for name in LAYOUTS[world]:
        for size in SIZES:
            video, reference = results[f"{name}/{size}"]["video"], single[size]
            assert video.shape == reference.shape == (1, FRAMES, 3, *SIZES[size])
            assert reference.std() > 0.01  # a real video, not a constant
            diff = (video - reference).abs().max().item()
            assert diff <= EXACT_ATOL, f"{world} ranks {name} {size}: max |Δ| {diff:.2e}"
            assert results[f"{name}/{size}"]["steps"] == STEPS


def test_shards_exchange_what_the_layout_needs(parallel):
    world, results = parallel
    for name in LAYOUTS[world]:
        labels = set().union(*(snapshot.keys() for snapshot in results[f"{name}/even"]["stats"]))
        assert ("wan.ulysses_qkv" in labels) == ("ulysses" in name)
        assert ("wan.ring_kv" in labels) == ("ring" in name)
        assert ("wan.cfg" in labels) == name.startswith("cfg")


def test_bad_requests_are_refused_on_every_rank(parallel):
    world, results = parallel
    frames = results["frames_16/even"]["error"]
    assert len(frames) == world and all("4k+1 frames" in message for message in frames)
    other = results["ulysses_3/even" if world == 4 else "guidance_1_cfg/even"]["error"]
    words = "do not match the world size" if world == 4 else "guidance_scale > 1"
    assert len(other) == world and all(words in message for message in other), other


def test_the_vae_decode_in_time_chunks_equals_the_one_process_decode(parallel, single):
    world, results = parallel
    for frames in VAE_FRAMES[world]:
        result, reference = results[f"vae/{frames}"], single["decoded"][frames]
        assert reference.shape == (1, 3, 1 + 4 * (frames - 1), 48, 80)
        diff = (result["decoded"] - reference).abs().max().item()
        assert diff <= EXACT_ATOL, f"{world} ranks, {frames} latent frames: max |Δ| {diff:.2e}"
        handed_on = [snapshot.get("wan.vae_cache", {}).get("bytes_sent", 0) for snapshot in result["stats"]]
        # the chunks take the extra frames last (the first clip streams soonest): a rank before every frame hands
        # on an empty cache; every later rank but the last hands on its own
        chunks = [frames // world + (rank >= world - frames % world) for rank in range(world)]
        assert [sent > 0 for sent in handed_on] == [sum(chunks[:rank + 1]) > 0 for rank in range(world - 1)] + [False], \
            (handed_on, chunks)


def test_clips_equal_the_one_device_video_or_the_dual_scope_reference(parallel, single):
    world, results = parallel
    references = single["clips"]
    assert (references[2] - references["full"]).abs().max() > 1e-3  # dual scope really drops keys
    for name, (degrees, scope) in CLIPS[world].items():
        video = results[f"{name}/uneven"]["video"]
        reference = references["full"] if scope == "full" else references[degrees["clip"]]
        assert video.shape == reference.shape == (1, CLIP_FRAMES, 3, *SIZES["uneven"])
        diff = (video - reference).abs().max().item()
        assert diff <= EXACT_ATOL, f"{world} ranks {name}: max |Δ| {diff:.2e}"


def _seen_frames(clip: int, clips: int) -> set[int]:
    """Written apart from paragen: the latent frames outside `clip` that dual scope sees (halo ∪ global)."""
    sizes = [LATENT // clips + (i < LATENT % clips) for i in range(clips)]
    start = sum(sizes[:clip])
    stop = start + sizes[clip]
    halo = set(range(max(0, start - LOCAL), start)) | set(range(stop, min(LATENT, stop + LOCAL)))
    return (halo | {0, 4, 8}) - set(range(start, stop))


def test_each_clip_receives_exactly_the_frames_it_sees(parallel):
    world, results = parallel
    for name, (degrees, scope) in CLIPS[world].items():
        if scope != "dual" or "ulysses" in degrees:
            continue
        clips = degrees["clip"]
        received = [snapshot["wan.clip_kv"]["bytes_recv"] for snapshot in results[f"{name}/uneven"]["stats"]]
        calls = 2 * STEPS * LAYERS  # guidance: two transformer calls per step
        per_frame = 2 * 15 * HEADS_DIM * 4  # K and V of 3 × 5 tokens, fp32
        expected = [len(_seen_frames(c, clips)) * per_frame * calls for c in range(clips)]
        assert received == expected, f"{world} ranks {name}"


def test_clip_requests_the_layout_cannot_take_are_refused_on_every_rank(parallel):
    world, results = parallel
    short, bias = results["clip_short_halo/uneven"]["error"], results["clip_bias/uneven"]["error"]
    assert len(short) == world and all("clips shorter than the halo" in message for message in short), short
    assert len(bias) == world and all("bias" in message for message in bias), bias


def test_segment_prompts_equal_the_per_token_reference(parallel, single):
    world, results = parallel
    name, degrees, scope = SEGMENT_RUNS[world]
    reference = single["clips"]["segments_full" if scope == "full" else f"segments_{degrees['clip']}"]
    assert (single["clips"]["segments_full"] - single["clips"]["full"]).abs().max() > 1e-3  # the prompts matter
    diff = (results[f"{name}/uneven"]["video"] - reference).abs().max().item()
    assert diff <= EXACT_ATOL, f"{world} ranks {name}: max |Δ| {diff:.2e}"


def test_two_experts_equal_the_single_process_video(parallel, single):
    """tiny-wan22 (Wan2.2's layout: `transformer` for the high-noise steps, `transformer_2` below the boundary)."""
    world, results = parallel
    name, frames = ("wan22_ring", FRAMES) if world == 2 else ("wan22_clip_ring_full", CLIP_FRAMES)
    video, reference = results[f"{name}/uneven"]["video"], single["wan22"][frames]
    assert reference.std() > 0.01 and video.shape == reference.shape
    diff = (video - reference).abs().max().item()
    assert diff <= EXACT_ATOL, f"{world} ranks {name}: max |Δ| {diff:.2e}"
