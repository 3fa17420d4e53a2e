"""Rough edges a new user hits, each a clear message (exit status 2 on every rank, within seconds, no output) or
gone: third-party notices, output file modes, a broken model_index.json, --out naming a file, a request far
beyond memory, a passkey context shorter than its fixed tokens."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from paragen.parallel import ExchangeConfig, ParallelConfig
from paragen.parallel.hires import HiresConfig
from paragen.pipelines import memory_estimate
from paragen.pipelines.jobs.common import fit_to_model
from paragen.pipelines.jobs.image import ImageRequest
from paragen.pipelines.jobs.llm import LLMRequest
from paragen.pipelines.loading import ModelLoadError, check_model_source, load_pipeline
from paragen.pipelines.memory_estimate import Job, ModelShape, check_memory, format_bytes, model_shape, need, plan_job
from paragen.pipelines.outputs import check_out_dir, save_json, save_png, save_video, write_atomic
from paragen.pipelines.llm.passkey import make_prompt
from paragen.pipelines.jobs.video import VideoRequest
from tests.multiproc import ROOT, expect_bad_input, rank_env, start_ranks

CPU = torch.device("cpu")
GiB = 1024**3


def _asked(model: str = "tiny-sd", frames: int | None = None, **sizes) -> SimpleNamespace:
    """A request as the memory estimate reads it, at sizes beyond what a request may ask (the estimate's arithmetic
    is checked far past the schema's bounds)."""
    return SimpleNamespace(model=model, frames=frames, guidance_scale=None, dtype="auto", **sizes)


def _parameters(model: str) -> int:
    """Every parameter of an embedded model, counted on the loaded pipeline (the estimate counts them from configs
    on the meta device)."""
    pipe = load_pipeline(model)
    return sum(p.numel() for part in pipe.components.values() if isinstance(part, torch.nn.Module)
               for p in part.parameters())


def _single_env() -> dict[str, str]:
    env = rank_env(0, 1, 0)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name)
    return env


# ---- 1 and 2: no third-party chatter; outputs follow the umask ---------------------------------------------------
@pytest.mark.parametrize("command", [["image", "--height", "64", "--width", "64", "--steps", "1"],
                                     ["llm", "--context", "512", "--new-tokens", "4"]])
def test_commands_print_no_library_chatter_and_write_files_by_the_umask(tmp_path, command):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "paragen", *command, "--out", str(out)], cwd=tmp_path,
                            env=_single_env(), capture_output=True, text=True, timeout=300, umask=0o022)
    assert result.returncode == 0, result.stderr[-3000:]
    for chatter in ("requires torchvision", "[transformers]", "Warning", "deprecat"):
        assert chatter not in result.stderr, f"{chatter!r} on stderr:\n{result.stderr[-3000:]}"
    written = sorted(out.iterdir())
    assert written and all(path.stat().st_mode & 0o777 == 0o644 for path in written), [oct(p.stat().st_mode) for p in written]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_mode_the_umask_gives(tmp_path, umask):
    frames = np.random.default_rng(0).random((3, 16, 16, 3))
    previous = os.umask(umask)
    try:
        paths = [save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png"), save_json({"a": 1}, tmp_path / "a.json"),
                 save_video(frames, tmp_path / "a.gif", fps=4)]
    finally:
        os.umask(previous)
    assert [p.stat().st_mode & 0o777 for p in paths] == [0o666 & ~umask] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "a.json", "a.png"]  # no temporary file left


def test_a_failed_write_leaves_no_file(tmp_path):
    def half_written(tmp: Path) -> None:
        tmp.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "out" / "a.json", half_written)
    assert list((tmp_path / "out").iterdir()) == []


# ---- 3 and 4: a broken model_index.json; --out naming a file ------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ('{"scheduler": ["diffusers", "DDIMScheduler"]}', 'needs a "_class_name" entry'),
    ('["StableDiffusionPipeline"]', 'needs a "_class_name" entry'),
    ('{"_class_name": "StableDiffusionPipeline",', "is not valid JSON"),
])
def test_a_broken_model_index_is_named(tmp_path, text, message):
    (tmp_path / "model_index.json").write_text(text)
    with pytest.raises(ModelLoadError, match=message) as error:
        check_model_source(str(tmp_path))
    assert str(tmp_path / "model_index.json") in str(error.value)


def test_out_must_be_a_folder_that_can_be_made(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"--out '.*file' is a file, not a folder"):
        check_out_dir(str(tmp_path / "file"))
    with pytest.raises(ValueError, match=r"cannot be created: '.*file' is a file"):
        check_out_dir(str(tmp_path / "file" / "sub"))
    check_out_dir(str(tmp_path / "new" / "folder"))  # made when the output is written
    check_out_dir(str(tmp_path))


