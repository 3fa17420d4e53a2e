"""Plot bench/results/image_cpu.json and print the README's results table from it."""
from __future__ import annotations

import matplotlib.pyplot as plt
from plotting import load_report, save_figure, step_time_bars, timing_cells
ORDER = ("stock_1x1", "stock_1x2", "sync_2x1", "displaced_2x1", "partial_2x1")
LABELS = {"stock_1x1": "stock\n1 proc x 1 thr", "stock_1x2": "stock\n1 proc x 2 thr", "sync_2x1": "sync\n2 ranks",
          "displaced_2x1": "displaced\n2 ranks", "partial_2x1": "partial\n2 ranks"}


def table(report: dict) -> str:
    """Markdown table of the 2-rank results."""
    rows = ["| configuration | step (median, p10–p90) | vs 1×1 thread | vs 1×2 threads | PSNR vs stock | comm recv / step / rank | comm hidden vs sync |",
            "|---|---|---|---|---|---|---|"]
    for name in ORDER:
        c = report["configs"][name]
        comm = c.get("comm_per_step_per_rank")
        hidden = c.get("comm_hidden_share_vs_sync")
        psnr = c["psnr_vs_stock_1x1_db"]
        exact = psnr == float("inf") or psnr > 100
        traffic = f"{comm['bytes_recv'] / 2**20:.2f} MiB" if comm else "—"
        hidden_text = f"{hidden:.0%}" if hidden is not None else "—"
        rows.append(f"{timing_cells(name, c, LABELS)} {'exact' if exact else f'{psnr:.1f} dB'} | {traffic} | {hidden_text} |")
    return "\n".join(rows)


def main() -> None:
    path, report = load_report("image_cpu.json")
    configs = report["configs"]
    fig, (ax_time, ax_bytes) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    step_time_bars(ax_time, configs, ORDER, LABELS, ["#999", "#777", "#4c72b0", "#55a868", "#c44e52"])
    w = report["workload"]
    ax_time.set_title(f"{w['model']} {w['size']}² on {report['machine']['cores']} CPU cores (gloo); x = speedup vs 1 thread")
    modes = ("displaced_4x1", "partial_4x1")
    attn = [configs[m]["comm_per_step_per_rank"]["unet.attn_kv.bytes_recv"] / 2**20 for m in modes]
    total = [configs[m]["comm_per_step_per_rank"]["bytes_recv"] / 2**20 for m in modes]
    x = range(len(modes))
    ax_bytes.bar([i - 0.2 for i in x], attn, width=0.4, label="attention inputs")
    ax_bytes.bar([i + 0.2 for i in x], total, width=0.4, label="all UNet traffic")
    ax_bytes.set_xticks(list(x), ["displaced", "partial"])
    ax_bytes.set_ylabel("MiB received per step per rank")
    ax_bytes.set_title("traffic at 4 ranks")
    ax_bytes.legend()
    save_figure(fig, path)
    print(table(report))


if __name__ == "__main__":
    main()
