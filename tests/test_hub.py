"""Hub ids (`--model org/name[@revision]`) resolved from a hub cache the test lays out, offline: never the network.

The cache is huggingface_hub's own layout (`models--org--name/refs/<branch>` holding a commit, the files under
`snapshots/<commit>/`), filled with the trained tiny-shapes pipeline and the trained tiny-passkey LM.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from paragen.pipelines import sources
from paragen.pipelines.loading import CONFIG_DIR, ModelLoadError, check_model_source, model_folder
from paragen.pipelines.llm.loading import check_llm_source
from tests.multiproc import check_all_ok, expect_bad_input, run_ranks, start_ranks

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out(cache: Path, repo: str, files: Path, branch: str = "main") -> Path:
    """Put `files` in `cache` as the hub client would after downloading `repo` at `branch`; the snapshot folder."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / branch).write_text(COMMIT)
    snapshot = entry / "snapshots" / COMMIT
    shutil.copytree(files, snapshot)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    lay_out(cache, "paragen-test/tiny-shapes", CONFIG_DIR / "tiny-shapes")
    lay_out(cache, "paragen-test/tiny-passkey", CONFIG_DIR / "tiny-passkey")
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch) -> Path:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def test_what_is_a_hub_id(tmp_path, monkeypatch):
    assert sources.hub_id("Qwen/Qwen-Image") == ("Qwen/Qwen-Image", None)
    assert sources.hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert sources.hub_id(f"org/name@{COMMIT}") == ("org/name", COMMIT)
    for not_an_id in ("tiny-sd", "/models/sdxl", "a/b/c", "org/", "org/name@"):
        assert sources.hub_id(not_an_id) is None, not_an_id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert sources.hub_id("org/name") is None  # an existing path is a local folder
    assert sources.display_name("Qwen/Qwen-Image@refs/pr/3") == "Qwen-Image@refs-pr-3"


def test_a_cached_hub_id_resolves_offline(offline):
    assert check_model_source("paragen-test/tiny-shapes") == "StableDiffusionPipeline"
    assert model_folder("paragen-test/tiny-shapes") == offline / "models--paragen-test--tiny-shapes" / "snapshots" / COMMIT
    assert check_model_source(f"paragen-test/tiny-shapes@{COMMIT}") == "StableDiffusionPipeline"
    assert check_llm_source("paragen-test/tiny-passkey") == "LlamaForCausalLM"


def test_a_missing_hub_id_is_a_clear_error(offline):
    with pytest.raises(ModelLoadError, match=r"hub repository paragen-test/missing is not in the Hugging Face cache "
                                             r".*HF_HUB_OFFLINE is set; download it .*hf download paragen-test/missing"):
        check_model_source("paragen-test/missing")
    with pytest.raises(ModelLoadError, match="paragen-test/tiny-shapes@v2 is not in the Hugging Face cache"):
        check_model_source("paragen-test/tiny-shapes@v2")
    with pytest.raises(ModelLoadError, match="paragen-test/missing is not in"):
        check_llm_source("paragen-test/missing")


def test_pickle_only_hub_weights_are_refused(offline, tmp_path):
    files = tmp_path / "pickled"
    shutil.copytree(CONFIG_DIR / "tiny-shapes", files)
    for weights in files.glob("*/*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    lay_out(offline, "paragen-test/pickled", files)
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        check_model_source("paragen-test/pickled")


@pytest.mark.slow
def test_the_jobs_run_a_hub_id_from_the_cache(hub_cache, tmp_path):
    """An image from a hub id on 2 ranks equals the same pipeline from its local folder; the LLM job runs one too."""
    outputs = {}
    for model in ("paragen-test/tiny-shapes", str(CONFIG_DIR / "tiny-shapes")):
        out = tmp_path / model.replace("/", "_")
        args = ["-m", "paragen", "image", "--model", model, "--steps", "2", "--height", "64", "--width", "64",
                "--out", str(out)]
        check_all_ok(run_ranks(args, 2, timeout=300, extra_env={"HF_HUB_CACHE": str(hub_cache)}))
        outputs[model] = sorted(out.glob("*.png"))
    (from_hub,), (from_folder,) = outputs.values()
    assert from_hub.name.startswith("tiny-shapes_64x64")
    assert from_hub.read_bytes() == from_folder.read_bytes()
    out = tmp_path / "llm"
    args = ["-m", "paragen", "llm", "--model", "paragen-test/tiny-passkey", "--prompt", "the passkey is", "--new-tokens", "4",
            "--out", str(out)]
    check_all_ok(run_ranks(args, 2, timeout=300, extra_env={"HF_HUB_CACHE": str(hub_cache)}))
    assert json.loads(next(out.glob("*.json")).read_text())["request"]["model"] == "paragen-test/tiny-passkey"


def test_a_missing_hub_id_stops_every_rank_fast(hub_cache, tmp_path):
    start = time.monotonic()
    procs = start_ranks(["-m", "paragen", "image", "--model", "paragen-test/missing", "--out", str(tmp_path)], 2,
                        extra_env={"HF_HUB_CACHE": str(hub_cache)})
    expect_bad_input(procs, "paragen-test/missing is not in the Hugging Face cache", timeout=60)
    assert time.monotonic() - start < 10
    assert not any(tmp_path.iterdir())
