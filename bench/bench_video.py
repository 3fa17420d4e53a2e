"""Benchmark of clip-parallel video generation on this machine: one video's frames split over ranks.

Configurations (one rank is one core here, as on a cluster one rank is one GPU); every one runs
paragen's clip parallelism with clip = the world size, so the 1-process baselines run the same algorithm:
  1x1               1 process x 1 thread (clip=1: the one clip is the whole video), dual scope
  1x2               the same on 2 threads (the best a user gets on this machine without ranks)
  dual_2r           2 ranks x 1 thread, dual scope (local window + global frames), exchanges overlapped
  dual_blocking_2r  the same with overlap=False (exchange, wait, then attend): must give the same frames
  full_2r           2 ranks x 1 thread, full scope (every frame sees every frame; exact)

Default request: tiny-t2v (random weights), 64 frames of 128x128 px (a 16x16 latent), 8 steps, CFG
(a UNet batch of 2), temporal options local 8, global 16. At 64 frames each of the 2 clips (32 frames)
is four times the local reach p = 8 and holds 8 of the 16 global frames, so the halo a clip fetches is a
quarter of its own frames, as in a long video rather than a clip made mostly of halo; 128 px keeps a
1-thread step near 6.3 s (2.5 s per step on 2 ranks) and the VAE decode of the whole video near 6 s,
so a round of the five configurations takes about 4–5 minutes on 2 cores and the default 2 rounds
about 9–10 (3 rounds about 14).

The 1-process baselines run dual scope at clip=1: the local window is then a band-masked attention over
all F frames, computed as a dense F×F score matrix (`masked_attention_with_lse`), so its cost grows with
the square of the clip length; each of 2 clips pays a quarter of it (plus the halo and global parts).
The speedup of dual_2r over 1x1 can therefore exceed 2 (full scope at clip=1, on the flash kernel, is
faster than dual scope at clip=1 on this model).

Each configuration runs in fresh processes, in rounds (the order repeats, so slow drifts of the machine
hit all alike), after a warm-up request. Step times are the intervals between the pipeline's step
callbacks on rank 0; they are pooled over rounds from the second step on (the first also carries the
prompt encoding and the latents' preparation). The request time is the whole call: text encoding,
steps, the VAE decode of every clip and the gather of the frames on rank 0; frames/s = frames /
request seconds.

Bytes per step and rank, per label (b = 4 bytes per fp32 element; P ranks; rank r holds F_r frames and
g_r of the G global frames and has n_r ∈ {0, 1, 2} neighbours; B = 2, the CFG batch; N = B × the latent
pixels at the block's resolution, the sequences of the attention input `[N, frames, channels]`; D = the
K/V width, `to_k.out_features`; C, hw = channels and latent pixels of a layer's input). Sent and
received are equal except where noted; it is what `paragen/comms/group.py` counts and puts on the wire:

  clip.halo_kv    per temporal attention call (dual): n_r × 2 (K and V) × p × N × D × b
                  (`exchange_neighbours_async`: the first/last p = local frames to each neighbour)
  clip.global_kv  per call (dual): sent (P−1) × 2 × g_r × N × D × b; received Σ_{i≠r} 2 × g_i × N × D × b
                  (`share_async`: P2P to every other rank; a clip holding no global frame sends nothing)
  clip.full_kv    per call (full): sent (P−1) × 2 × F_r × N × D × b; received Σ_{i≠r} 2 × F_i × N × D × b
  clip.conv_halo  per temporal conv stack: n_r × B × C × 4 × hw × b (4 edge frames: the four (3,1,1)
                  convs' stacked reach, fetched once per stack)
  clip.norm_stats per `ClipGroupNorm` statistics call: (P−1) × B × groups × 2 × 4 (an all-gather of fp32
                  (mean, M2) per sample and group; 1 call per temporal transformer, 4 per conv stack)
  clip.eps        per step: (P−1) × B × C × max_i F_i × hw × b (the UNet output's all-gather, padded to
                  the longest clip)
  clip.frames     per request (not per step): rank r > 0 sends 3 × F_r × H × W × 4 (its decoded fp32
                  frames of H×W px); rank 0 receives the others'

The driver evaluates the formula on the shapes the worker's probes recorded during the timed request
and compares it to `CommStats`, step by step and rank by rank.

Share of communication hidden by overlap: hidden = 1 − W_overlap / W_blocking, W = seconds per step
blocked in `clip.halo_kv` + `clip.global_kv`, summed over ranks and averaged over the steps (from the
second on) and rounds, of dual_2r and dual_blocking_2r of the same invocation (with --only: recomputed when both
rerun, kept when neither does). On CPU with gloo a blocking wait also absorbs
the time the neighbour is still computing its K/V (skew between the ranks), so this is the share of
*exposed* attention-exchange time that overlap removes, not of transfer time alone.

    python bench/bench_video.py [--frames 64] [--size 128] [--steps 8] [--rounds 2] [--only dual_2r,full_2r]
        → bench/results/video_cpu.json (with --only, merged into the existing report)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import ROOT, median_ratio, psnr, report_header, rerun_plan, run_worker, spread

WORKER = ROOT / "bench" / "video_worker.py"
CONFIGS = {  # name -> (worker args, ranks, threads per rank)
    "1x1": (["--scope", "dual"], 1, 1),
    "1x2": (["--scope", "dual"], 1, 2),
    "dual_2r": (["--scope", "dual"], 2, 1),
    "dual_blocking_2r": (["--scope", "dual", "--blocking"], 2, 1),
    "full_2r": (["--scope", "full"], 2, 1),
}
PER_STEP_LABELS = ("clip.halo_kv", "clip.global_kv", "clip.full_kv", "clip.conv_halo", "clip.norm_stats", "clip.eps")
ATTENTION_LABELS = ("clip.halo_kv", "clip.global_kv", "clip.full_kv")  # dual runs have the first two only
FRAME_PAIRS = (  # (a, b): what comparing their frames shows
    ("dual_2r", "dual_blocking_2r"),  # overlap only reorders waits: must be bit-identical
    ("dual_2r", "1x1"),  # the same algorithm on 2 ranks vs 1 (only summation order differs)
    ("1x2", "1x1"),  # threads only
    ("dual_2r", "full_2r"),  # information: dual scope vs every frame seeing every frame
)
TARGETS = {"dual_2r_over_1x1": 1.85, "dual_2r_over_1x2": 1.05}
FIRST_STEADY_STEP = 1


# ---- the formula --------------------------------------------------------------------------------
def formula_step(result: dict, rank: int, shapes: dict) -> dict[str, dict[str, int]]:
    """Bytes {label: {sent, recv}} one rank should move in one step, from the shapes its probes saw."""
    layout, local = result["layout"], result["local"]
    sizes, held = layout["sizes"], layout["global_in"]
    ranks = len(sizes)
    neighbours = (rank > 0) + (rank < ranks - 1)
    out: dict[str, dict[str, int]] = {}

    def add(label: str, sent: int, recv: int) -> None:
        row = out.setdefault(label, {"sent": 0, "recv": 0})
        row["sent"] += sent
        row["recv"] += recv

    for call in shapes["attention"]:
        kv_frame = 2 * call["pixels"] * call["kv_width"] * call["itemsize"]  # K and V of one frame
        if result["scope"] == "dual":
            add("clip.halo_kv", neighbours * local * kv_frame, neighbours * local * kv_frame)
            add("clip.global_kv", (ranks - 1) * held[rank] * kv_frame, (sum(held) - held[rank]) * kv_frame)
        else:
            add("clip.full_kv", (ranks - 1) * sizes[rank] * kv_frame, (sum(sizes) - sizes[rank]) * kv_frame)
    for call in shapes["conv"]:
        edge = neighbours * call["batch"] * call["channels"] * call["halo"] * call["pixels"] * call["itemsize"]
        add("clip.conv_halo", edge, edge)
    for call in shapes["norm"]:
        stats = (ranks - 1) * call["batch"] * call["groups"] * 2 * 4
        add("clip.norm_stats", stats, stats)
    for call in shapes["unet"]:
        eps = (ranks - 1) * call["batch"] * call["channels"] * max(sizes) * call["pixels"] * call["itemsize"]
        add("clip.eps", eps, eps)
    return out


def formula_frames(result: dict, rank: int) -> dict[str, int]:
    """Bytes of the decoded frames' gather on rank 0 (per request)."""
    sizes, side = result["layout"]["sizes"], result["size"]
    frame = 3 * side * side * 4
    if rank == 0:
        return {"sent": 0, "recv": sum(sizes[1:]) * frame}
    return {"sent": sizes[rank] * frame, "recv": 0}


