"""Plot bench/results/shapes_cpu.json (or the report named, e.g. bench/results/shapes_dit_cpu.json) and print its
README tables.

Left: the trained model's accuracy over training (held-out captions). Middle: caption accuracy of each mode at
the training size (PSNR against the single-process picture written on the bar). Right: beyond the training
size, the duplicated-object rate and the caption accuracy of direct generation, windows without guidance and
hires with structure guidance (direct only for the DiT).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
from plotting import load_report, save_figure

TRAINING_SIZE = ("single", "sync_2r", "ring_2r", "ulysses_2r", "displaced_2r", "partial_2r", "sync_4r", "ring_4r",
                 "ulysses_4r", "displaced_4r", "partial_4r")
BEYOND = ("direct", "windows", "hires_sync", "hires_async")
LABELS = {"single": "1 process", "sync_2r": "sync, 2 ranks", "displaced_2r": "displaced, 2 ranks",
          "partial_2r": "partial, 2 ranks", "sync_4r": "sync, 4 ranks", "displaced_4r": "displaced, 4 ranks",
          "partial_4r": "partial, 4 ranks", **{f"{m}_{n}r": f"{m.capitalize()}, {n} ranks" for m in ("ring", "ulysses")
                                               for n in (2, 4)}, "direct": "direct (1 process)", "windows": "windows, no guidance (2 ranks)",
          "hires_sync": "hires sync (2 ranks)", "hires_async": "hires async (2 ranks)"}


def _psnr(config: dict) -> str:
    p = config.get("psnr_vs_single_db")
    if p is None:
        return "—"
    median = "identical" if p["median"] == float("inf") else f"{p['median']:.1f} dB"
    return f"{median} (min {p['min']:.1f})" if p["min"] != float("inf") else median


def tables(report: dict) -> str:
    """The two README tables: modes at the training size, and methods beyond it."""
    configs, n = report["configs"], report["workload"]["prompts"]
    rows = ["| mode | caption accuracy | object recall | colour in place | PSNR vs 1 process, median (min) | pictures identical |",
            "|---|---|---|---|---|---|"]
    for name in (m for m in TRAINING_SIZE if m in configs):
        c = configs[name]
        same = f"{c['psnr_vs_single_db']['identical']} of {n}" if "psnr_vs_single_db" in c else "—"
        rows.append(f"| {LABELS[name]} | {c['caption_accuracy']:.2f} | {c['object_recall']:.2f} | "
                    f"{c['colour_place_recall']:.2f} | {_psnr(c)} | {same} |")
    rows += ["", "| area | method | duplicated-object rate | caption accuracy | object recall | colour in place | "
             "extra objects per picture |", "|---|---|---|---|---|---|---|"]
    for area in ("2x", "4x"):
        for method in BEYOND:
            c = configs.get(f"{method}_{area}")
            if c:
                rows.append(f"| {area} ({c['size'][0]}×{c['size'][1]}) | {LABELS[method]} | {c['duplicated_rate']:.2f} | "
                            f"{c['caption_accuracy']:.2f} | {c['object_recall']:.2f} | {c['colour_place_recall']:.2f} | "
                            f"{c['extra_per_picture']:.2f} |")
    return "\n".join(rows)


def main() -> None:
    path, report = load_report("shapes_cpu.json")
    configs = report["configs"]
    fig, (ax_curve, ax_modes, ax_beyond) = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [2, 3, 3]})
    curve = report["training_curve"]
    steps = [line["step"] for line in curve]
    ax_curve.plot(steps, [line["caption_accuracy"] for line in curve], marker="o", label="caption accuracy")
    ax_curve.plot(steps, [line["object_recall"] for line in curve], marker="s", label="object recall")
    ax_curve.set_xlabel("denoiser training step")
    ax_curve.set_ylim(0, 1)
    ax_curve.set_title(f"{report['workload']['model']} over training (held-out captions)", fontsize=10)
    ax_curve.legend(fontsize=8)

    names = [m for m in TRAINING_SIZE if m in configs]
    bars = ax_modes.bar([LABELS[m].replace(", ", "\n") for m in names], [configs[m]["caption_accuracy"] for m in names],
                        color=["#999"] + ["#4c72b0"] * (len(names) - 1))
    for bar, name in zip(bars, names):
        ax_modes.annotate(_psnr(configs[name]).split(" (")[0], (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=7, xytext=(0, 3), textcoords="offset points")
    ax_modes.set_ylim(0, 1.05)
    ax_modes.set_ylabel("caption accuracy")
    ax_modes.set_title(f"at the training size, {report['workload']['prompts']} held-out captions "
                       "(label: PSNR vs 1 process)", fontsize=10)
    ax_modes.tick_params(axis="x", labelsize=8)

    width = 0.2
    for i, method in enumerate(BEYOND):
        areas = [a for a in ("2x", "4x") if f"{method}_{a}" in configs]
        xs = [("2x", "4x").index(a) + (i - 1.5) * width for a in areas]
        ax_beyond.bar(xs, [configs[f"{method}_{a}"]["duplicated_rate"] for a in areas], width, label=LABELS[method])
        ax_beyond.scatter(xs, [configs[f"{method}_{a}"]["caption_accuracy"] for a in areas], color="k", marker="_",
                          s=200, zorder=3, label="caption accuracy" if i == 0 else None)
    ax_beyond.set_xticks([0, 1], ["2x area", "4x area"])
    ax_beyond.set_ylim(0, 1.05)
    ax_beyond.set_ylabel("duplicated-object rate (bars); caption accuracy (ticks)")
    ax_beyond.set_title("beyond the training size", fontsize=10)
    ax_beyond.legend(fontsize=7)
    save_figure(fig, path)
    print(tables(report))


if __name__ == "__main__":
    main()