# ---- 5: the memory estimate ------------------------------------------------------------------------------------
def test_model_shape_reads_the_configs():
    # tiny-sd: UNet block_out_channels [96, 192, 384] with cross-attention first; VAE [32, 64, 64, 64], 4 latent channels
    assert model_shape("tiny-sd") == ModelShape(transformer=False, width=96, first_level_attention=True, distilled=False,
                                                vae_channels=32, vae_factor=8, latent_channels=4,
                                                pipeline="StableDiffusionPipeline")
    flux = model_shape("tiny-flux")  # 4 heads of 32; a guidance embedding, no CFG batch
    assert (flux.transformer, flux.width, flux.distilled, flux.latent_channels) == (True, 128, True, 16)
    assert model_shape(str(ROOT / "no-such-model")) is None


def test_unet_image_estimate_matches_a_hand_computation():
    job = plan_job(model_shape("tiny-sd"), _asked(height=100000, width=100000), ParallelConfig(), 2, 4)
    assert (job.batch, job.split, job.ranks, job.gathers_whole_image) == (2, 2, 2, True)
    # latent 4·12500² = 625e6; UNet 2·96·(2·6250 + 12500)·12500 = 60e9; VAE decode 2·32·50000·100000 = 320e9
    # (largest); and every weight, whole
    assert _parameters("tiny-sd") == 29_466_955
    assert need(job).bytes == (625_000_000 + 320_000_000_000 + 29_466_955) * 4
    assert "VAE decoder" in need(job).what


def test_dit_and_video_estimates_match_hand_computations():
    shape = ModelShape(transformer=True, width=3072, first_level_attention=True, distilled=True, vae_channels=128,
                       vae_factor=8, latent_channels=16)
    job = Job(shape, height=8192, width=8192, frames=None, dtype_bytes=2, batch=1, split=8, ranks=8,
              gathers_whole_image=True, term="tokens", degree="ulysses × ring")
    # latent 16·1024² = 16_777_216; tokens 512² = 262_144, 32_768 a rank: 4·32_768·3072 = 402_653_184 (largest);
    # VAE 2·128·1024·8192 = 2_147_483_648 -> the VAE still wins
    assert need(job).bytes == (16_777_216 + 2_147_483_648) * 2
    job = plan_job(model_shape("tiny-t2v"), VideoRequest(frames=100000, height=1024, width=1024),
                   ParallelConfig(clip=2, patch=1), 2, 4)
    # latent 4·1e5·128² = 6_553_600_000; UNet 2·2·64·50_000·128² = 209_715_200_000;
    # gathered frames 3·1e5·1024² = 314_572_800_000 (largest); and every weight, whole
    assert need(job).bytes == (6_553_600_000 + 314_572_800_000 + _parameters("tiny-t2v")) * 4
    assert "gathered" in need(job).what


def test_a_video_transformers_estimate_counts_its_latent_frames_and_token_shards():
    wan = model_shape("tiny-wan")  # 4 heads of 16; Wan's VAE: 8 a side, 4 frames a latent frame; branches in turn
    assert (wan.transformer, wan.width, wan.vae_factor, wan.vae_temporal, wan.distilled) == (True, 64, 8, 4, True)
    job = plan_job(wan, VideoRequest(model="tiny-wan", frames=4001, height=1024, width=1024),
                   ParallelConfig(clip=2, ring=2, patch=1), 4, 4)
    assert (job.batch, job.split) == (1, 4)
    # 1001 latent frames of 128²: latent 16·1001·128² = 262_406_144; tokens 1001·64² = 4_100_096, a quarter a rank:
    # 4·1_025_024·64 = 262_406_144; gathered frames 3·4001·1024² = 12_586_057_728 (largest); and every weight, whole
    assert need(job).bytes == (262_406_144 + 12_586_057_728 + _parameters("tiny-wan")) * 4


def test_a_wan_request_is_memory_checked(monkeypatch):
    """Wan requests were never checked: the estimate read a VAE key Wan's VAE lacks and skipped silently."""
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda device, local_ranks: 4 * GiB)
    with pytest.raises(ValueError, match=r"a video of 4001 frames of 1024x1024 needs at least 48 GiB per rank with 4 "
                                         r"ranks \(clip × ulysses × ring 4\)"):
        check_memory(VideoRequest(model="tiny-wan", frames=4001, height=1024, width=1024),
                     ParallelConfig(clip=2, ring=2, patch=1), 4, CPU, 4)


def test_a_model_without_an_estimate_says_so(monkeypatch, caplog):
    monkeypatch.setattr(memory_estimate, "model_shape", lambda model: None)
    with caplog.at_level("WARNING", logger="paragen"):
        check_memory(VideoRequest(model="tiny-wan", frames=17, height=64, width=64), ParallelConfig(clip=1, patch=1),
                     1, CPU, 1)
    assert "no memory estimate for tiny-wan" in caplog.text