def bytes_check(result: dict) -> list[dict]:
    """Per rank and label: measured and formula bytes per step (mean over steps), and whether every step matched."""
    report = []
    for r, rank in enumerate(result["ranks"]):
        rows: dict[str, dict] = {}
        for measured, shapes in zip(rank["comm_per_step"], rank["shapes_per_step"]):
            expected = formula_step(result, r, shapes)
            for label in PER_STEP_LABELS:
                got = measured.get(label, {"bytes_sent": 0, "bytes_recv": 0})
                want = expected.get(label, {"sent": 0, "recv": 0})
                if label not in measured and label not in expected:
                    continue
                row = rows.setdefault(label, {"measured_sent": [], "formula_sent": [], "measured_recv": [],
                                              "formula_recv": []})
                row["measured_sent"].append(got["bytes_sent"])
                row["measured_recv"].append(got["bytes_recv"])
                row["formula_sent"].append(want["sent"])
                row["formula_recv"].append(want["recv"])
        labels = {}
        for label, row in rows.items():
            labels[label] = {k: statistics.fmean(v) for k, v in row.items()}
            labels[label]["match"] = (row["measured_sent"], row["measured_recv"]) == (row["formula_sent"], row["formula_recv"])
        frames = rank["request_comm"].get("clip.frames", {"bytes_sent": 0, "bytes_recv": 0})
        want = formula_frames(result, r)
        labels["clip.frames (per request)"] = {
            "measured_sent": frames["bytes_sent"], "formula_sent": want["sent"], "measured_recv": frames["bytes_recv"],
            "formula_recv": want["recv"],
            "match": (frames["bytes_sent"], frames["bytes_recv"]) == (want["sent"], want["recv"])}
        report.append({"rank": r, "frames": [rank["start"], rank["stop"]], "labels": labels})
    return report


