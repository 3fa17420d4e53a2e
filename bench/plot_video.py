"""Plot bench/results/video_cpu.json and print results tables from it.

Left: median step time per configuration (p10–p90 whiskers; x = speedup vs 1 process x 1 thread).
Middle: frames per second of the whole request (p10–p90). Right: bytes each rank sends per step, by
label, measured by `CommStats` (solid) against the formula of bench_video.py (hatched), for the 2-rank
runs (mean over their ranks; log scale).
"""
from __future__ import annotations

import statistics

import matplotlib.pyplot as plt
from plotting import load_report, save_figure, step_time_bars, timing_cells

ORDER = ("1x1", "1x2", "dual_blocking_2r", "dual_2r", "full_2r")
LABELS = {"1x1": "clip=1\n1 proc x 1 thr", "1x2": "clip=1\n1 proc x 2 thr",
          "dual_blocking_2r": "dual, blocking\n2 ranks", "dual_2r": "dual, overlap\n2 ranks", "full_2r": "full\n2 ranks"}
COLOURS = {"1x1": "#999", "1x2": "#777", "dual_blocking_2r": "#4c72b0", "dual_2r": "#55a868", "full_2r": "#8172b3"}
BYTES_CONFIGS = ("dual_2r", "full_2r")
BYTE_LABELS = ("clip.halo_kv", "clip.global_kv", "clip.full_kv", "clip.conv_halo", "clip.norm_stats", "clip.eps")


def _sent(config: dict, label: str, kind: str) -> float | None:
    """Mean over ranks of `kind` ("measured" or "formula") bytes sent per step under `label`; None if absent."""
    rows = [rank["labels"][label] for rank in config["bytes_per_step"] if label in rank["labels"]]
    return statistics.fmean(row[f"{kind}_sent"] for row in rows) if rows else None


def table(report: dict) -> str:
    """Markdown table of every configuration that ran."""
    rows = ["| configuration | step (median, p10–p90) | vs 1×1 | vs 1×2 | request | frames/s | "
            "attention waits / step (Σ ranks) | peak RSS / rank |", "|---|---|---|---|---|---|---|---|"]
    for name in (n for n in ORDER if n in report["configs"]):
        c = report["configs"][name]
        memory = " / ".join(f"{r['peak_rss_mib']:.0f}" for r in c["per_rank"])
        rows.append(f"{timing_cells(name, c, LABELS)} {c['request_s']['median']:.1f} s | "
                    f"{c['frames_per_s']['median']:.2f} | {c['attention_wait_s_per_step'] * 1000:.0f} ms | {memory} MiB |")
    return "\n".join(rows)


def bytes_table(report: dict) -> str:
    """Markdown table of bytes per step and rank, measured vs formula, for every multi-rank configuration."""
    rows = ["| configuration | rank | label | sent measured | sent formula | received measured | received formula | "
            "match |", "|---|---|---|---|---|---|---|---|"]
    for name in (n for n in ORDER if n in report["configs"] and report["configs"][n]["ranks"] > 1):
        for rank in report["configs"][name]["bytes_per_step"]:
            for label, row in rank["labels"].items():
                cells = " | ".join(f"{row[k] / 2**20:.3f} MiB"
                                   for k in ("measured_sent", "formula_sent", "measured_recv", "formula_recv"))
                rows.append(f"| {name} | {rank['rank']} | {label} | {cells} | {'yes' if row['match'] else 'NO'} |")
    return "\n".join(rows)


def frames_per_s_bars(ax, configs: dict, order: tuple[str, ...]) -> None:
    """Frames per second of the whole request, p10–p90 whiskers."""
    medians = [configs[n]["frames_per_s"]["median"] for n in order]
    errors = [[m - configs[n]["frames_per_s"]["p10"] for n, m in zip(order, medians)],
              [configs[n]["frames_per_s"]["p90"] - m for n, m in zip(order, medians)]]
    bars = ax.bar([LABELS[n] for n in order], medians, yerr=errors, capsize=4, color=[COLOURS[n] for n in order])
    for bar, value in zip(bars, medians):
        ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    xytext=(0, 6), textcoords="offset points")
    ax.set_ylabel("frames per second (whole request, median)")
    ax.set_title("throughput incl. text encoding and VAE decode", fontsize=10)


def bytes_bars(ax, configs: dict) -> None:
    """Measured (solid) and formula (hatched) bytes sent per step and rank, per label, log scale."""
    names = [n for n in BYTES_CONFIGS if n in configs]
    labels = [label for label in BYTE_LABELS if any(_sent(configs[n], label, "measured") is not None for n in names)]
    width = 0.8 / max(1, 2 * len(names))
    for j, name in enumerate(names):
        for k, kind in enumerate(("measured", "formula")):
            offset = (2 * j + k - len(names) + 0.5) * width
            values = [_sent(configs[name], label, kind) or 0 for label in labels]
            ax.bar([i + offset for i in range(len(labels))], [v / 2**20 for v in values], width, color=COLOURS[name],
                   hatch="//" if kind == "formula" else None, edgecolor="white" if kind == "formula" else None,
                   label=f"{name} {kind}")
    ax.set_xticks(range(len(labels)), [label.removeprefix("clip.") for label in labels], fontsize=8, rotation=30)
    ax.set_yscale("log")
    ax.set_ylabel("MiB sent per step and rank (mean over ranks)")
    ax.set_title("bytes per step: measured vs formula", fontsize=10)
    ax.legend(fontsize=7)


def main() -> None:
    path, report = load_report("video_cpu.json")
    configs = report["configs"]
    order = tuple(n for n in ORDER if n in configs and configs[n].get("speedup_vs_1x1") is not None)
    fig, (ax_time, ax_fps, ax_bytes) = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [3, 3, 2]})
    step_time_bars(ax_time, configs, order, LABELS, [COLOURS[n] for n in order])
    w = report["workload"]
    ax_time.set_title(f"{w['model']}: {w['frames']} frames of {w['size']}², {w['steps']} steps on "
                      f"{report['machine']['cores']} CPU cores (gloo); x = speedup vs 1 thread", fontsize=10)
    frames_per_s_bars(ax_fps, configs, tuple(n for n in ORDER if n in configs))
    for ax in (ax_time, ax_fps):
        ax.tick_params(axis="x", labelsize=8)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.1)  # room for the annotations above the bars
    bytes_bars(ax_bytes, configs)
    save_figure(fig, path)
    print(table(report))
    print()
    print(bytes_table(report))
    hidden = report.get("overlap_hidden")
    if hidden and hidden.get("hidden") is not None:
        blocking, overlapped = (hidden[k] * 1000 for k in ("blocking_wait_s_per_step", "overlapped_wait_s_per_step"))
        print(f"\noverlap hides {100 * hidden['hidden']:.0f}% of the attention exchanges' blocked time "
              f"({blocking:.0f} → {overlapped:.0f} ms per step, summed over ranks)")
    for pair, diff in report["frames_compared"].items():
        db = "identical" if diff["max_abs_diff"] == 0 else f"{diff['psnr_db']:.1f} dB"
        print(f"{pair}: max abs diff {diff['max_abs_diff']:.2e}, PSNR {db}")
    print("targets: " + ", ".join(f"{k} {v}" for k, v in report["targets"].items()))


if __name__ == "__main__":
    main()
