"""The cost model on this CPU: measure real runs, calibrate the CPU profile on some, check it on the others.

    python bench/cost_cpu.py measure     # every run below; writes bench/results/cost_model_cpu_measured.json
    python bench/cost_cpu.py fit         # the profile from those numbers: paragen/pipelines/cost/profiles/cpu.json
    python bench/cost_cpu.py check       # predictions against the held-out numbers: bench/results/cost_model_cpu.json

`fit` and `check` run no model: given the measured numbers, they are deterministic.

Every run is the real job (`paragen image`), alone on the machine, `--steps 8`; a run's step is the mean of its
report's steps after the first (which pays one-off allocations), and a configuration's the median of REPEATS runs.
Calibration: the compute rates and launch cost on one process using every core (CALIBRATION); then the link's
latency and bandwidth as the ranks see them inside a step, and how much slower a rank computes beside another, on
2-rank runs whose collectives all block (RANK_CALIBRATION: each step against its predicted compute, collectives
and bytes). Check: other sizes, modes and 4 ranks
(HELD_OUT), and for each request of CHOICE every legal 2-rank layout, to see whether the plan's first is the
fastest measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, machine  # noqa: E402
from paragen.pipelines.cost.calibrate import RankedSample, Sample, cpu_profile, features, fit_ranks  # noqa: E402
from paragen.pipelines.cost.devices import PROFILE_DIR, Link, load_profile, save_profile  # noqa: E402
from paragen.pipelines.cost.model import Placement  # noqa: E402
from paragen.pipelines.cost.plan import guidance_calls, layouts, model_cost, predict, rank_plans, _latent  # noqa: E402
from paragen.pipelines.jobs.image import ImageRequest  # noqa: E402

STEPS = 8
REPEATS = 3
CALIBRATION = [("tiny-sd", 128), ("tiny-sd", 256), ("tiny-pixart", 256), ("tiny-pixart", 512), ("tiny-flux", 256),
               ("tiny-flux", 512)]
RANK_CALIBRATION = [("tiny-sd", 128, {"patch": 2}, "sync"), ("tiny-sd", 128, {"cfg": 2}, "sync"),
                    ("tiny-pixart", 256, {"ulysses": 2}, "sync"), ("tiny-pixart", 256, {"cfg": 2}, "sync"),
                    ("tiny-flux", 256, {"ulysses": 2}, "sync")]
HELD_OUT = [("tiny-sd", 192, 2, {"patch": 2}, "sync"), ("tiny-sd", 192, 2, {"patch": 2}, "displaced"),
            ("tiny-sd", 320, 2, {"patch": 2}, "partial"), ("tiny-sd", 192, 2, {"cfg": 2}, "sync"),
            ("tiny-sd", 256, 4, {"patch": 4}, "sync"), ("tiny-sd", 256, 4, {"cfg": 2, "patch": 2}, "displaced"),
            ("tiny-pixart", 384, 2, {"ulysses": 2}, "sync"), ("tiny-pixart", 384, 2, {"ring": 2}, "sync"),
            ("tiny-pixart", 768, 2, {"ulysses": 2}, "displaced"), ("tiny-pixart", 384, 2, {"cfg": 2}, "sync"),
            ("tiny-pixart", 512, 4, {"ulysses": 4}, "sync"), ("tiny-pixart", 512, 4, {"ulysses": 2, "ring": 2}, "sync"),
            ("tiny-flux", 384, 2, {"ring": 2}, "sync"), ("tiny-flux", 768, 2, {"ulysses": 2}, "sync"),
            ("tiny-flux", 384, 4, {"ulysses": 2, "ring": 2}, "sync")]
CHOICE = [("tiny-sd", 192), ("tiny-sd", 384), ("tiny-pixart", 384), ("tiny-pixart", 768), ("tiny-flux", 384)]
CORES = os.cpu_count() or 1


def measure(model: str, size: int, ranks: int, layout: list[str], threads: int) -> float:
    """The median over REPEATS runs of `run_once`."""
    seconds = statistics.median(run_once(model, size, ranks, layout, threads) for _ in range(REPEATS))
    print(f"  {model} {size}² {ranks} ranks {' '.join(layout)}: {seconds:.4f} s/step", file=sys.stderr)
    return seconds


def run_once(model: str, size: int, ranks: int, layout: list[str], threads: int) -> float:
    """The mean step (after the first) of one `paragen image` run."""
    with tempfile.TemporaryDirectory() as out:
        args = ["-m", "paragen", "image", "--model", model, "--height", str(size), "--width", str(size),
                "--steps", str(STEPS), "--threads", str(threads), "--out", out, "--name", "r", *layout]
        launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                       "--nproc-per-node", str(ranks), "--log-dir", out + "/logs"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
        proc = subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{model} {size} {layout}: {proc.stderr[-2000:]}")
        steps = json.loads(Path(out, "r.json").read_text())["timings"]["step_s"]
    return statistics.mean(steps[1:])


def request(model: str, size: int) -> ImageRequest:
    return ImageRequest(model=model, height=size, width=size, steps=STEPS)


def pick(found: list, degrees: dict[str, int], mode: str):
    """The layout of `found` with these degrees (the others 1) and mode."""
    return next(x for x in found if degrees.items() <= dict(x.degrees).items() and x.mode == mode)


MEASURED = Path(ROOT, "bench/results/cost_model_cpu_measured.json")


def key(model: str, size: int, ranks: int, arguments: list[str]) -> str:
    return " ".join([model, f"{size}²", f"{ranks}ranks", *arguments])


def runs() -> list[tuple[str, int, int, list[str]]]:
    """Every run `measure` makes: (model, size, ranks, layout arguments)."""
    found = [(model, size, 1, []) for model, size in CALIBRATION]
    for model, size, degrees, mode in RANK_CALIBRATION:
        found.append((model, size, 2, pick(image_layouts(model, size, 2), degrees, mode).arguments()))
    for model, size, ranks, degrees, mode in HELD_OUT:
        found.append((model, size, ranks, pick(image_layouts(model, size, ranks), degrees, mode).arguments()))
    for model, size in CHOICE:
        found += [(model, size, 2, layout.arguments()) for layout in image_layouts(model, size, 2)]
    return list(dict.fromkeys((m, s, r, tuple(a)) for m, s, r, a in found))


def image_layouts(model: str, size: int, ranks: int) -> list:
    return layouts(model_cost(model, torch.float32), request(model, size), "image", ranks)[0]


def measure_all() -> None:
    measured = {}
    for model, size, ranks, arguments in runs():
        threads = max(1, CORES // ranks)
        measured[key(model, size, ranks, list(arguments))] = measure(model, size, ranks, list(arguments), threads)
    MEASURED.write_text(json.dumps({"machine": machine(), "steps": STEPS, "repeats": REPEATS, "seconds": measured},
                                   indent=1) + "\n")


def fit_profile() -> None:
    measured = json.loads(MEASURED.read_text())["seconds"]
    samples = []
    for model, size in CALIBRATION:
        cost = model_cost(model, torch.float32)
        req = request(model, size)
        batch, calls = guidance_calls(cost, req, 1)
        trace = cost.call(batch, *_latent(cost, req))
        samples.append(Sample(f"{model} {size}", features(trace, calls, CORES), measured[key(model, size, 1, [])]))
    cpu = machine()
    free = Link("free", 1e30, 0.0)
    memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    source = f"calibrated by bench/cost_cpu.py on {cpu.get('cpu', 'this CPU')}, {CORES} cores"
    compute = cpu_profile(samples, free, CORES, memory, source)
    ranked = []
    for model, size, degrees, mode in RANK_CALIBRATION:
        cost = model_cost(model, torch.float32)
        req = request(model, size)
        layout = pick(image_layouts(model, size, 2), degrees, mode)
        step = predict(cost, req, layout, Placement(2, 2, 1), compute).fresh
        ranked.append(RankedSample(f"{model} {size} {layout.describe()}", step.compute_s, step.calls,
                                   step.bytes_intra, measured[key(model, size, 2, layout.arguments())]))
    contention, link, worst = fit_ranks(ranked, "gloo-loopback")
    profile = cpu_profile(samples, link, CORES, memory, source, contention)
    profile.fit["rank_samples"] = [asdict(s) for s in ranked]
    profile.fit["rank_worst_relative_error"] = worst
    save_profile(profile, PROFILE_DIR / "cpu.json")
    print(json.dumps(asdict(profile), indent=1))


def check() -> None:
    measured = json.loads(MEASURED.read_text())["seconds"]
    device = load_profile(PROFILE_DIR / "cpu.json")
    rows = []
    for model, size, ranks, degrees, mode in HELD_OUT:
        threads = max(1, CORES // ranks)
        layout = pick(image_layouts(model, size, ranks), degrees, mode)
        plan = predict(model_cost(model, torch.float32), request(model, size), layout,
                       Placement(ranks, ranks, threads), device)
        seconds = measured[key(model, size, ranks, layout.arguments())]
        rows.append({"model": model, "size": size, "ranks": ranks, "layout": layout.describe(),
                     "predicted_s": plan.step_s, "measured_s": seconds, "error": plan.step_s / seconds - 1})
    choices = []
    for model, size in CHOICE:
        plans, _ = rank_plans(request(model, size), "image", Placement(2, 2, 1), device, torch.float32)
        seconds = {p.layout.describe(): measured[key(model, size, 2, p.layout.arguments())] for p in plans}
        fastest = min(seconds, key=seconds.get)
        chosen = plans[0].layout.describe()
        choices.append({"model": model, "size": size, "chosen": chosen, "fastest": fastest,
                        "chosen_is_fastest": chosen == fastest, "chosen_vs_fastest": seconds[chosen] / seconds[fastest],
                        "predicted": {p.layout.describe(): p.step_s for p in plans}, "measured": seconds})
    result = {"machine": machine(), "profile": device.fit, "held_out": rows, "choice": choices,
              "within_20_percent": sum(abs(r["error"]) <= 0.2 for r in rows), "held_out_runs": len(rows),
              "chosen_fastest": sum(c["chosen_is_fastest"] for c in choices), "requests": len(choices)}
    Path(ROOT, "bench/results/cost_model_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    for row in rows:
        print(f"{row['model']} {row['size']}² {row['ranks']} ranks {row['layout']}: predicted "
              f"{row['predicted_s']:.4f} s, measured {row['measured_s']:.4f} s ({100 * row['error']:+.0f} %)")
    for c in choices:
        print(f"{c['model']} {c['size']}²: chosen {c['chosen']}, fastest {c['fastest']} "
              f"(chosen/fastest {c['chosen_vs_fastest']:.2f})")
    print(f"within 20 %: {result['within_20_percent']}/{len(rows)}; chosen fastest: {result['chosen_fastest']}/"
          f"{len(choices)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=("measure", "fit", "check"))
    {"measure": measure_all, "fit": fit_profile, "check": check}[parser.parse_args().phase]()