DEMO_AND_TEST_SIZES = [
    (ImageRequest(height=512, width=512), ParallelConfig(), ExchangeConfig(mode="displaced"), 2),  # make demo
    (ImageRequest(height=1024, width=1024), ParallelConfig(), None, 2),
    (ImageRequest(model="tiny-sdxl", height=1024, width=1024), ParallelConfig(cfg=2), None, 4),
    (ImageRequest(model="tiny-pixart", height=1024, width=1024), ParallelConfig(ulysses=2), None, 2),
    (ImageRequest(model="tiny-sd3", height=1024, width=1024), ParallelConfig(ring=2), None, 2),
    (ImageRequest(model="tiny-flux", height=1024, width=1024), ParallelConfig(), None, 2),
    (ImageRequest(height=192, width=256), ParallelConfig(), HiresConfig(), 2),
    (VideoRequest(frames=64, height=128, width=128), ParallelConfig(clip=2, patch=1), None, 2),
    (VideoRequest(model="tiny-animatediff", frames=16, height=256, width=256), ParallelConfig(clip=2, patch=1), None, 2),
    (VideoRequest(model="tiny-wan", frames=65, height=128, width=128), ParallelConfig(clip=2, patch=1), None, 2),
]


@pytest.mark.parametrize("request_, config, options, world", DEMO_AND_TEST_SIZES)
def test_demo_and_test_sizes_are_not_refused(request_, config, options, world):
    assert need(plan_job(model_shape(request_.model), request_, config, world, 4, options)).bytes < 256 * 2**20
    check_memory(request_, config, world, CPU, world, options)


def test_refusal_names_the_figure_and_what_would_fit(monkeypatch):
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda device, local_ranks: 22 * GiB)
    with pytest.raises(ValueError) as error:
        check_memory(_asked(height=100000, width=100000), ParallelConfig(), 2, CPU, 2)
    message = str(error.value)
    assert message.startswith("a 100000x100000 image needs at least 1.2 TiB per rank with 2 ranks (patch 2), mostly the "
                              "VAE decoder's full-resolution feature maps; this rank has 22 GiB available (44 GiB on this "
                              "host for 2 ranks); it would fit with at most ")
    # H x H needs the latent 4·(H/8)² plus the VAE decode 2·32·H·H/2 (more than the UNet's 2·96·(2·H/16 + H/8)·H/8)
    # elements of 4 bytes beside the 29_466_955 weights: 22 GiB hold 32.0625·H² ≤ 5_876_113_077 elements up to
    # H = 13537, so 13504 (64-pixel steps).
    assert message.endswith("it would fit with at most 13504x13504")


def test_refusal_suggests_more_shards_where_they_help(monkeypatch):
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda device, local_ranks: 10 * GiB)
    # On N ranks: the latent 4·5000² = 1e8 elements plus the VAE decode's 2·32·(40000 // N)·40000 (more than the
    # transformer's 4·2·(2500²/N)·256), of 4 bytes, fit 10 GiB = 2_684_354_560 elements once 40000 // N <= 1009: N >= 40.
    with pytest.raises(ValueError, match=r"with 2 ranks \(ulysses × ring 2\).* it would fit with ulysses × ring ≥ 40 or"):
        check_memory(_asked("tiny-pixart", height=40000, width=40000), ParallelConfig(ring=2), 2, CPU, 2)


def test_format_bytes():
    assert [format_bytes(n) for n in (512, 1536, 22 * GiB, 9.3 * 1024 * GiB)] == ["512 B", "1.5 KiB", "22 GiB", "9.3 TiB"]


# ---- 6: a passkey context shorter than its fixed tokens ---------------------------------------------------------
def test_a_passkey_context_must_hold_the_fixed_tokens():
    with pytest.raises(ValueError, match="a passkey prompt of 9 tokens is too short.*at least 10 tokens"):
        LLMRequest(context=9)
    LLMRequest(context=10)
    assert make_prompt(10, 0.5, torch.Generator().manual_seed(0)).tokens.shape == (10,)