# ---- timings and waits --------------------------------------------------------------------------
def _steady(result: dict) -> range:
    return range(min(FIRST_STEADY_STEP, len(result["step_s"]) - 1), len(result["step_s"]))


def _attention_wait(result: dict) -> float:
    """Seconds per step blocked in the attention exchanges, summed over ranks, averaged over the steady steps."""
    steps = _steady(result)
    total = sum(rank["comm_per_step"][i].get(label, {"wait_s": 0.0})["wait_s"] for rank in result["ranks"]
                for i in steps for label in ATTENTION_LABELS)
    return total / len(steps)


def _per_rank(results: list[dict]) -> list[dict]:
    """Per rank, over rounds and steady steps: step, UNet and compute time, waits per label; peak memory."""
    out = []
    for r in range(len(results[0]["ranks"])):
        rows = []
        for res in results:
            rank = res["ranks"][r]
            for i in _steady(res):
                waits = {k: v["wait_s"] for k, v in rank["comm_per_step"][i].items() if k.startswith("clip.")}
                rows.append({"step_s": rank["step_s"][i], "unet_s": rank["unet_s"][i], "waits": waits})
        labels = sorted({k for row in rows for k in row["waits"]})
        wait = {k: statistics.fmean(row["waits"].get(k, 0.0) for row in rows) for k in labels}
        step = statistics.fmean(row["step_s"] for row in rows)
        out.append({
            "rank": r, "frames": [results[0]["ranks"][r]["start"], results[0]["ranks"][r]["stop"]],
            "peak_rss_mib": max(res["ranks"][r]["peak_rss_mib"] for res in results),
            "step_s": step, "unet_s": statistics.fmean(row["unet_s"] for row in rows),
            "wait_s": wait, "compute_s": step - sum(wait.values()),
        })
    return out


def _summarise(results: list[dict], ranks: int, threads: int) -> dict:
    """One configuration's report: step, request and frames/s spreads, per-rank times, bytes vs formula."""
    first = results[0]
    checks = bytes_check(first)
    return {
        "ranks": ranks, "threads_per_rank": threads, "scope": first["scope"], "overlap": first["overlap"],
        "layout": first["layout"], "probes_installed": first["ranks"][0]["probes_installed"],
        "step_s_steady": spread([r["step_s"][i] for r in results for i in _steady(r)]),
        "step_s_all": spread([s for r in results for s in r["step_s"]]),
        "request_s": spread([r["request_s"] for r in results]),
        "frames_per_s": spread([r["frames_per_s"] for r in results]),
        "attention_wait_s_per_step": statistics.fmean(_attention_wait(r) for r in results),
        "per_rank": _per_rank(results),
        "bytes_per_step": checks,
        "bytes_formula_matches": all(row["match"] for rank in checks for row in rank["labels"].values()),
    }


def _speedups(summary: dict) -> dict:
    """dual_2r against the 1-process runs and the other 2-rank runs, by step and by whole request."""
    out = {}
    for other in ("1x1", "1x2", "dual_blocking_2r", "full_2r"):
        out[f"dual_2r_over_{other}"] = {"step": median_ratio(summary, other, "dual_2r", "step_s_steady"),
                                        "request": median_ratio(summary, other, "dual_2r", "request_s")}
    return out


def _targets(speedups: dict) -> dict:
    """The targets, judged by the step median and by the whole request."""
    return {f"{key}_ge_{bar}": {k: None if v is None else v >= bar for k, v in speedups[key].items()}
            for key, bar in TARGETS.items()}


