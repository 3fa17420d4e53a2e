"""What the benchmark drivers and workers share: running a worker, statistics, the machine's name."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def run_worker(worker: Path, name: str, args: list[str], ranks: int, threads: int, out: Path) -> dict:
    """Run `worker` alone (1 rank) or under torchrun; return its JSON result with the image tensor."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if ranks == 1:
        cmd = [sys.executable, str(worker)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), str(worker)]
    cmd += [*args, "--threads", str(threads), "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["image"] = torch.load(out.with_suffix(".pt"))
    print(f"  {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return result


class StepRecorder:
    """Diffusers' step-end callback that stamps every denoising step and snapshots `CommStats` there
    (the same clock for the stock pipeline and for paragen)."""

    def __init__(self, stats=None) -> None:
        self.stats = stats
        self.stamps: list[float] = []
        self.snapshots: list[dict] = []

    def start(self) -> None:
        """Forget the previous request and stamp the start of the next."""
        self.stamps.clear()
        self.snapshots.clear()
        self._mark()

    def __call__(self, pipeline, step, timestep, callback_kwargs):
        self._mark()
        return callback_kwargs

    def _mark(self) -> None:
        self.stamps.append(time.perf_counter())
        if self.stats is not None:
            self.snapshots.append(self.stats.snapshot())

    @property
    def step_s(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    @property
    def comm_per_step(self) -> list[dict]:
        return step_deltas(self.snapshots) if self.stats is not None else []


def timed_request(request, warmup_steps: int, steps: int):
    """Run `request(warmup_steps)` to warm up, then `request(steps)`; return (its output, its seconds)."""
    request(warmup_steps)
    start = time.perf_counter()
    output = request(steps)
    return output, time.perf_counter() - start


def write_result(out: str, result: dict, image: torch.Tensor) -> None:
    """The worker's JSON result at `out` and its image tensor next to it (`.pt`)."""
    Path(out).write_text(json.dumps(result))
    torch.save(image, str(Path(out).with_suffix(".pt")))


def step_deltas(snapshots: list[dict]) -> list[dict]:
    """Per-step {label: {bytes_recv, bytes_sent, wait_s, calls}} from cumulative `CommStats` snapshots."""
    out = []
    for before, after in zip(snapshots, snapshots[1:]):
        step = {}
        for label, row in after.items():
            prev = before.get(label, {"bytes_recv": 0, "bytes_sent": 0, "wait_s": 0.0, "calls": 0})
            step[label] = {k: row[k] - prev[k] for k in ("bytes_recv", "bytes_sent", "wait_s", "calls")}
        out.append(step)
    return out


def run_rounds(worker: Path, plan: dict[str, tuple[list[str], int, int]], rounds: int) -> dict[str, list[dict]]:
    """Every configuration of `plan` (name -> (worker arguments, ranks, threads)) in fresh processes, once per
    round, in the same order each round (slow drifts of the machine hit all alike); the results by name."""
    runs: dict[str, list[dict]] = {name: [] for name in plan}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(rounds):
            print(f"round {round_index + 1}/{rounds}", file=sys.stderr)
            for name, (args, ranks, threads) in plan.items():
                out = Path(tmp) / f"{name}_{round_index}.json"
                runs[name].append(run_worker(worker, name, args, ranks, threads, out))
    return runs


def comm_per_step(results: list[dict], steps, prefix: str) -> dict[str, float]:
    """Bytes sent and seconds blocked per step and rank, per label starting with `prefix` (`<label>.bytes_sent`,
    `<label>.wait_s`) and in total (`bytes_sent`, `wait_s`): the mean over ranks and the steps `steps(result)` of each result,
    then over the results."""
    per_result = []
    for result in results:
        rows: dict[str, list[float]] = {}
        for rank_steps in result["comm_per_step_by_rank"]:
            for i in steps(result):
                step = {k: v for k, v in rank_steps[i].items() if k.startswith(prefix)}
                for label, row in step.items():
                    rows.setdefault(f"{label}.bytes_sent", []).append(row["bytes_sent"])
                    rows.setdefault(f"{label}.wait_s", []).append(row["wait_s"])
                rows.setdefault("bytes_sent", []).append(sum(r["bytes_sent"] for r in step.values()))
                rows.setdefault("wait_s", []).append(sum(r["wait_s"] for r in step.values()))
        per_result.append({k: statistics.fmean(v) for k, v in rows.items()})
    return {k: statistics.fmean(c[k] for c in per_result) for k in per_result[0]}


def add_speedups(summary: dict[str, dict]) -> tuple[float, float]:
    """Each configuration's `speedup_vs_1x1` / `speedup_vs_1x2` (median steady step against `stock_1x1` /
    `stock_1x2`); returns those two medians."""
    one, two = (summary[n]["step_s_steady"]["median"] for n in ("stock_1x1", "stock_1x2"))
    for row in summary.values():
        t = row["step_s_steady"]["median"]
        row["speedup_vs_1x1"], row["speedup_vs_1x2"] = one / t, two / t
    return one, two


def median_ratio(summary: dict, slow: str, fast: str, key: str) -> float | None:
    """Median of configuration `slow` over median of `fast` (`key`: a spread); None if either did not run."""
    if slow not in summary or fast not in summary:
        return None
    return summary[slow][key]["median"] / summary[fast][key]["median"]


def spread(values: list[float]) -> dict[str, float]:
    """Median and 10th/90th percentiles of `values`."""
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]
    return {"median": statistics.median(ordered), "p10": pick(0.1), "p90": pick(0.9), "n": len(ordered)}


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    """PSNR in dB of `a` against `b` (default peak: images in [0, 1])."""
    mse = ((a - b) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


def machine() -> dict:
    """This machine, for the report."""
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "device": "cpu", "backend": "gloo"}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def open_pipeline(model: str, threads: int):
    """A worker's start: the process group (if launched as ranks), its threads, the embedded pipeline."""
    import paragen
    from paragen.pipelines.loading import load_pipeline

    paragen.init(threads=threads)
    torch.set_num_threads(threads)
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def report_header(benchmark: str) -> dict:
    """The fields every benchmark report starts with: what, when, from which revision, on what machine."""
    from paragen.pipelines.report import git_revision

    return {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git_revision": git_revision(),
            "machine": machine()}


PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def square_image_request(pipe, recorder: StepRecorder, size: int, guidance_scale: float = 7.5):
    """`request(steps)` for `timed_request`: one square image of `PROMPT`, seed 0, steps stamped by `recorder`."""

    def request(steps: int) -> torch.Tensor:
        recorder.start()
        return pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
                    generator=torch.Generator().manual_seed(0), output_type="pt", callback_on_step_end=recorder).images

    return request


def rerun_plan(parser, args, configs, default: list[str], same: tuple[str, ...]) -> tuple[list[str], dict]:
    """The configurations to run (`--only` or `default`) and the previous report to merge into (with
    `--only`, when `--out` exists); refuses a previous report of another workload (the `same` fields)."""
    names = default
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - set(configs)
        if unknown:
            parser.error(f"unknown configurations: {', '.join(sorted(unknown))}")
    previous = json.loads(Path(args.out).read_text()) if args.only and Path(args.out).exists() else {}
    if previous and any(previous["workload"][k] != getattr(args, k) for k in same):
        sys.exit(f"{args.out} holds another workload ({', '.join(same)}); rerun all configurations or pick another --out")
    return names, previous
