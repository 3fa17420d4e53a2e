"""Plot bench/results/hires_cpu.json and print a results table from it.

Left: median HR step time per configuration (p10–p90 whiskers; x = speedup vs the guided run on
1 process x 1 thread). Right: the per-rank timeline of an HR step at 2 ranks, compute stacked with
the time waited for the guidance broadcast and in the windows' all-reduce (who waits for whom).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
from plotting import load_report, save_figure, step_time_bars, timing_cells

ORDER = ("direct", "guided_1t", "guided_2t", "sync_2r", "async_2r", "async_dedicated_2r", "sync_4r", "async_4r")
LABELS = {"direct": "direct\n1 proc x 1 thr", "guided_1t": "guided\n1 proc x 1 thr", "guided_2t": "guided\n1 proc x 2 thr",
          "sync_2r": "sync\n2 ranks", "async_2r": "async\n2 ranks", "async_dedicated_2r": "async, LR rank\n2 ranks",
          "sync_4r": "sync 4 ranks\n(oversub.)", "async_4r": "async 4 ranks\n(oversub.)"}
COLOURS = {"direct": "#bbb", "guided_1t": "#999", "guided_2t": "#777", "sync_2r": "#4c72b0", "async_2r": "#55a868",
           "async_dedicated_2r": "#8172b3", "sync_4r": "#a1b7dc", "async_4r": "#a6d3b0"}
TIMELINE = ("sync_2r", "async_2r", "async_dedicated_2r")
PARTS = (("compute", "#777"), ("hires.guidance", "#dd8452"), ("hires.eps", "#c44e52"))


def table(report: dict) -> str:
    """Markdown table of every configuration that ran."""
    rows = ["| configuration | HR step (median, p10–p90) | vs guided 1×1 | vs guided 1×2 | request | units / rank | peak RSS / rank |",
            "|---|---|---|---|---|---|---|"]
    for name in (n for n in ORDER if n in report["configs"]):
        c = report["configs"][name]
        units = " / ".join(str(r["load"]) for r in c["per_rank"]) if c["per_rank"][0]["load"] else "—"
        memory = " / ".join(f"{r['peak_rss_mib']:.0f}" for r in c["per_rank"])
        rows.append(f"{timing_cells(name, c, LABELS)} {c['request_s']['median']:.1f} s | {units} | {memory} MiB |")
    return "\n".join(rows)


def timeline_bars(ax, configs: dict) -> None:
    """Per rank of the 2-rank runs: mean compute and waits per HR step, stacked."""
    names, bottoms, x = [], [], 0
    for name in (n for n in TIMELINE if n in configs):
        for r in configs[name]["per_rank"]:
            parts = {"compute": r["compute_s"], **r["wait_s"]}
            bottom = 0.0
            for part, colour in PARTS:
                ax.bar(x, parts.get(part, 0.0), bottom=bottom, color=colour, label=part if x == 0 else None)
                bottom += parts.get(part, 0.0)
            names.append(f"{LABELS[name].split(chr(10))[0]}\nrank {r['rank']}: {r['load']}u{' +LR' if r['lr'] else ''}")
            bottoms.append(bottom)
            x += 1
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("seconds per HR step (mean)")
    ax.set_title("per-rank timeline at 2 ranks (u = units of work)")
    ax.legend(fontsize=8)


def main() -> None:
    path, report = load_report("hires_cpu.json")
    configs = report["configs"]
    order = tuple(n for n in ORDER if n in configs and configs[n].get("speedup_vs_1x1") is not None)
    fig, (ax_time, ax_ranks) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [3, 2]})
    step_time_bars(ax_time, configs, order, LABELS, [COLOURS[n] for n in order])
    ax_time.tick_params(axis="x", labelsize=8)
    w = report["workload"]
    ax_time.set_title(f"{w['model']} {w['size']}², {w['steps']} steps on {report['machine']['cores']} CPU cores (gloo); "
                      "x = speedup vs guided 1 thread", fontsize=10)
    timeline_bars(ax_ranks, configs)
    save_figure(fig, path)
    print(table(report))
    print("\nPSNR: " + ", ".join(f"{k} {v:.1f} dB" for k, v in report["psnr_db"].items()))
    print("targets: " + ", ".join(f"{k} {v}" for k, v in report["targets"].items()))
    print("\n".join(report["who_waits"]))


if __name__ == "__main__":
    main()