# ---- every rank refuses at once, and writes nothing (one case per command) ---------------------------------------
BAD_REQUESTS = {
    "out is a file": (["image"], "is a file, not a folder"),
    # 16384²: the VAE decode's 2·32·8192·16384 elements of 4 bytes a rank, 32 GiB (CI has 24 GiB for 2 ranks)
    "image beyond memory": (["image", "--height", "16384", "--width", "16384"], "needs at least 32 GiB per rank"),
    "image beyond the schema": (["image", "--height", "100000"], "height must be at most 16384, got 100000"),
    "video beyond memory": (["video", "--frames", "100000", "--height", "1024", "--width", "1024"], "per rank with 2 ranks (clip 2)"),
    "passkey context too short": (["llm", "--context", "5"], "a passkey prompt of 5 tokens is too short"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_fail_fast_on_every_rank(tmp_path, case):
    args, message = BAD_REQUESTS[case]
    out = tmp_path / "out"
    if case == "out is a file":
        out.write_text("keep me")
    start = time.monotonic()
    expect_bad_input(start_ranks(["-m", "paragen", *args, "--out", str(out), "--timeout", "30"], 2, cwd=tmp_path), message)
    assert time.monotonic() - start < 45
    assert (out.read_text() == "keep me") if case == "out is a file" else not out.exists()


# ---- a request's bounds come before its allocations -----------------------------------------------------------
OVERSIZED_CONTEXT = """
import resource, sys, time
from types import SimpleNamespace
from paragen.pipelines.jobs import llm, schema
from paragen.launch.cli import build_parser
args = build_parser("llm").parse_args(["llm", "--out", sys.argv[1]])
launch = SimpleNamespace(world_size=1, rank=0, local_rank=0, local_world_size=1, array_task=0, array_tasks=1)
job = llm.prepare(args, launch)
before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
try:
    job.check(schema.replace(job.request, context=60_000_000))
except ValueError as error:
    print(f"{time.monotonic() - started:.3f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before} {error}")
"""


def test_an_oversized_context_is_refused_before_its_prompt_is_built(tmp_path):
    """`{"context": 2e8}` once built the whole prompt (GBs) before the length check."""
    done = subprocess.run([sys.executable, "-c", OVERSIZED_CONTEXT, str(tmp_path)], env=_single_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    seconds, grown_kib, message = done.stdout.split(" ", 2)
    assert "exceeds the model's" in message, done.stdout + done.stderr[-2000:]
    assert float(seconds) < 1 and int(grown_kib) < 50 * 1024, done.stdout


def test_the_default_size_is_the_pipelines_own(tmp_path):
    """Every model once defaulted to 512 × 512: tiny-shapes drew at 8 times its training area."""
    done = subprocess.run([sys.executable, "-m", "paragen", "image", "--model", "tiny-shapes", "--steps", "1",
                           "--out", str(tmp_path)], env=_single_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (png,) = tmp_path.glob("*.png")
    assert png.name.startswith("tiny-shapes_64x64_") and Image.open(png).size == (64, 64)


@pytest.mark.parametrize("request_,size", [
    (ImageRequest(model="tiny-shapes"), (64, 64, None)),  # UNet sample_size 16 × VAE factor 4
    (ImageRequest(model="tiny-sdxl"), (512, 512, None)),
    (ImageRequest(model="tiny-flux"), (1024, 1024, None)),  # FluxPipeline.default_sample_size 128 × 8
    (ImageRequest(model="tiny-flux", height=256), (256, 1024, None)),  # what is given stays
    (VideoRequest(model="tiny-t2v"), (256, 256, 16)),
    (VideoRequest(model="tiny-wan"), (480, 832, 81)),  # WanPipeline.__call__'s own defaults
    (VideoRequest(model="tiny-ltx"), (512, 704, 161)),  # LTXPipeline.__call__'s
    (ImageRequest(model="tiny-sana"), (1024, 1024, None)),  # SanaPipeline.__call__'s
])
def test_a_request_fits_its_models_own_size_and_frames(request_, size):
    fitted = fit_to_model(request_)
    assert (fitted.height, fitted.width, getattr(fitted, "frames", None)) == size


def test_a_size_the_pipeline_sets_in_its_code_is_asked_for():
    """CogVideoX's pipeline derives its default size and frames in its code, which paragen does not read."""
    with pytest.raises(ValueError, match="cannot read the default height and width and frames of tiny-cogvideox from "
                                         "its configs: give --height and --width and --frames"):
        fit_to_model(VideoRequest(model="tiny-cogvideox"))
    with pytest.raises(ValueError, match="default frames of tiny-cogvideox.*give --frames$"):
        fit_to_model(VideoRequest(model="tiny-cogvideox", height=64, width=64))


def test_steps_beyond_the_schedulers_training_timesteps_are_refused():
    fit_to_model(ImageRequest(steps=1000))
    with pytest.raises(ValueError, match="trained on 1000 timesteps, so at most 1000 steps"):
        fit_to_model(ImageRequest(steps=1001))


def test_tensor_parallelism_without_deepspeed_says_what_to_install_before_the_process_group(monkeypatch):
    import importlib.util

    from paragen.parallel.llm import tensor_parallel

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "deepspeed" else found(name, *rest))
    config = SimpleNamespace(num_attention_heads=4, num_key_value_heads=4)
    tensor_parallel.check_tensor_parallel(config, 1)
    with pytest.raises(ValueError, match=r"pip install 'paragen\[deepspeed\]'"):
        tensor_parallel.check_tensor_parallel(config, 2)
