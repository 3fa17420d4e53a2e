"""Plot bench/results/dit_cpu.json and print the README's results table from it."""
from __future__ import annotations

import matplotlib.pyplot as plt
from plotting import load_report, save_figure, step_time_bars, timing_cells
ORDER = ("stock_1x1", "stock_1x2", "diffusers_ulysses_2x1", "ulysses_2x1", "ring_2x1", "displaced_2x1")
LABELS = {"stock_1x1": "stock\n1 proc x 1 thr", "stock_1x2": "stock\n1 proc x 2 thr",
          "diffusers_ulysses_2x1": "diffusers CP\nUlysses, 2 ranks", "ulysses_2x1": "paragen\nUlysses, 2 ranks",
          "ring_2x1": "paragen\nRing, 2 ranks", "displaced_2x1": "paragen\ndisplaced, 2 ranks"}
COLOURS = ["#999", "#777", "#dd8452", "#4c72b0", "#8172b3", "#55a868"]


def table(report: dict) -> str:
    """Markdown table of the results."""
    rows = ["| configuration | step (median, p10–p90) | vs 1×1 thread | vs 1×2 threads | max abs diff vs diffusers CP | PSNR vs stock | sent / step / rank | blocked / step / rank |",
            "|---|---|---|---|---|---|---|---|"]
    for name in ORDER:
        c = report["configs"][name]
        comm = c.get("comm_per_step_per_rank")
        if comm:
            sent, blocked = f"{comm['bytes_sent'] / 2**20:.1f} MiB", f"{comm['wait_s'] * 1000:.0f} ms"
        elif "formula_bytes_sent_per_step_per_rank" in c:
            sent, blocked = f"{c['formula_bytes_sent_per_step_per_rank'] / 2**20:.1f} MiB (formula)", "—"
        else:
            sent, blocked = "—", "—"
        psnr = c["psnr_vs_stock_1x1_db"]
        rows.append(f"{timing_cells(name, c, LABELS)} {c['max_abs_diff_vs_diffusers_ulysses']:.1e} | "
                    f"{'exact' if psnr > 100 else f'{psnr:.1f} dB'} | {sent} | {blocked} |")
    return "\n".join(rows)


def main() -> None:
    path, report = load_report("dit_cpu.json")
    configs = report["configs"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    step_time_bars(ax, configs, ORDER, LABELS, COLOURS)
    w = report["workload"]
    ax.set_title(f"{w['model']} {w['size']}² ({w['image_tokens']} image + {w['text_tokens']} text tokens) on "
                 f"{report['machine']['cores']} CPU cores (gloo); x = speedup vs 1 thread")
    save_figure(fig, path)
    print(table(report))


if __name__ == "__main__":
    main()
