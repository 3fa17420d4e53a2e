"""What the plot scripts share: loading the report, the step-time bar chart, the timing cells of the
README tables, and writing the figure next to the report."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

RESULTS = Path(__file__).resolve().parent / "results"


def load_report(default_name: str) -> tuple[Path, dict]:
    """The report named on the command line, or `bench/results/<default_name>`."""
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / default_name
    return path, json.loads(path.read_text())


def timing_cells(name: str, config: dict, labels: dict[str, str]) -> str:
    """`| label | median (p10–p90) | vs 1×1 | vs 1×2 |` of one configuration."""
    s = config["step_s_steady"]
    return (f"| {labels[name].replace(chr(10), ' ')} | {s['median']:.3f} s ({s['p10']:.3f}–{s['p90']:.3f}) | "
            f"{config['speedup_vs_1x1']:.2f}x | {config['speedup_vs_1x2']:.2f}x |")


def step_time_bars(ax, configs: dict, order: tuple[str, ...], labels: dict[str, str], colours: list[str]) -> None:
    """Median step time per configuration with p10–p90 whiskers, annotated with the speedup vs 1 thread."""
    medians = [configs[n]["step_s_steady"]["median"] for n in order]
    errors = [[m - configs[n]["step_s_steady"]["p10"] for n, m in zip(order, medians)],
              [configs[n]["step_s_steady"]["p90"] - m for n, m in zip(order, medians)]]
    bars = ax.bar([labels[n] for n in order], medians, yerr=errors, capsize=4, color=colours)
    for bar, name in zip(bars, order):
        ax.annotate(f"{configs[name]['speedup_vs_1x1']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", xytext=(0, 6), textcoords="offset points")
    ax.set_ylabel("seconds per denoising step (median, p10–p90)")


def save_figure(fig, report_path: Path) -> Path:
    """Lay out `fig` and write it as PNG next to the report (same name); returns the path."""
    fig.tight_layout()
    out = report_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}\n")
    return out
