"""Predicted against measured or published: bench/results/cost_model_cpu.json and cost_model_published.json, one
panel each (the ±20 % and ±25 % bands of the goals shaded). Writes bench/results/cost_model.png."""
from __future__ import annotations

import json

import matplotlib.pyplot as plt

from plotting import RESULTS  # noqa: E402  (run as `python bench/plot_cost.py`)


def _panel(ax, pairs: list[tuple[float, float, str]], band: float, title: str, unit: str) -> None:
    values = [v for measured, predicted, _ in pairs for v in (measured, predicted)]
    low, high = min(values) * 0.7, max(values) * 1.4
    line = [low, high]
    ax.plot(line, line, color="black", linewidth=0.8)
    ax.fill_between(line, [v * (1 - band) for v in line], [v * (1 + band) for v in line], color="0.9")
    for measured, predicted, label in pairs:
        ax.scatter(measured, predicted, s=18)
        ax.annotate(label, (measured, predicted), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel(f"measured / published ({unit})")
    ax.set_ylabel(f"predicted ({unit})")
    ax.set_title(title, fontsize=9)


def main() -> None:
    cpu = json.loads((RESULTS / "cost_model_cpu.json").read_text())
    published = json.loads((RESULTS / "cost_model_published.json").read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.5))
    _panel(left, [(r["measured_s"], r["predicted_s"], f"{r['model'][5:]} {r['size']} {r['layout']}")
                  for r in cpu["held_out"]], 0.2, "held-out runs on the 2-core CPU (band: ±20 %)", "s per step")
    seconds = [r for r in published["checks"] if "speed-up" not in r["check"]]
    _panel(right, [(r["published"], r["predicted"], r["check"].replace(" (s)", "")[:48]) for r in seconds], 0.25,
           "published times, GPU profiles not fitted to them (band: ±25 %)", "s")
    fig.tight_layout()
    fig.savefig(RESULTS / "cost_model.png", dpi=130)
    print(RESULTS / "cost_model.png")


if __name__ == "__main__":
    main()
