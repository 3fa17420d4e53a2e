#!/usr/bin/env python3
"""`make gpu-check`: paragen's CUDA paths on one GPU, in one script, within a time budget (default 480 s).

    python3 bench/gpu_check.py --install-wheels .gpu-wheels            # on the GPU machine (its own python3)
    python3 bench/gpu_check.py --install-wheels .gpu-wheels --out $OUT/gpu_h200.json
    .venv/bin/python bench/gpu_check.py --cpu                           # the same sections, tiny, on the CPU

Sections (each in its own subprocess(es) with a timeout; a failure is recorded, the next section runs):
- install: the wheels `tools/gpu_wheels.sh` downloaded (diffusers and the pure-Python packages it needs), for what
  this Python lacks, into a temporary folder put first on the path (`pip install --no-index --no-deps --target`),
  so the machine's own torch and transformers are used; paragen itself runs from this working tree.
- gpu_tests: `pytest -m gpu` (tests/test_gpu_kernels.py: the kernels' CUDA branches against their CPU
  references, ChunkFetcher on a side stream); pass/fail/skip counts.
- cli: every workload of `python -m paragen` at 1 rank on the device in bf16 on the embedded models (and PixArt
  with `--offload-layers`: its blocks from pinned host memory on a side stream); the output is read back (PNG/GIF not flat, report on the device, in the dtype, with finite timings).
- multirank: 2 ranks on the one GPU over gloo (`paragen.init(device="cuda:0", backend="gloo")`): which
  collectives gloo runs on CUDA tensors (probe), then tiny-sd in sync patch mode and tiny-passkey dense seq=2
  against 1 rank; operations gloo cannot run on CUDA tensors go through host memory (the approach is recorded).
- ceilings, timing_sdxl, timing_flux, timing_llm: bench/gpu_timing.py at real sizes with random weights
  (medians of >= 5 timed calls after warm-up, CUDA events), paragen at 1 rank against the stock model.

The JSON (default bench/results/gpu_<kind>.json, `--cpu`: bench/results/gpu_check_cpu.json) holds the machine,
each section's status, error, duration and figures, and a summary; it is rewritten after every section, so
a run cut short still leaves what it measured. A section that would not fit in what is left of the budget is
recorded as skipped with the reason.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                    "ROLE_RANK", "TORCHELASTIC_RUN_ID")
LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_", "MPI_LOCALRANKID", "MV2_")
PARAGEN_OPS = ("p2p", "all_gather_flat", "all_to_all", "broadcast", "all_reduce")  # as bench/gpu_multirank.py names them
SECTION_ORDER = ("install", "gpu_tests", "cli", "multirank", "ceilings", "timing_sdxl", "timing_flux", "timing_llm")


class SectionFailed(Exception):
    """A section ran but did not pass; `figures` holds what it measured nonetheless."""

    def __init__(self, message: str, figures: dict | None = None) -> None:
        super().__init__(message)
        self.figures = figures or {}


# ---- processes -------------------------------------------------------------------------------------------------
def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the process group this script started for `proc` (it and its children), and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.communicate(timeout=10)
    except (subprocess.TimeoutExpired, ValueError):
        pass


def run_processes(cmds: list[tuple[list[str], dict]], timeout: float, cwd: Path = ROOT) -> list[dict]:
    """Run the commands together (each in a new process group, output to a temporary file); wait until all end or
    `timeout` seconds pass, then kill what is left. Returns per command: rc (None if killed), timed_out, seconds, tail."""
    started = time.monotonic()
    logs = [tempfile.TemporaryFile(mode="w+") for _ in cmds]
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for (cmd, env), log in zip(cmds, logs)]
    results = []
    for proc, log in zip(procs, logs):
        left = max(0.1, timeout - (time.monotonic() - started))
        timed_out = False
        try:
            proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        log.seek(0)
        output = log.read()
        log.close()
        results.append({"rc": None if timed_out else proc.returncode, "timed_out": timed_out,
                        "seconds": time.monotonic() - started, "tail": output[-3000:]})
    return results


def failure_text(result: dict, limit: float) -> str:
    if result["timed_out"]:
        return f"timed out after {limit:.0f} s; output ends:\n{result['tail'][-1500:]}"
    return f"exit {result['rc']}; output ends:\n{result['tail'][-1500:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- the check -------------------------------------------------------------------------------------------------
class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.cpu = args.cpu
        self.python = args.python or sys.executable
        self.site: Path | None = None
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="paragen-gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.device = "cpu" if self.cpu else "cuda"
        self.dtype = "float32" if self.cpu else "bfloat16"
        self.out: Path | None = Path(args.out) if args.out else None
        self.report: dict = {
            "check": "gpu_check", "mode": "cpu" if self.cpu else "gpu", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "budget_s": args.budget, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "work_dir": str(self.work), "machine": {}, "sections": {}, "summary": {},
        }

    # -- budget and bookkeeping --
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.args.budget - self.elapsed()

    def limit(self, cap_gpu: float, cap_cpu: float) -> float:
        """A subprocess timeout: the section's cap, never past the budget."""
        return max(5.0, min(cap_cpu if self.cpu else cap_gpu, self.remaining()))

    def write(self) -> None:
        if self.out is None:
            return
        self.report["elapsed_s"] = self.elapsed()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.report, indent=1, default=str))
        tmp.replace(self.out)

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith(LAUNCH_PREFIXES)}
        paths = ([str(self.site)] if self.site else []) + [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env.update(PYTHONPATH=os.pathsep.join(paths), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error",
                   PYTHONWARNINGS="ignore")
        env.update(extra)
        return env

    def section(self, name: str, min_s: float, fn) -> None:
        entry: dict = {"status": None, "error": None, "duration_s": 0.0}
        self.report["sections"][name] = entry
        if self.args.only and name not in self.args.only and name != "install":
            entry.update(status="skipped", reason="not in --only")
            return
        if self.remaining() < min_s:
            entry.update(status="skipped", reason=f"needs at least {min_s:.0f} s; {max(0.0, self.remaining()):.0f} s of the "
                                                  f"{self.args.budget:.0f} s budget left")
            self.write()
            return
        print(f"[gpu_check] {name} ({self.remaining():.0f} s of the budget left)", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            figures = dict(fn() or {})
            status = figures.pop("_status", "ok")
            entry.update(figures)
            entry["status"] = status
        except SectionFailed as failure:
            entry.update(failure.figures)
            entry.update(status="failed", error=str(failure)[-4000:])
        except Exception as error:  # noqa: BLE001 - recorded, the next section runs
            entry.update(status="failed", error=f"{type(error).__name__}: {error}"[-4000:],
                         traceback=traceback.format_exc()[-3000:])
        entry["duration_s"] = time.monotonic() - started
        print(f"[gpu_check] {name}: {entry['status']} in {entry['duration_s']:.1f} s"
              + (f" - {str(entry['error']).splitlines()[0][:200]}" if entry["error"] else ""), file=sys.stderr, flush=True)
        self.write()

    # -- install --
    def install(self) -> dict:
        folder = Path(self.args.install_wheels)
        have = _importable("diffusers")
        wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
        figures: dict = {"folder": str(folder), "wheels": [w.name for w in wheels],
                         "folder_mib": sum(w.stat().st_size for w in wheels) / 2**20}
        if not wheels:
            if have:
                return dict(figures, _status="skipped", reason=f"no wheels in {folder}; diffusers {have} is importable")
            raise SectionFailed(f"no wheels in {folder} and diffusers is not importable: run tools/gpu_wheels.sh where the "
                                "package index is reachable and carry the folder", figures)
        wanted = [f"diffusers=={_wheel_version(wheels, 'diffusers')}" if _wheel_version(wheels, "diffusers") else "diffusers"]
        if _wheel_version(wheels, "pytest"):
            wanted.append("pytest")
        plan = self.work / "pip-plan.json"
        dry = run_processes([([self.python, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
                               "--no-index", "--find-links", str(folder), "--report", str(plan), *wanted], self.env())],
                            self.limit(120, 120))[0]
        if dry["rc"] == 0 and plan.exists():
            names = {_normal(item["metadata"]["name"]) for item in json.loads(plan.read_text()).get("install", [])}
            chosen = [w for w in wheels if _normal(w.name.split("-")[0]) in names]
            figures["resolved_by"] = "pip install --dry-run --report (against this Python's packages)"
        else:
            chosen = [w for w in wheels if not _importable_dist(w.name.split("-")[0])]
            figures["resolved_by"] = f"the wheels whose distribution is missing (pip's dry run failed: {dry['tail'][-300:]})"
        figures["installed"] = [w.name for w in chosen]
        self.site = Path(tempfile.mkdtemp(prefix="paragen-gpu-site-"))
        if chosen:
            done = run_processes([([self.python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
                                    "--no-deps", "--no-compile", "--target", str(self.site), *map(str, chosen)], self.env())],
                                 self.limit(180, 180))[0]
            if done["rc"] != 0:
                raise SectionFailed(f"pip install --target failed: {failure_text(done, 180)}", figures)
        sys.path.insert(0, str(self.site))
        importlib.invalidate_caches()
        figures["site"] = str(self.site)
        probe = run_processes([([self.python, "-c", "import diffusers, pytest; print(diffusers.__version__, pytest.__version__)"],
                                self.env())], self.limit(120, 120))[0]
        if probe["rc"] != 0:
            raise SectionFailed(f"diffusers/pytest still do not import: {failure_text(probe, 120)}", figures)
        figures["diffusers_and_pytest"] = probe["tail"].strip().splitlines()[-1]
        return figures

    # -- machine --
    def machine(self) -> dict:
        import torch

        info: dict = {"python": platform.python_version(), "executable": self.python, "platform": platform.platform(),
                      "cpu_cores": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
                      "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
        for dist in ("transformers", "diffusers", "huggingface-hub", "safetensors", "pytest", "numpy"):
            info[dist] = _importable_dist(dist)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                        capability=f"{props.major}.{props.minor}", device_memory_gib=props.total_memory / 2**30,
                        multiprocessors=props.multi_processor_count,
                        bf16_native=torch.cuda.is_bf16_supported(including_emulation=False))
            smi = shutil.which("nvidia-smi")
            if smi:
                try:
                    info["driver"] = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                                    capture_output=True, text=True, timeout=20).stdout.strip()
                except (OSError, subprocess.SubprocessError):
                    pass
        else:
            info["device"] = "cpu"
        info["git_revision"], info["revision_source"] = self.revision()
        return info

    def revision(self) -> tuple[str, str]:
        try:
            rev = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=ROOT, capture_output=True,
                                 text=True, timeout=10).stdout.strip()
            if rev:
                return rev, "git"
        except (OSError, subprocess.SubprocessError):
            pass
        if self.args.revision:
            return self.args.revision, "--revision"
        if self.args.install_wheels and (Path(self.args.install_wheels) / "REVISION").is_file():
            return (Path(self.args.install_wheels) / "REVISION").read_text().strip(), "the wheels folder (tools/gpu_wheels.sh)"
        return "unknown", "none (no git checkout here: pass --revision)"

    # -- gpu_tests --
    def gpu_tests(self) -> dict:
        files = ["tests/test_gpu_kernels.py"] + sorted(
            str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
            if p.name != "test_gpu_kernels.py" and re.search(r"mark\.gpu\b", p.read_text(encoding="utf-8", errors="replace")))
        xml = self.work / "gpu_tests.xml"
        limit = self.limit(200, 300)
        result = run_processes([([self.python, "-m", "pytest", "-m", "gpu", *files, "-q", "-p", "no:cacheprovider", "-rfEs",
                                  f"--junitxml={xml}"], self.env())], limit)[0]
        figures: dict = {"files": files, "command": f"pytest -m gpu {' '.join(files)}"}
        if not xml.exists():
            raise SectionFailed(f"pytest wrote no report: {failure_text(result, limit)}", figures)
        figures.update(_junit_counts(xml))
        figures["rc"] = result["rc"]
        if result["timed_out"] or figures["failed"] or figures["errors"] or result["rc"] not in (0, 5):
            bad = [f"{case['name'].rsplit('.', 1)[-1]}: {(case['message'] or '').splitlines()[0][:200] if case['message'] else ''}"
                   for case in figures["cases"] if case["outcome"] in ("failure", "error")]
            raise SectionFailed(f"{figures['failed']} failed, {figures['errors']} errors: " + "; ".join(bad)
                                + (f"; {failure_text(result, limit)}" if result["timed_out"] or not bad else ""), figures)
        if not self.cpu and figures["passed"] == 0:
            raise SectionFailed("no GPU test passed (all skipped?)", figures)
        return figures

    # -- cli --
    def cli_runs(self) -> list[tuple[str, str, list[str]]]:
        if self.cpu:
            image, steps, hires = ["--height", "64", "--width", "64"], ["--steps", "2"], ["--window", "16", "--height", "128", "--width", "192"]
            video = ["--frames", "8", "--height", "64", "--width", "64", "--steps", "1"]
            context = ["--context", "1024"]
            retrieval = ["--retrieval-budget", "512"]  # at most the 1016-token prompt
        else:
            image, steps, hires = ["--height", "512", "--width", "512"], ["--steps", "8"], ["--height", "1024", "--width", "1024"]
            video = ["--frames", "16", "--height", "128", "--width", "128", "--steps", "6"]
            context = ["--context", "16384"]
            retrieval = []
        speculative = ["llm", "--model", "tiny-passkey-lm", *context, "--kv", "speculative", *retrieval, "--new-tokens", "16"]
        return [
            ("image_tiny-sd", "image", ["image", "--model", "tiny-sd", *image, *steps]),
            ("image_tiny-pixart", "image", ["image", "--model", "tiny-pixart", *image, *steps]),
            # blocks from pinned host memory, copied on a side stream (on the CPU nothing moves)
            ("image_tiny-pixart_offload_layers", "image", ["image", "--model", "tiny-pixart", *image, *steps,
                                                           "--offload-layers"]),
            ("image_tiny-flux", "image", ["image", "--model", "tiny-flux", *image, *steps]),
            ("hires_tiny-sd", "image", ["image", "--model", "tiny-sd", "--hires", *hires, *steps]),
            ("video_tiny-t2v", "video", ["video", "--model", "tiny-t2v", *video, "--format", "gif"]),
            ("llm_dense", "llm", ["llm", "--model", "tiny-passkey", *context, "--kv", "dense", "--new-tokens", "8"]),
            ("llm_offload", "llm", ["llm", "--model", "tiny-passkey", *context, "--kv", "offload", "--new-tokens", "8"]),
            ("llm_speculative", "llm", speculative),
            ("llm_speculative_host", "llm", [*speculative, "--full-cache", "host"]),
        ]

    def cli(self) -> dict:
        runs = self.cli_runs()
        limit = self.limit(150, 600)

        def one(run):
            name, kind, argv = run
            folder = self.work / "cli" / name
            shutil.rmtree(folder, ignore_errors=True)
            cmd = [self.python, "-m", "paragen", *argv, "--device", self.device, "--dtype", self.dtype, "--out", str(folder),
                   "--timeout", "60"]
            result = run_processes([(cmd, self.env())], limit)[0]
            entry = {"command": " ".join(["python", "-m", "paragen", *cmd[3:]]), "seconds": result["seconds"]}
            if result["rc"] != 0:
                return name, dict(entry, ok=False, error=failure_text(result, limit))
            try:
                entry.update(_check_cli_output(kind, folder, self.device, self.dtype, argv))
            except Exception as error:  # noqa: BLE001
                entry.update(ok=False, error=f"{type(error).__name__}: {error}")
            return name, entry

        with ThreadPoolExecutor(max_workers=max(1, self.args.jobs)) as pool:
            entries = dict(pool.map(one, runs))
        device, host = entries.get("llm_speculative", {}), entries.get("llm_speculative_host", {})
        if device.get("ok") and host.get("ok") and device["new_token_ids"] != host["new_token_ids"]:
            host.update(ok=False, error="its tokens differ from the full cache's on the device (both are lossless)")
        bad = [name for name, entry in entries.items() if not entry.get("ok")]
        figures = {"runs": entries, "passed": len(runs) - len(bad), "total": len(runs), "device": self.device, "dtype": self.dtype,
                   "parallel_jobs": self.args.jobs}
        if bad:
            raise SectionFailed(f"{len(bad)} of {len(runs)} CLI runs failed: " + "; ".join(
                f"{name}: {str(entries[name].get('error')).splitlines()[0][:300]}" for name in bad), figures)
        return figures

    # -- multirank --
    def ranks(self, argv: list[str], world: int, timeout: float) -> list[dict]:
        """`python bench/gpu_multirank.py argv` as `world` ranks (torchrun's variables; world 1: a plain process)."""
        port = free_port()
        cmds = []
        for rank in range(world):
            extra = {} if world == 1 else {
                "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            if world > 1 and "GLOO_SOCKET_IFNAME" not in os.environ:
                extra["GLOO_SOCKET_IFNAME"] = "lo"  # one host: loopback, whatever the host name resolves to
            if self.cpu:
                extra["OMP_NUM_THREADS"] = "1"
            cmds.append(([self.python, str(BENCH / "gpu_multirank.py"), *argv], self.env(**extra)))
        return run_processes(cmds, timeout)

    def multirank(self) -> dict:
        device = "cpu" if self.cpu else "cuda:0"
        sizes = (["--size", "64", "--steps", "2", "--context", "1024", "--new-tokens", "6"] if self.cpu
                 else ["--size", "256", "--steps", "4", "--context", "4096", "--new-tokens", "8"])
        base = self.work / "multirank"
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        figures: dict = {"device": device, "backend": "gloo", "dtype": "float32 (TF32 off: 1 rank vs 2 compare closely)",
                         "image": "tiny-sd, sync patch mode, patch = ranks", "llm": "tiny-passkey, dense KV, seq = ranks",
                         "ranks_share_one_device": True}
        probe_limit, run_limit = self.limit(120, 240), self.limit(200, 400)
        with ThreadPoolExecutor(max_workers=2) as pool:
            probe_job = pool.submit(self.ranks, ["probe", "--device", device, "--timeout", "20", "--result", str(base / "probe")], 2,
                                    probe_limit)
            ref_job = pool.submit(self.ranks, ["run", "--device", device, *sizes, "--result", str(base / "ref.json")], 1, run_limit)
            probe_results, ref_results = probe_job.result(), ref_job.result()
        figures["probe"] = _read_probe(base / "probe", probe_results, probe_limit)
        if ref_results[0]["rc"] != 0 or not (base / "ref.json").exists():
            raise SectionFailed(f"the 1-rank reference run failed: {failure_text(ref_results[0], run_limit)}", figures)
        reference = json.loads((base / "ref.json").read_text())
        figures["reference_1rank"] = {k: reference.get(k) for k in ("device", "passkey", "passkey_answer", "timings", "image_finite")}

        native = figures["probe"].get("paragen_ops_native", {})
        staged = [op for op in PARAGEN_OPS if not native.get(op, False)]
        attempts = []
        plans = [staged] + ([list(PARAGEN_OPS)] if staged != list(PARAGEN_OPS) else [])
        two = None
        for plan in plans:
            if self.remaining() < 20:
                attempts.append({"staged": plan, "status": "skipped", "reason": "budget spent"})
                break
            attempt, result_path = self.two_ranks(device, sizes, plan, base, run_limit)
            attempts.append(attempt)
            if attempt["status"] == "ok":
                two = (plan, result_path)
                break
        figures["attempts"] = attempts
        if two is None:
            raise SectionFailed("the 2-rank run failed with every approach tried", figures)
        plan, result_path = two
        if self.cpu:
            figures["approach"] = "gloo on CPU tensors (the CPU run)"
        elif not plan:
            figures["approach"] = "gloo on CUDA tensors for every operation paragen uses"
        else:
            figures["approach"] = (f"gloo with CUDA tensors where gloo takes them; {', '.join(plan)} staged through host "
                                   "memory (bench/gpu_multirank.py install_host_staging: device-to-host copy, gloo on the "
                                   "host copy, host-to-device copy at wait)")
        figures.update(_compare_runs(base / "ref.json", result_path))
        problems = _comparison_problems(figures)
        if self.cpu and self.remaining() > 20:
            # The host-staging path is what a GPU may need; on the CPU it runs with every tensor staged.
            attempt, staged_path = self.two_ranks(device, sizes, list(PARAGEN_OPS), base, run_limit, every_tensor=True)
            exercise = dict(attempt, note="every operation paragen uses staged, CPU tensors too (--stage-every-tensor)")
            if attempt["status"] == "ok":
                exercise.update(_compare_runs(base / "ref.json", staged_path))
                problems += [f"host staging: {p}" for p in _comparison_problems(exercise)]
            else:
                problems.append("host staging: the 2-rank run failed")
            figures["host_staging_exercise"] = exercise
        if problems:
            raise SectionFailed("; ".join(problems), figures)
        return figures

    def two_ranks(self, device: str, sizes: list[str], plan: list[str], base: Path, limit: float,
                  every_tensor: bool = False) -> tuple[dict, Path]:
        """One 2-rank run of bench/gpu_multirank.py with the operations in `plan` staged through host memory."""
        result_path = base / f"two_{'_'.join(plan) or 'native'}{'_every' if every_tensor else ''}.json"
        argv = ["run", "--device", device, *sizes, "--stage", ",".join(plan), "--result", str(result_path)]
        results = self.ranks(argv + (["--stage-every-tensor"] if every_tensor else []), 2, self.limit(200, 400))
        ok = all(r["rc"] == 0 for r in results) and result_path.exists()
        attempt: dict = {"staged": plan, "status": "ok" if ok else "failed", "seconds": max(r["seconds"] for r in results)}
        if (base / f"{result_path.name}.staged.json").exists():
            attempt["wrapped"] = json.loads((base / f"{result_path.name}.staged.json").read_text())
        if not ok:
            errors = sorted(base.glob(result_path.name + ".error.rank*.txt"))
            attempt["error"] = (errors[0].read_text()[-1500:] if errors else
                                failure_text(next((r for r in results if r["rc"] != 0), results[0]), limit))
        return attempt, result_path

    # -- timings --
    def timing(self, name: str, cap_gpu: float, cap_cpu: float) -> dict:
        limit = self.limit(cap_gpu, cap_cpu)
        result_path = self.work / f"timing_{name}.json"
        result_path.unlink(missing_ok=True)
        cmd = [self.python, str(BENCH / "gpu_timing.py"), name, "--device", self.device, "--dtype", self.dtype,
               "--reps", str(self.args.reps), "--result", str(result_path), "--budget-s", str(max(10.0, limit * 0.6))]
        if self.cpu:
            cmd.append("--tiny")
        result = run_processes([(cmd, self.env())], limit)[0]
        if not result_path.exists():
            raise SectionFailed(f"gpu_timing.py {name} wrote no result: {failure_text(result, limit)}")
        figures = json.loads(result_path.read_text())
        figures.pop("section", None)
        if not figures.pop("ok", False):
            raise SectionFailed(figures.pop("error", "failed"), figures)
        problems = [k for k in ("unet_output_finite", "latents_finite", "output_finite") if figures.get(k) is False]
        if figures.get("errors"):
            problems += [f"{mode}: {error}" for mode, error in figures["errors"].items()]
        if problems:
            raise SectionFailed("; ".join(map(str, problems)), figures)
        return figures

    # -- summary --
    def summarize(self) -> None:
        s = self.report["sections"]
        summary: dict = {"statuses": {name: entry["status"] for name, entry in s.items()}}
        tests = s.get("gpu_tests", {})
        if "passed" in tests:
            summary["gpu_tests"] = {k: tests[k] for k in ("passed", "failed", "errors", "skipped")}
        if "runs" in s.get("cli", {}):
            summary["cli"] = f"{s['cli']['passed']}/{s['cli']['total']} ok"
        mr = s.get("multirank", {})
        if "image_max_abs_diff" in mr:
            summary["multirank"] = {"approach": mr.get("approach"), "image_max_abs_diff": mr["image_max_abs_diff"],
                                    "llm_same_tokens": mr["llm_same_tokens"]}
        if "matmul" in s.get("ceilings", {}):
            summary["ceilings"] = {"matmul_tflops_per_s": s["ceilings"]["matmul"]["tflops_per_s"],
                                   "copy_gb_per_s": s["ceilings"]["device_copy"]["gb_per_s_read_plus_write"]}
        sd = s.get("timing_sdxl", {})
        if "unet_full" in sd:
            summary["sdxl"] = {"unet_s": sd["unet_full"]["median"], "band_of_4_s": sd["unet_band_of_4"]["median"],
                               "step_stock_s": sd["pipeline_step_stock"]["median"],
                               "step_paragen_s": sd["pipeline_step_paragen_1rank"]["median"],
                               "paragen_overhead": sd["paragen_overhead"]}
        fx = s.get("timing_flux", {})
        if "forward" in fx:
            summary["flux"] = {"forward_s": fx["forward"]["median"], "estimate_full_s": fx.get("forward_estimate_full_s")}
        lm = s.get("timing_llm", {})
        for mode in ("stock", "dense", "offload", "speculative", "speculative_host"):
            if mode in lm:
                summary.setdefault("llm", {})[mode] = {"prefill_s": lm[mode]["prefill_s"]["median"],
                                                       "decode_tokens_per_s": lm[mode]["decode_tokens_per_s"]}
        for versus in ("dense_vs_stock", "speculative_vs_dense", "speculative_host_vs_dense"):
            if versus in lm:
                summary.setdefault("llm", {})[versus] = lm[versus]
        self.report["summary"] = summary


def _importable(module: str) -> str | None:
    """The version of `module` if this Python imports it, else None."""
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001
        return None


def _importable_dist(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_version(wheels: list[Path], name: str) -> str | None:
    for wheel in wheels:
        parts = wheel.name.split("-")
        if _normal(parts[0]) == _normal(name):
            return parts[1]
    return None


def _junit_counts(xml: Path) -> dict:
    root = ElementTree.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(suite.get(k, 0)) for suite in suites) for k in ("tests", "failures", "errors", "skipped")}
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = tag, (node.get("message") or "")[:400]
                break
        cases.append({"name": f"{case.get('classname', '')}::{case.get('name')}", "outcome": outcome, "message": message,
                      "seconds": float(case.get("time", 0) or 0)})
    return {"collected": counts["tests"], "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"], "cases": cases}


