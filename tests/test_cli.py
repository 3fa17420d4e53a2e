"""`paragen image` end to end under the real launchers, and its behaviour on bad input and dead ranks."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.multiproc import ROOT, expect_bad_input, free_port, rank_env, start_ranks

pytestmark = pytest.mark.slow  # multi-process end-to-end runs (make test-fast skips them)

BIN = Path(sys.executable).parent
SMALL = ["--height", "128", "--width", "128", "--steps", "3", "--seed", "5"]


def _env() -> dict[str, str]:
    env = rank_env(0, 1, free_port())
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name)
    return env


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stderr[-4000:]}"
    return result


def _pixels(folder: Path) -> np.ndarray:
    (png,) = folder.glob("*.png")
    return np.asarray(Image.open(png), dtype=np.int16)


@pytest.fixture(scope="module")
def single_image(tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("single")
    _run([sys.executable, "-m", "paragen", "image", *SMALL, "--out", str(out)])
    return _pixels(out)


def _check_same_image(folder: Path, reference: np.ndarray) -> dict:
    # The tensors agree to ~1e-6; after rounding to 8 bits a pixel may land one step apart.
    assert np.abs(_pixels(folder) - reference).max() <= 1
    (report,) = folder.glob("*.json")
    return json.loads(report.read_text())


def test_torchrun_two_ranks(tmp_path, single_image):
    _run([str(BIN / "torchrun"), "--nproc-per-node", "2", "-m", "paragen", "image", *SMALL, "--out", str(tmp_path)])
    report = _check_same_image(tmp_path, single_image)
    assert report["world_size"] == 2 and report["config"]["patch"] == 2
    assert len(report["timings"]["step_s"]) == 3
    for rank in ("0", "1"):  # every rank's traffic is in the report
        assert report["comm_per_rank"][rank]["unet.attn_kv"]["bytes_recv"] > 0
    assert (tmp_path / "tiny-sd_128x128_patch2_cfg1_sync_seed5.png").exists()


def test_torchrun_two_nodes_on_loopback(tmp_path, single_image):
    port = free_port()
    nodes = [
        subprocess.Popen(
            [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "paragen-test", "-m", "paragen", "image",
             *SMALL, "--out", str(tmp_path)],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-4000:]
    report = _check_same_image(tmp_path, single_image)
    assert report["world_size"] == 2


def test_torchrun_dit_model_equals_single_process(tmp_path):
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    dit = [*SMALL, "--model", "tiny-sd3"]
    _run([sys.executable, "-m", "paragen", "image", *dit, "--out", str(single)])
    _run([str(BIN / "torchrun"), "--nproc-per-node", "2", "-m", "paragen", "image", *dit, "--ulysses", "2",
          "--out", str(parallel)])
    report = _check_same_image(parallel, _pixels(single))
    assert report["config"]["ulysses"] == 2 and report["world_size"] == 2
    assert report["comm_per_rank"]["0"]["dit.ulysses_qkv"]["bytes_sent"] > 0


def test_mpirun_two_ranks(tmp_path, single_image):
    mpirun = shutil.which("mpirun", path=str(BIN)) or shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun is not installed (make test installs Open MPI)")
    _run([mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, "-m", "paragen", "image",
          *SMALL, "--out", str(tmp_path)])
    report = _check_same_image(tmp_path, single_image)
    assert report["world_size"] == 2


BAD_INPUTS = {
    "height the bands cannot split": (2, ["--height", "160"], "multiple of"),
    "more ranks than latent rows": (4, ["--height", "8", "--width", "64"], "more ranks than latent rows"),
    "cfg=2 on an odd world size": (3, ["--cfg", "2"], "even world size"),
    "degrees not the world size": (2, ["--patch", "3"], "world size is 2"),
    "unknown model": (2, ["--model", "tiny-nope"], "tiny-sd"),
    "missing path": (2, ["--model", "/nonexistent/model"], "nonexistent"),
    "non-positive steps": (2, ["--steps", "0"], "steps must be positive"),
    "non-positive size": (2, ["--width", "-64"], "width must be positive"),
    "DiT: Ulysses degree not dividing the heads": (3, ["--model", "tiny-flux", "--ulysses", "3"], "does not divide the 4 attention heads"),
    "DiT: degrees not the world size": (2, ["--model", "tiny-flux", "--ulysses", "2", "--ring", "2"], "world size is 2"),
    "DiT: more ranks than image tokens": (2, ["--model", "tiny-sd3", "--height", "16", "--width", "16"], "more ranks than image tokens"),
    "DiT: size not a multiple of the patch": (2, ["--model", "tiny-pixart", "--height", "120"], "multiple of 16"),
    "DiT: patch bands asked of a transformer": (2, ["--model", "tiny-pixart", "--patch", "2"], "token sequence"),
    "DiT: cfg=2 for Flux": (2, ["--model", "tiny-flux", "--cfg", "2"], "guidance embedding"),
    "hires: below the training size": (2, ["--hires"], "at least the window"),
    "hires: stride larger than the window": (2, ["--hires", "--window", "16", "--stride", "20"], "larger than the window"),
    "hires: more ranks than windows": (4, ["--hires", "--window", "16"], "no work"),
    "hires: guidance weight out of range": (2, ["--hires", "--guidance-weight", "1.5"], "[0, 1]"),
    "hires: size not a multiple of the VAE factor": (2, ["--hires", "--height", "516", "--width", "512"], "VAE factor"),
    "hires: window options without --hires": (2, ["--stride", "8"], "only apply with --hires"),
    "hires: DiT model": (2, ["--model", "tiny-pixart", "--hires"], "hires supports"),
    "checkpoints of a run that takes none": (2, ["--checkpoint", "ck"], "patch runs take no checkpoints"),
    "step cache: a probed method with hires": (2, ["--hires", "--cache", "fbcache"], "only --cache taylorseer"),
    "step cache: interval 0": (2, ["--cache", "taylorseer", "--cache-interval", "0"], "cache_interval"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_fast_on_every_rank(tmp_path, case):
    world, args, message = BAD_INPUTS[case]
    start = time.monotonic()
    procs = start_ranks(["-m", "paragen", "image", *SMALL, *args, "--out", str(tmp_path), "--timeout", "30"], world)
    expect_bad_input(procs, message)
    assert time.monotonic() - start < 60
    assert not any(tmp_path.iterdir()), "a failed run must leave no output file"


def test_pickle_checkpoint_refused_on_every_rank(tmp_path):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    (model / "unet" / "config.json").write_text("{}")
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    out = tmp_path / "out"
    procs = start_ranks(["-m", "paragen", "image", "--model", str(model), "--out", str(out)], 2)
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "--allow-pickle" in err, err[-2000:]
    assert not out.exists()


def test_a_dead_rank_stops_the_others(tmp_path):
    procs = start_ranks(["-m", "paragen", "image", "--height", "256", "--width", "256", "--steps", "200",
                         "--timeout", "20", "--out", str(tmp_path)], 2)
    survivor, victim = procs
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: survivor.stderr.read(64), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while "2/200" not in "".join(chunks):  # the progress bar shows denoising is under way
        assert time.monotonic() < deadline and survivor.poll() is None, "".join(chunks)[-2000:]
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    survivor.wait(timeout=90)
    reader.join(timeout=10)
    victim.communicate()
    err = "".join(chunks)
    assert survivor.returncode == 1, err[-3000:]
    assert time.monotonic() - killed_at < 45
    assert "communication failed" in err, err[-3000:]
    assert not any(p.suffix in (".png", ".json") for p in tmp_path.iterdir())
