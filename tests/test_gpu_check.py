"""`bench/gpu_check.py --cpu`: the GPU check's every section on the CPU with tiny sizes, so that the script that
runs on a lent GPU keeps working between those runs (CI has no GPU)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("gpu_tests", "cli", "multirank", "ceilings", "timing_sdxl", "timing_flux", "timing_llm")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("gpu_check")
    out = folder / "gpu_check_cpu.json"
    # a generous budget: on a loaded CI machine no section may be skipped for time
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", "--budget", "1500", "--out", str(out),
                           "--work", str(folder / "work")], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert out.exists(), f"no report (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    failed = {name: entry.get("error") for name, entry in data["sections"].items() if entry["status"] == "failed"}
    assert not failed, f"failed sections: {json.dumps(failed, indent=1)[:6000]}"
    assert proc.returncode == 0, proc.stderr[-4000:]
    return data


def _numbers(value, path=""):
    """Every number in the report, with where it sits."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")


def _timing(entry: dict) -> None:
    assert entry["n"] >= 5 and 0 < entry["p10"] <= entry["median"] <= entry["p90"] and math.isfinite(entry["p90"]), entry


def test_every_section_ran_and_every_number_is_finite(report):
    assert report["mode"] == "cpu" and report["machine"]["torch"] and report["machine"]["git_revision"]
    for name in SECTIONS:
        entry = report["sections"][name]
        assert entry["status"] == "ok", (name, entry)
        assert entry["duration_s"] > 0
    assert report["sections"]["install"]["status"] == "skipped"  # no --install-wheels here
    bad = [(path, value) for path, value in _numbers(report) if not math.isfinite(value)]
    assert not bad, bad


def test_gpu_tests_are_collected_and_skipped_without_cuda(report):
    tests = report["sections"]["gpu_tests"]
    assert tests["collected"] >= 20 and tests["skipped"] == tests["collected"] and tests["passed"] == 0
    assert all(case["outcome"] == "skipped" and "CUDA" in case["message"] for case in tests["cases"])


def test_every_cli_workload_ran_on_the_device_it_was_given(report):
    cli = report["sections"]["cli"]
    assert cli["passed"] == cli["total"] == 10
    for name, run in cli["runs"].items():
        assert run["ok"] and run["report_device"] == "cpu" and run["report_dtype"] == "float32", (name, run)
        assert run["generate_s"] > 0
        if name.startswith(("image", "hires", "video")):
            assert run["pixel_std"] > 0
        else:
            assert run["new_tokens"] == (16 if "speculative" in name else 8) and run["decode_tokens_per_s"] > 0
    # blocks brought in from host memory draw the picture the resident blocks draw
    assert cli["runs"]["image_tiny-pixart_offload_layers"]["pixel_std"] == cli["runs"]["image_tiny-pixart"]["pixel_std"]
    # the full cache in host memory decodes the tokens it decodes on the device
    assert cli["runs"]["llm_speculative_host"]["new_token_ids"] == cli["runs"]["llm_speculative"]["new_token_ids"]


def test_two_ranks_on_one_device_match_one_rank(report):
    multirank = report["sections"]["multirank"]
    assert multirank["probe"]["paragen_ops_native"] == {op: True for op in multirank["probe"]["paragen_ops_native"]}
    assert multirank["image_max_abs_diff"] <= multirank["image_tolerance"] and multirank["llm_same_tokens"]
    staged = multirank["host_staging_exercise"]
    assert staged["status"] == "ok" and staged["llm_same_tokens"] and staged["image_max_abs_diff"] <= staged["image_tolerance"]
    assert "isend" in staged["wrapped"] and "all_to_all_single" in staged["wrapped"]


def test_timings_have_medians_over_at_least_five_calls(report):
    s = report["sections"]
    for entry in (s["ceilings"]["matmul"], s["ceilings"]["device_copy"], s["timing_sdxl"]["unet_full"],
                  s["timing_sdxl"]["unet_band_of_4"], s["timing_sdxl"]["pipeline_step_stock"],
                  s["timing_sdxl"]["pipeline_step_paragen_1rank"], s["timing_flux"]["forward"]):
        _timing(entry)
    assert s["timing_sdxl"]["latents_max_abs_diff_stock_vs_paragen"] == 0.0  # paragen at 1 rank changes no number
    assert s["timing_sdxl"]["unet_full"]["flops"] > 0
    llm = s["timing_llm"]
    for mode in ("stock", "dense", "offload", "speculative", "speculative_host"):
        assert llm[mode]["requests"] >= 1 and llm[mode]["decode_tokens_per_s"] > 0
        _timing(llm[mode]["decode_step_s"])
    for mode in ("speculative", "speculative_host"):  # lossless, wherever the full cache lives
        assert llm[f"{mode}_vs_dense"]["same_tokens"], llm[f"{mode}_vs_dense"]
    assert llm["speculative_host"]["device_kv_bytes"] == 0 and llm["speculative_host"]["fetched_bytes"] > 0
    assert llm["dense_vs_stock"]["same_tokens"]
    assert llm["offload"]["host_kv_bytes"] > 0 and llm["offload"]["fetched_bytes"] > 0
    summary = report["summary"]
    assert set(summary["statuses"]) >= set(SECTIONS) and "paragen_overhead" in summary["sdxl"]