def _check_cli_output(kind: str, folder: Path, device: str, dtype: str, argv: list[str]) -> dict:
    import numpy as np
    from PIL import Image, ImageSequence

    reports = sorted(folder.glob("*.json"))
    if len(reports) != 1:
        raise ValueError(f"expected one JSON report in {folder}, found {[p.name for p in reports]}")
    report = json.loads(reports[0].read_text())
    timings = report.get("timings", {})
    entry: dict = {"report_device": report.get("device"), "report_dtype": report.get("dtype"),
                   "generate_s": timings.get("generate_s"), "load_s": timings.get("load_s"),
                   "step_median_s": timings.get("step_median_s")}
    problems = []
    if not str(report.get("device", "")).startswith(device):
        problems.append(f"the report says device {report.get('device')!r}, not {device}")
    if report.get("dtype") != dtype:
        problems.append(f"the report says dtype {report.get('dtype')!r}, not {dtype}")
    if not finite(timings.get("generate_s")):
        problems.append(f"generate_s is {timings.get('generate_s')!r}")
    if kind == "image":
        (png,) = folder.glob("*.png")
        pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
        entry.update(image=png.name, shape=list(pixels.shape), pixel_std=float(pixels.std()),
                     black_fraction=float((pixels.max(axis=-1) == 0).mean()))
        if not pixels.std() > 0:
            problems.append("the image is one flat colour (non-finite latents decode to that)")
    elif kind == "video":
        media = sorted(folder.glob("*.gif")) + sorted(folder.glob("*.mp4"))
        frames = np.stack([np.asarray(f.convert("RGB"), dtype=np.float64) for f in ImageSequence.Iterator(Image.open(media[0]))])
        want = int(argv[argv.index("--frames") + 1])
        entry.update(video=media[0].name, frames=int(frames.shape[0]), pixel_std=float(frames.std()),
                     frames_per_s=report.get("frames_per_s"))
        if frames.shape[0] != want:
            problems.append(f"{frames.shape[0]} frames written, {want} asked")
        if not frames.std() > 0:
            problems.append("the video is one flat colour")
    else:
        new = report.get("new_tokens") or []
        entry.update(prefill_s=report.get("prefill_s"), decode_tokens_per_s=report.get("decode_tokens_per_s"),
                     new_tokens=len(new), new_token_ids=new, passkey_correct=report.get("correct"),
                     kv_per_rank=report.get("kv_per_rank"))
        if len(new) != int(argv[argv.index("--new-tokens") + 1]):
            problems.append(f"{len(new)} new tokens")
        if not (finite(report.get("prefill_s")) and finite(report.get("decode_tokens_per_s"))):
            problems.append("prefill_s or decode_tokens_per_s not finite")
    entry["ok"] = not problems
    if problems:
        entry["error"] = "; ".join(problems)
    return entry


