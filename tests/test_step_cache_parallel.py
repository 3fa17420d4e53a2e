"""The step cache in every parallel mode, on real gloo ranks (2), against the same pipeline uncached and against one
process cached.

Every mode — UNet patch bands (sync, displaced, partial), CFG over rank halves, PixArt Ulysses and Ring (sync and
displaced), clips of a UNet video model and of Wan (with CFG over rank halves), hires windows:
- the ranks compute and serve the same steps (every rank's record);
- at threshold 0 (TaylorSeer: interval 1) the output equals the uncached run's, bit for bit;
- with a threshold that serves some steps (at least one is asserted), an exact mode's output equals one process
  cached at the same threshold (max |Δ| ≤ 1e-4), which served the same steps.
And `paragen image --cache` writes each rank's computed and cached steps in its report.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.multiproc import check_all_ok, run_ranks, run_spec_worker

pytestmark = pytest.mark.slow  # multi-process end-to-end runs (make test-fast skips them)

EXACT_ATOL = 1e-4
WORKER = "tests/workers/cache_worker.py"
# name -> (model, kind, degrees, extra, exact, the caches that serve steps: method -> settings)
LAYOUTS = {
    "sd/patch": ("tiny-sd", "image", {"patch": 2}, {}, True,
                 {"fbcache": {"threshold": 0.8}, "teacache": {"threshold": 0.6}, "taylorseer": {"interval": 3}}),
    "sd/cfg": ("tiny-sd", "image", {"cfg": 2}, {}, True, {"fbcache": {"threshold": 0.8}}),
    "sd/displaced": ("tiny-sd", "image", {"patch": 2}, {"mode": "displaced"}, False, {"fbcache": {"threshold": 0.8}}),
    "sd/partial": ("tiny-sd", "image", {"patch": 2}, {"mode": "partial"}, False, {"fbcache": {"threshold": 0.8}}),
    "pixart/ulysses": ("tiny-pixart", "image", {"ulysses": 2}, {}, True,
                       {"fbcache": {"threshold": 0.3}, "taylorseer": {"interval": 3}}),
    "pixart/ring": ("tiny-pixart", "image", {"ring": 2}, {}, True, {"teacache": {"threshold": 0.3}}),
    "pixart/displaced": ("tiny-pixart", "image", {"ring": 2}, {"mode": "displaced"}, False,
                         {"fbcache": {"threshold": 0.3}}),
    "t2v/clips": ("tiny-t2v", "video", {"clip": 2}, {}, True, {"fbcache": {"threshold": 0.8}}),
    "wan/clips": ("tiny-wan", "video", {"clip": 2}, {}, True, {"fbcache": {"threshold": 0.15}}),
    "wan/cfg": ("tiny-wan", "video", {"cfg": 2}, {}, True, {"fbcache": {"threshold": 0.15}}),
    "sd/hires": ("tiny-sd", "hires", {"patch": 2}, {}, True, {"taylorseer": {"interval": 2}}),
}
ZERO = {"fbcache": {"method": "fbcache", "threshold": 0.0}, "hires": {"method": "taylorseer", "interval": 1}}


def _base(model: str, kind: str, extra: dict) -> dict:
    return {"model": model, "kind": kind, "steps": 8, "size": 128 if kind == "image" else 64,
            "frames": 17 if model == "tiny-wan" else 16, **extra}


def _specs(parallel: bool) -> list[dict]:
    specs = []
    for name, (model, kind, degrees, extra, exact, caches) in LAYOUTS.items():
        if not parallel and not exact:
            continue
        base = {**_base(model, kind, extra), "degrees": degrees if parallel else {}}
        for method, settings in caches.items():
            specs.append({**base, "name": f"{name}/{method}", "cache": {"method": method, **settings}})
        if parallel:
            specs.append({**base, "name": f"{name}/none", "cache": None})
            specs.append({**base, "name": f"{name}/zero", "cache": ZERO["hires" if kind == "hires" else "fbcache"]})
    return specs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(2-rank results, one-process results), by spec name."""
    return (run_spec_worker(WORKER, _specs(True), 2, tmp_path_factory.mktemp("cache2"), timeout=1200),
            run_spec_worker(WORKER, _specs(False), 1, tmp_path_factory.mktemp("cache1"), timeout=1200))


CACHED = [f"{name}/{method}" for name, layout in LAYOUTS.items() for method in layout[5]]


@pytest.mark.parametrize("name", CACHED)
def test_ranks_serve_the_same_steps(runs, name):
    records = runs[0][name]["records"]
    assert len(records) == 2 and records[0]["cached_steps"], f"{name}: no step served from the cache"
    for record in records[1:]:
        assert (record["computed_steps"], record["cached_steps"]) == \
               (records[0]["computed_steps"], records[0]["cached_steps"])
        if not name.startswith("sd/hires"):  # hires ranks denoise different numbers of windows
            assert record["forwards"] == records[0]["forwards"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_threshold_zero_equals_uncached(runs, name):
    parallel = runs[0]
    zero, none = parallel[f"{name}/zero"], parallel[f"{name}/none"]
    assert zero["records"][0]["cached_steps"] == [] and none["records"] == [None, None]
    assert torch.equal(zero["out"], none["out"])


@pytest.mark.parametrize("name", [n for n in CACHED if LAYOUTS[n.rsplit("/", 1)[0]][4]])
def test_parallel_cached_equals_one_process_cached(runs, name):
    parallel, single = runs[0][name], runs[1][name]
    assert parallel["records"][0]["computed_steps"] == single["records"][0]["computed_steps"]
    assert parallel["out"].shape == single["out"].shape
    assert (parallel["out"] - single["out"]).abs().max().item() <= EXACT_ATOL


def test_served_steps_change_the_output(runs):
    """A served step is not a no-op: the cached image differs from the uncached one."""
    parallel = runs[0]
    assert not torch.equal(parallel["sd/patch/fbcache"]["out"], parallel["sd/patch/none"]["out"])
    assert not torch.equal(parallel["pixart/ulysses/fbcache"]["out"], parallel["pixart/ulysses/none"]["out"])


def test_the_job_report_gives_every_ranks_steps(tmp_path):
    check_all_ok(run_ranks(["-m", "paragen", "image", "--model", "tiny-pixart", "--ring", "2", "--steps", "8",
                            "--height", "128", "--width", "128", "--cache", "fbcache", "--cache-threshold", "0.3",
                            "--mode", "displaced", "--warmup-steps", "1", "--name", "cached", "--out", str(tmp_path)],
                           2, timeout=300))
    report = json.loads((tmp_path / "cached.json").read_text())["step_cache"]
    assert report["method"] == "fbcache" and report["ranks_agree"] and report["cached_steps"]
    assert sorted(report["computed_steps"] + report["cached_steps"]) == list(range(8))
    assert set(report["per_rank"]) == {"0", "1"}
    assert all(r["cached_steps"] == report["cached_steps"] for r in report["per_rank"].values())
    assert report["forwards"] == {"computed": len(report["computed_steps"]), "served": len(report["cached_steps"])}
