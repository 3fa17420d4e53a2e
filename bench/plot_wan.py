"""Plot bench/results/wan_cpu.json and print the README's results table from it."""
from __future__ import annotations

import matplotlib.pyplot as plt
from plotting import load_report, save_figure, step_time_bars, timing_cells

ORDER = ("stock_1x1", "stock_1x2", "diffusers_ulysses_2x1", "ulysses_2x1", "ring_2x1", "cfg_2x1", "clip_full_2x1",
         "clip_dual_2x1", "clip_dual_blocking_2x1", "clip_ring_dual_4x1")
LABELS = {"stock_1x1": "stock\n1 proc x 1 thr", "stock_1x2": "stock\n1 proc x 2 thr",
          "diffusers_ulysses_2x1": "diffusers CP\nUlysses, 2 ranks", "ulysses_2x1": "paragen\nUlysses, 2 ranks",
          "ring_2x1": "paragen\nRing, 2 ranks", "cfg_2x1": "paragen\nCFG, 2 ranks",
          "clip_full_2x1": "paragen clips\nfull, 2 ranks", "clip_dual_2x1": "paragen clips\ndual, 2 ranks",
          "clip_dual_blocking_2x1": "paragen clips\ndual blocking", "clip_ring_dual_4x1": "clips x Ring\ndual, 4 ranks*"}
COLOURS = ["#999", "#777", "#dd8452", "#4c72b0", "#8172b3", "#55a868", "#64b5cd", "#c44e52", "#e8a0a0", "#bbb"]


def table(report: dict) -> str:
    """Markdown table of the results."""
    rows = ["| configuration | step (median, p10–p90) | vs 1×1 thread | vs 1×2 threads | frames/s | max abs diff vs stock | "
            "sent / step / rank | blocked / step / rank | peak RSS / rank |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ORDER:
        c = report["configs"][name]
        comm = c.get("comm_per_step_per_rank")
        sent, blocked = (f"{comm['bytes_sent'] / 2**20:.2f} MiB", f"{comm['wait_s'] * 1000:.0f} ms") if comm else ("—", "—")
        rows.append(f"{timing_cells(name, c, LABELS)} {c['frames_per_s']:.2f} | {c['max_abs_diff_vs_stock_1x1']:.1e} | "
                    f"{sent} | {blocked} | {max(c['peak_rss_mib_by_rank']):.0f} MiB |")
    return "\n".join(rows)


def main() -> None:
    path, report = load_report("wan_cpu.json")
    fig, ax = plt.subplots(figsize=(15, 4.5))
    step_time_bars(ax, report["configs"], ORDER, LABELS, COLOURS)
    w = report["workload"]
    ax.set_title(f"tiny-wan, {w['frames']} frames of {w['size']}² ({w['video_tokens']} video tokens), guidance "
                 f"{w['guidance_scale']:g}, on {report['machine']['cores']} CPU cores (gloo); x = speedup vs 1 thread")
    save_figure(fig, path)
    print(table(report))


if __name__ == "__main__":
    main()