IMAGE_TOLERANCE = 1e-3  # max abs difference of [0, 1] pixels between 1 and 2 ranks (float32, sync patch mode)


def _compare_runs(one_path: Path, two_path: Path) -> dict:
    """The 2-rank run against the 1-rank one: image difference and generated tokens."""
    import torch

    one, two = json.loads(one_path.read_text()), json.loads(two_path.read_text())
    one_image, two_image = torch.load(f"{one_path}.image.pt"), torch.load(f"{two_path}.image.pt")
    return {
        "image_max_abs_diff": float((one_image - two_image).abs().max()), "image_tolerance": IMAGE_TOLERANCE,
        "image_finite": bool(torch.isfinite(two_image).all()),
        "llm_same_tokens": two["llm_tokens"] == one["llm_tokens"], "llm_tokens_1rank": one["llm_tokens"],
        "llm_tokens_2ranks": two["llm_tokens"], "passkey": two["passkey"], "passkey_answer_2ranks": two["passkey_answer"],
        "timings_2ranks": two.get("timings"), "comm_total_2ranks": two.get("image_comm"),
    }


def _comparison_problems(figures: dict) -> list[str]:
    problems = []
    if not figures["image_max_abs_diff"] <= IMAGE_TOLERANCE:
        problems.append(f"the 2-rank image differs from the 1-rank one by {figures['image_max_abs_diff']:.3g} "
                        "(max abs, [0, 1] pixels)")
    if not figures["image_finite"]:
        problems.append("the 2-rank image is not finite")
    if not figures["llm_same_tokens"]:
        problems.append("the 2-rank LLM generated other tokens than 1 rank")
    return problems


