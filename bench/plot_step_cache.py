"""The figure and README table of `bench/bench_step_cache.py`: for each model and mode, the denoiser evaluations
saved and the denoising loop's speed-up of each step cache against the same mode uncached, and what the pictures
lost (caption accuracy points; Wan: PSNR against its uncached video).

    .venv/bin/python bench/plot_step_cache.py → bench/results/step_cache_cpu.png, and the table on stdout
"""
from __future__ import annotations

import matplotlib.pyplot as plt

import json

from plotting import RESULTS

MODELS = ("tiny-shapes", "tiny-shapes-dit", "tiny-wan")
METHODS = ("fbcache", "teacache", "taylorseer")
COLOURS = {"fbcache": "#3572b0", "teacache": "#4a9c5d", "taylorseer": "#c7792b"}


def _quality(c: dict) -> str:
    if "accuracy_change_pts" in c:
        return f"{100 * c['caption_accuracy']:.1f}% ({c['accuracy_change_pts']:+.1f})"
    if "psnr_vs_uncached_db" in c:
        return f"{c['psnr_vs_uncached_db']['median']:.1f} dB"
    return "—"


def table(reports: dict[str, dict]) -> None:
    print("| model | mode | cache | evaluations saved | loop speed-up | request speed-up | caption accuracy (Δ pts) "
          "/ PSNR vs uncached |")
    print("|---|---|---|---|---|---|---|")
    for model, report in reports.items():
        for name, c in report["configs"].items():
            mode, cache = name.split("/")
            if cache == "none":
                print(f"| {model} | {mode} | none | 1.00x | 1.00x ({c['loop_seconds']['median']:.3f} s) | 1.00x "
                      f"({c['seconds']['median']:.3f} s) | {_quality(c)} |")
                continue
            print(f"| {model} | {mode} | {cache} | {c['evaluations_saved']:.2f}x | "
                  f"{c['loop_speedup_vs_uncached']:.2f}x | {c['speedup_vs_uncached']:.2f}x | {_quality(c)} |")


def figure(reports: dict[str, dict]) -> None:
    fig, axes = plt.subplots(2, len(reports), figsize=(5 * len(reports), 7), squeeze=False)
    for column, (model, report) in enumerate(reports.items()):
        configs = report["configs"]
        modes = list(dict.fromkeys(c["mode"] for c in configs.values()))
        width = 0.8 / len(METHODS)
        for index, method in enumerate(METHODS):
            xs, saved, speed = [], [], []
            for position, mode in enumerate(modes):
                c = configs.get(f"{mode}/{method}")
                if c is not None:
                    xs.append(position + (index - len(METHODS) / 2 + 0.5) * width)
                    saved.append(c["evaluations_saved"])
                    speed.append(c["loop_speedup_vs_uncached"])
            axes[0][column].bar(xs, saved, width, color=COLOURS[method], label=method)
            axes[1][column].bar(xs, speed, width, color=COLOURS[method], label=method)
        for row, (ylabel, goal) in enumerate((("denoiser evaluations saved (x)", 1.6), ("denoising loop speed-up (x)",
                                                                                       1.4))):
            axis = axes[row][column]
            axis.axhline(goal, color="black", linestyle="--", linewidth=0.8)
            axis.set_xticks(range(len(modes)), modes, fontsize=8)
            axis.set_ylabel(ylabel)
        axes[0][column].set_title(f"{model}, 20 steps, vs the same mode uncached", fontsize=10)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = RESULTS / "step_cache_cpu.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    reports = {model: json.loads((RESULTS / f"step_cache_{model}_cpu.json").read_text()) for model in MODELS}
    figure(reports)
    table(reports)


if __name__ == "__main__":
    main()
