"""Plot bench/results/image_cpu.json and print the README's results table from it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ("stock_1x1", "stock_1x2", "sync_2x1", "displaced_2x1", "partial_2x1")
LABELS = {"stock_1x1": "stock\n1 proc x 1 thr", "stock_1x2": "stock\n1 proc x 2 thr", "sync_2x1": "sync\n2 ranks",
          "displaced_2x1": "displaced\n2 ranks", "partial_2x1": "partial\n2 ranks"}


def table(report: dict) -> str:
    """Markdown table of the 2-rank results."""
    rows = ["| configuration | step (median, p10–p90) | vs 1×1 thread | vs 1×2 threads | PSNR vs stock | comm recv / step / rank | comm hidden vs sync |",
            "|---|---|---|---|---|---|---|"]
    for name in ORDER:
        c = report["configs"][name]
        s = c["step_s_steady"]
        comm = c.get("comm_per_step_per_rank")
        hidden = c.get("comm_hidden_share_vs_sync")
        psnr = c["psnr_vs_stock_1x1_db"]
        exact = psnr == float("inf") or psnr > 100
        traffic = f"{comm['bytes_recv'] / 2**20:.2f} MiB" if comm else "—"
        hidden_text = f"{hidden:.0%}" if hidden is not None else "—"
        rows.append(
            f"| {LABELS[name].replace(chr(10), ' ')} | {s['median']:.3f} s ({s['p10']:.3f}–{s['p90']:.3f}) | "
            f"{c['speedup_vs_1x1']:.2f}x | {c['speedup_vs_1x2']:.2f}x | "
            f"{'exact' if exact else f'{psnr:.1f} dB'} | {traffic} | {hidden_text} |"
        )
    return "\n".join(rows)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "image_cpu.json"
    report = json.loads(path.read_text())
    configs = report["configs"]
    fig, (ax_time, ax_bytes) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    medians = [configs[n]["step_s_steady"]["median"] for n in ORDER]
    errors = [[m - configs[n]["step_s_steady"]["p10"] for n, m in zip(ORDER, medians)],
              [configs[n]["step_s_steady"]["p90"] - m for n, m in zip(ORDER, medians)]]
    bars = ax_time.bar([LABELS[n] for n in ORDER], medians, yerr=errors, capsize=4,
                       color=["#999", "#777", "#4c72b0", "#55a868", "#c44e52"])
    for bar, name in zip(bars, ORDER):
        ax_time.annotate(f"{configs[name]['speedup_vs_1x1']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                         ha="center", va="bottom", xytext=(0, 6), textcoords="offset points")
    w = report["workload"]
    ax_time.set_ylabel("seconds per denoising step (median, p10–p90)")
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
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}\n")
    print(table(report))


if __name__ == "__main__":
    main()