def _read_probe(base: Path, results: list[dict], limit: float) -> dict:
    """Merge the probe's per-rank records: an operation is native when every rank ran it and got the right answer."""
    ranks = []
    for rank, result in enumerate(results):
        path = Path(f"{base}.rank{rank}.json")
        record = json.loads(path.read_text()) if path.exists() else {"ops": {}}
        if not record.get("done"):
            record["broke"] = (f"rank {rank} stopped in {record.get('current', 'start-up')!r}: "
                               + ("timed out" if result["timed_out"] else f"exit {result['rc']}") + f"; {result['tail'][-600:]}")
        ranks.append(record)
    names = list(dict.fromkeys(name for record in ranks for name in record["ops"]))
    ops = {}
    for name in names:
        entries = [record["ops"].get(name) for record in ranks]
        ok = all(e is not None and e.get("ok") and e.get("correct") for e in entries)
        error = next((e.get("error") for e in entries if e is not None and e.get("error")), None)
        if not ok and error is None:
            error = "wrong result" if all(e is not None for e in entries) else "not reached on every rank"
        ops[name] = {"native": ok, "error": error, "paragen_op": next((e.get("paragen_op") for e in entries if e), None)}
    native = {}
    for op in PARAGEN_OPS:
        tried = [entry["native"] for entry in ops.values() if entry["paragen_op"] == op]
        native[op] = bool(tried) and all(tried)
    out = {"ops": ops, "paragen_ops_native": native, "unsupported": {n: e["error"] for n, e in ops.items() if not e["native"]}}
    broke = [record["broke"] for record in ranks if record.get("broke")]
    if broke:
        out["broke"] = broke
    return out


