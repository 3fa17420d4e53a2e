"""Plot bench/results/dit_families_cpu.json and print the README's results table from it."""
from __future__ import annotations

import matplotlib.pyplot as plt
from plotting import load_report, save_figure

ORDER = ("stock_1x1", "stock_1x2", "ulysses_2x1", "ring_2x1", "diffusers_ulysses_2x1")
LABELS = {"stock_1x1": "stock, 1 thread", "stock_1x2": "stock, 2 threads", "ulysses_2x1": "paragen Ulysses, 2 ranks",
          "ring_2x1": "paragen Ring, 2 ranks", "diffusers_ulysses_2x1": "diffusers CP Ulysses, 2 ranks"}
COLOURS = ["#999", "#777", "#4c72b0", "#8172b3", "#dd8452"]


def table(report: dict) -> str:
    """Markdown table: one row per family, the median step of each configuration and its speedup."""
    rows = ["| family (tokens) | " + " | ".join(LABELS[n] for n in ORDER) + " |", "|---" * (len(ORDER) + 1) + "|"]
    for model, family in report["families"].items():
        cells = []
        for name in ORDER:
            c = family["configs"].get(name)
            if c is not None:
                cells.append(f"{c['step_s_steady']['median']:.3f} s (×{c['speedup_vs_1x1']:.2f}; "
                             f"{c['max_abs_diff_vs_stock_1x1']:.0e})")
            else:
                cells.append("fails: " + family["failed"][name][:90] if name in family["failed"] else "no plan")
        rows.append(f"| `{model}` ({family['tokens']}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    path, report = load_report("dit_families_cpu.json")
    models = list(report["families"])
    fig, ax = plt.subplots(figsize=(13, 4.5))
    width = 0.8 / len(ORDER)
    for i, (name, colour) in enumerate(zip(ORDER, COLOURS)):
        speedups = [report["families"][m]["configs"].get(name, {}).get("speedup_vs_1x1", 0) for m in models]
        ax.bar([x + i * width for x in range(len(models))], speedups, width, color=colour, label=LABELS[name])
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(models))], models)
    ax.set_ylabel("step speedup vs 1 process × 1 thread")
    ax.set_title(f"DiT families on {report['machine']['cores']} CPU cores (gloo), median step; 0 = did not run")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    print(table(report))


if __name__ == "__main__":
    main()
