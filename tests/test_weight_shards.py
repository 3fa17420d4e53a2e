"""Weights sharded over the ranks (`--shard-weights`, FSDP2) on real gloo ranks: the same outputs as whole weights.

Each spec runs its model twice on the same ranks, whole and sharded (`tests/workers/shard_worker.py`): a UNet (patch
bands, displaced; patch × cfg), a DiT (Ring; Ulysses × Ring), Wan with clips (2 clips; 2 clips × Ring 2), and local
checkpoints read by slices (the trained tiny-shapes; a saved tiny-wan at bfloat16, whose norms and modulation tables
diffusers keeps in float32), shards kept in host memory (FSDP2's CPU offload) and layers offloaded without sharding. fp32 outputs equal to 1e-4 (bfloat16: to 1e-2); at 2 ranks every rank holds at most 0.55
of the denoiser's parameter bytes; the second step's gathers were prefetched. The image job shards a checkpoint and
reports each rank's memory; the memory estimate counts the weights and advises `--shard-weights`; sharding is refused
where the ranks do not run the model alike.
"""
from __future__ import annotations

import json

import pytest
import torch

from paragen.parallel import HiresConfig, ParallelConfig
from paragen.pipelines.jobs.image import ImageRequest
from paragen.pipelines.loading import CONFIG_DIR, load_pipeline
from paragen.pipelines.memory_estimate import check_memory
from paragen.pipelines.registry import find
from tests.multiproc import check_all_ok, expect_bad_input, run_ranks, run_spec_worker, start_ranks

IMAGE = {"height": 64, "width": 64}
VIDEO = {"height": 32, "width": 32, "num_frames": 17}
SPECS = {
    2: [
        {"name": "unet/patch_displaced", "model": "tiny-sd", "patch": 2, "mode": "displaced", "call": IMAGE},
        {"name": "dit/ring", "model": "tiny-pixart", "ring": 2, "call": IMAGE},
        {"name": "wan/clips", "model": "tiny-wan", "clip": 2, "ring": 1, "scope": "full", "call": VIDEO},
        {"name": "checkpoint/tiny-shapes", "checkpoint": str(CONFIG_DIR / "tiny-shapes"), "patch": 2, "call": IMAGE},
        {"name": "checkpoint/wan_bf16", "checkpoint": "WAN", "dtype": "bfloat16", "clip": 2, "ring": 1,
         "scope": "full", "call": VIDEO},
        {"name": "dit/ring_shards_in_host_memory", "model": "tiny-pixart", "ring": 2, "offload": True, "call": IMAGE},
        {"name": "wan/clips_layers_offloaded", "model": "tiny-wan", "clip": 2, "ring": 1, "scope": "full",
         "shard": False, "offload": True, "call": VIDEO},
    ],
    4: [
        {"name": "unet/patch_cfg", "model": "tiny-sd", "patch": 2, "cfg": 2, "call": IMAGE},
        {"name": "dit/ulysses_ring", "model": "tiny-pixart", "ulysses": 2, "ring": 2, "call": IMAGE},
        {"name": "wan/clips_ring", "model": "tiny-wan", "clip": 2, "ring": 2, "scope": "full", "call": VIDEO},
    ],
}