def _hidden(runs: dict, previous: dict) -> dict | None:
    """Share of the attention exchanges' blocked time that overlap removes (both runs of this invocation)."""
    if "dual_2r" in runs and "dual_blocking_2r" in runs:
        overlapped = statistics.fmean(_attention_wait(r) for r in runs["dual_2r"])
        blocking = statistics.fmean(_attention_wait(r) for r in runs["dual_blocking_2r"])
        return {"overlapped_wait_s_per_step": overlapped, "blocking_wait_s_per_step": blocking,
                "hidden": 1 - overlapped / blocking if blocking else None, "labels": list(ATTENTION_LABELS)}
    if "dual_2r" not in runs and "dual_blocking_2r" not in runs:
        return previous.get("overlap_hidden")
    return None  # one of the two was rerun alone: no pair from one invocation


def _compare_frames(runs: dict, previous: dict) -> dict:
    """Max abs difference and PSNR of the frames of each pair (first round); earlier pairs kept if neither reran."""
    kept = {k: v for k, v in previous.get("frames_compared", {}).items()
            if not any(k.startswith(f"{n}_vs_") or k.endswith(f"_vs_{n}") for n in runs)}
    for a, b in FRAME_PAIRS:
        if a in runs and b in runs:
            x, y = runs[a][0]["image"], runs[b][0]["image"]
            same = x.shape == y.shape
            db = psnr(x, y) if same else None
            kept[f"{a}_vs_{b}"] = {"max_abs_diff": (x - y).abs().max().item() if same else None,
                                   "psnr_db": None if db == float("inf") else db}  # None: identical (strict JSON)
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-t2v")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--size", type=int, default=128, help="frame side in px")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--local", type=int, default=8, help="local window half width p, in frames")
    p.add_argument("--global-frames", type=int, default=16)
    p.add_argument("--warmup-request-steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "video_cpu.json"))
    args = p.parse_args()
    names, previous = rerun_plan(p, args, CONFIGS, list(CONFIGS),
                                 ("model", "frames", "size", "steps", "local", "global_frames"))
    common = ["--model", args.model, "--frames", str(args.frames), "--size", str(args.size), "--steps", str(args.steps),
              "--local-window", str(args.local), "--global-frames", str(args.global_frames),
              "--warmup-request-steps", str(args.warmup_request_steps)]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr)
            for name in names:
                extra, ranks, threads = CONFIGS[name]
                out = Path(tmp) / f"{name}_{round_index}.json"
                result = run_worker(WORKER, name, [*common, *extra], ranks, threads, out)
                if round_index:
                    result.pop("image")  # the frames are compared from the first round only
                runs[name].append(result)

    summary = {n: c for n, c in previous.get("configs", {}).items() if n not in runs}
    summary.update({n: _summarise(r, *CONFIGS[n][1:]) for n, r in runs.items()})
    summary = {n: summary[n] for n in CONFIGS if n in summary}
    for name, c in summary.items():
        c["speedup_vs_1x1"] = median_ratio(summary, "1x1", name, "step_s_steady")
        c["speedup_vs_1x2"] = median_ratio(summary, "1x2", name, "step_s_steady")
    speedups = _speedups(summary)
    frames = _compare_frames(runs, previous)
    pair = frames.get("dual_2r_vs_dual_blocking_2r")
    report = {
        **report_header("video: clip parallelism, one video's frames over ranks"),
        "workload": {"model": args.model, "frames": args.frames, "size": args.size, "steps": args.steps,
                     "local": args.local, "global_frames": args.global_frames,
                     "warmup_request_steps": args.warmup_request_steps, "rounds": args.rounds,
                     "cfg": "batch of 2 on every rank", "baselines": "1x1 and 1x2: clip=1 (dual scope) in one process",
                     "step_times": f"steps >= {FIRST_STEADY_STEP} (rank 0's step callback)"},
        "rerun": names if previous else None,
        "threading_gain_1x2_over_1x1": median_ratio(summary, "1x1", "1x2", "step_s_steady"),
        "speedups": speedups,
        "targets": _targets(speedups),
        "overlap_hidden": _hidden(runs, previous),
        "overlap_identical_frames": None if pair is None else pair["max_abs_diff"] == 0,
        "frames_compared": frames,
        "bytes_formula_matches": {n: c["bytes_formula_matches"] for n, c in summary.items()},
        "configs": summary,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("configs", "machine")}, indent=2))
    for name, c in summary.items():
        ranks = " ".join(f"r{r['rank']}:{r['frames'][0]}-{r['frames'][1]}/{r['peak_rss_mib']:.0f}MiB" for r in c["per_rank"])
        print(f"{name:17s} step {c['step_s_steady']['median']:.3f} s  request {c['request_s']['median']:.1f} s  "
              f"{c['frames_per_s']['median']:.2f} frames/s  x{c['speedup_vs_1x1'] or 0:.2f} vs 1x1  "
              f"x{c['speedup_vs_1x2'] or 0:.2f} vs 1x2  bytes = formula: {c['bytes_formula_matches']}  {ranks}")


if __name__ == "__main__":
    main()