def print_table(report: dict) -> None:
    rows = [(name, entry["status"], f"{entry.get('duration_s', 0):.1f}",
             (str(entry.get("error") or entry.get("reason") or "")).splitlines()[0][:90] if (entry.get("error") or entry.get("reason")) else "")
            for name, entry in report["sections"].items()]
    print(f"\n{'section':<13} {'status':<8} {'s':>7}  note")
    for name, status, seconds, note in rows:
        print(f"{name:<13} {status:<8} {seconds:>7}  {note}")
    print(json.dumps(report["summary"], indent=1, default=str)[:6000])


def default_out(cpu: bool) -> Path:
    if cpu:
        return RESULTS / "gpu_check_cpu.json"
    try:
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # noqa: BLE001
        name = "unknown"
    match = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name.upper())
    return RESULTS / f"gpu_{(match.group(1) if match else 'cuda').lower()}.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run every section on the CPU with tiny sizes (GPU tests skip)")
    p.add_argument("--out", default=None, help="the JSON report (default: bench/results/gpu_<kind>.json, "
                                               "with --cpu bench/results/gpu_check_cpu.json)")
    p.add_argument("--budget", type=float, default=None, help="total seconds (default 480 on a GPU, 600 with --cpu)")
    p.add_argument("--install-wheels", default=None, metavar="DIR", help="install what this Python lacks from the wheels "
                   "in DIR (tools/gpu_wheels.sh) into a temporary folder first on the path")
    p.add_argument("--only", default=None, help=f"comma-separated sections to run ({', '.join(SECTION_ORDER)})")
    p.add_argument("--jobs", type=int, default=None, help="CLI runs at a time (default 4 on a GPU, 2 on the CPU)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per timing figure (at least 5)")
    p.add_argument("--revision", default=None, help="the source revision, where this tree has no .git")
    p.add_argument("--work", default=None, help="folder for outputs and logs (default: a new temporary folder)")
    p.add_argument("--python", default=None, help="the interpreter for the sections (default: this one)")
    args = p.parse_args(argv)
    args.budget = args.budget or (600.0 if args.cpu else 480.0)
    args.jobs = args.jobs or (2 if args.cpu else 4)
    args.reps = max(5, args.reps)
    args.only = set(args.only.split(",")) if args.only else None
    if args.only and args.only - set(SECTION_ORDER):
        p.error(f"unknown sections: {', '.join(sorted(args.only - set(SECTION_ORDER)))}")

    check = Check(args)
    if args.install_wheels:
        check.section("install", 10, check.install)
    else:
        check.report["sections"]["install"] = {"status": "skipped", "error": None, "duration_s": 0.0,
                                               "reason": "no --install-wheels given"}
    check.out = Path(args.out) if args.out else default_out(args.cpu)
    try:
        check.report["machine"] = check.machine()
    except Exception as error:  # noqa: BLE001
        check.report["machine"] = {"error": f"{type(error).__name__}: {error}"}
    if not args.cpu and check.report["machine"].get("device") in (None, "cpu"):
        check.report["error"] = "no CUDA device visible: run with --cpu for the CPU variant"
        check.write()
        print(check.report["error"], file=sys.stderr)
        return 2
    check.write()

    check.section("gpu_tests", 20, check.gpu_tests)
    check.section("cli", 30, check.cli)
    check.section("multirank", 30, check.multirank)
    check.section("ceilings", 10, lambda: check.timing("ceilings", 60, 120))
    check.section("timing_sdxl", 30, lambda: check.timing("sdxl", 150, 300))
    check.section("timing_flux", 30, lambda: check.timing("flux", 150, 300))
    check.section("timing_llm", 40, lambda: check.timing("llm", 200, 300))
    check.summarize()
    check.write()
    print_table(check.report)
    print(f"\nwrote {check.out} ({check.elapsed():.0f} s)")
    return 1 if any(entry["status"] == "failed" for entry in check.report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