@pytest.fixture(scope="module")
def saved_wan(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-wan-checkpoint")
    load_pipeline("tiny-wan").save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_weights_give_the_whole_weights_outputs(world, saved_wan, tmp_path):
    specs = [{**spec, "checkpoint": saved_wan} if spec.get("checkpoint") == "WAN" else spec for spec in SPECS[world]]
    results = run_spec_worker("tests/workers/shard_worker.py", specs, world, tmp_path, timeout=900)
    for spec in specs:
        result = results[spec["name"]]
        tolerance = 1e-2 if spec.get("dtype") == "bfloat16" else 1e-4
        difference = (result["whole"] - result["sharded"]).abs().max().item()
        assert difference <= tolerance, f"{spec['name']}: max |Δ| {difference}"
        assert result["whole"].std() > 0.01  # a picture, not a constant
        whole = result["whole_bytes"][0]
        assert result["whole_bytes"] == [whole] * world
        assert max(result["sharded_bytes"]) <= (0.55 if world == 2 else 0.3) * whole, spec["name"]
        assert result["prefetches"] > 0, f"{spec['name']}: no block's gather started ahead of it"
        if "checkpoint" in spec:  # a local checkpoint: its denoiser read by rows, and that is the one that ran
            denoiser = "transformer" if "transformer" in result["loaded"] else "unet"
            assert result["loaded"][denoiser] == "its rows read", result["loaded"]
            assert result["whole_loaded"][denoiser] == "read, sent", result["whole_loaded"]  # whole: rank 0 reads


def _image(tmp_path, name: str, *flags: str) -> tuple[bytes, dict]:
    out = tmp_path / name
    check_all_ok(run_ranks(["-m", "paragen", "image", "--model", "tiny-shapes", "--steps", "2", "--height", "64",
                            "--width", "64", "--out", str(out), "--name", "x", *flags], 2, timeout=300))
    return (out / "x.png").read_bytes(), json.loads((out / "x.json").read_text())


@pytest.mark.slow
def test_the_image_job_shards_a_checkpoint_and_reports_each_ranks_memory(tmp_path):
    """`paragen image --shard-weights` on a local checkpoint (read by slices) makes the same picture; the report
    gives every rank's load time, parameter bytes and peak memory."""
    whole_png, whole = _image(tmp_path, "whole")
    sharded_png, sharded = _image(tmp_path, "sharded", "--shard-weights")
    assert sharded_png == whole_png
    for rank in ("0", "1"):
        held, full = sharded["memory_per_rank"][rank], whole["memory_per_rank"][rank]
        assert held["load_s"] > 0 and held["peak_bytes"] > 0
        assert held["resident_param_bytes_by_component"]["unet"] <= 0.55 * full["resident_param_bytes_by_component"]["unet"]
        assert held["resident_param_bytes_by_component"]["vae"] == full["resident_param_bytes_by_component"]["vae"]
        assert held["resident_param_bytes"] == sum(held["resident_param_bytes_by_component"].values())


def test_a_model_too_large_for_the_stated_memory_is_refused_with_the_advice(tmp_path):
    """tiny-sdxl's weights whole are 141.6 MB a rank; sharded over 2 ranks 94.9 MB (the VAE's 1.25 M parameters, half
    of the 34.16 M sharded ones and a gathered 5.40 M); `--memory-gib 0.11` (118 MB) holds only the second."""
    procs = start_ranks(["-m", "paragen", "image", "--model", "tiny-sdxl", "--height", "64", "--width", "64",
                         "--memory-gib", "0.11", "--out", str(tmp_path / "out")], 2)
    expect_bad_input(procs, "mostly the weights; --memory-gib gives this rank 113 MiB; it would fit with --shard-weights",
                     timeout=120)
    assert not (tmp_path / "out").exists()
    request = ImageRequest(model="tiny-sdxl", height=64, width=64, memory_gib=0.11, shard_weights=True)
    check_memory(request, ParallelConfig(), 2, torch.device("cpu"), 2)  # fits sharded


def test_one_rank_too_small_for_the_weights_is_advised_to_offload_them():
    """On one rank tiny-sdxl's 141.6 MB of weights do not fit 0.11 GiB; offloaded, only the VAE's 1.25 M parameters
    and a gathered 5.40 M stay on the device."""
    request = ImageRequest(model="tiny-sdxl", height=64, width=64, memory_gib=0.11)
    with pytest.raises(ValueError, match="mostly the weights; .* it would fit with --offload-layers"):
        check_memory(request, ParallelConfig(), 1, torch.device("cpu"), 1)
    check_memory(ImageRequest(model="tiny-sdxl", height=64, width=64, memory_gib=0.11, offload_layers=True),
                 ParallelConfig(), 1, torch.device("cpu"), 1)


def test_sharded_weights_are_refused_where_they_cannot_work():
    with pytest.raises(ValueError, match="with one rank there is nobody to share them with"):
        find("StableDiffusionPipeline").check_weight_sharding(True, 1)
    with pytest.raises(ValueError, match="hires runs cannot shard their weights: its ranks run different numbers"):
        find("StableDiffusionPipeline", HiresConfig()).check_weight_sharding(True, 2)
    with pytest.raises(ValueError, match="llm runs cannot shard their weights"):
        find("LlamaForCausalLM").check_weight_sharding(True, 2)
    find("StableDiffusionPipeline").check_weight_sharding(True, 2)


def test_a_checkpoint_the_output_rank_cannot_read_stops_every_rank(tmp_path):
    """Whole weights read once (rank 0 reads, the others receive: the default on CUDA): when rank 0 cannot read the
    checkpoint (a truncated weights file), the other rank learns why instead of waiting for weights that never
    come."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(CONFIG_DIR / "tiny-shapes", broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    spec = {"name": "broken", "checkpoint": str(broken), "patch": 2, "call": IMAGE}
    with pytest.raises(AssertionError) as failed:
        run_spec_worker("tests/workers/shard_worker.py", [spec], 2, tmp_path, timeout=120)
    assert f"the output rank could not read {broken}" in str(failed.value)
