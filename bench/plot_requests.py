"""The figure of `bench/bench_requests.py`: wall time of N requests, one launch each against one request file."""
from __future__ import annotations

import matplotlib.pyplot as plt

from plotting import load_report


def main() -> None:
    path, report = load_report("requests_cpu.json")
    summary, work = report["summary"], report["workload"]
    ways = {"one_launch_per_request_s": "one launch\nper request", "request_file_s": "one launch,\n--requests file"}
    walls = [summary[way]["wall_s"] for way in ways]
    medians = [w["median"] for w in walls]
    errors = [[m - w["p10"] for m, w in zip(medians, walls)], [w["p90"] - m for m, w in zip(medians, walls)]]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    bars = ax.bar(list(ways.values()), medians, yerr=errors, capsize=4, color=["#999999", "#3572b0"])
    for bar, way in zip(bars, ways):
        ax.annotate(f"{summary[way]['requests_per_min']['median']:.1f} req/min",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    xytext=(0, 6), textcoords="offset points")
    ax.set_ylabel("wall seconds (median, p10–p90)")
    ax.set_title(f"{work['requests']} {work['model']} requests, {work['size']}², {work['steps']} steps, "
                 f"{work['ranks']} ranks")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
