"""Plot bench/results/llm_cpu.json and print a results table from it.

Left: decode tokens per second against the context (log x), per configuration (median, p10–p90 whiskers).
Right: device-resident KV cache in MiB against the context (log–log), summed over ranks; dotted: the
offload configurations' host-memory values. A configuration skipped at a context has no point there.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.ticker import ScalarFormatter
from bench_llm import summary_lines
from plotting import load_report, save_figure

ORDER = ("dynamic_1x1", "dense_2r", "offload_1x1", "offload_2r", "spec_1x1", "spec_2r", "spec_draft_2r")
LABELS = {"dynamic_1x1": "DynamicCache, 1 proc", "dense_2r": "paragen dense, 2 ranks",
          "offload_1x1": "paragen offload, 1 proc", "offload_2r": "paragen offload, 2 ranks",
          "spec_1x1": "speculative, 1 proc", "spec_2r": "speculative, 2 ranks",
          "spec_draft_2r": "speculative + draft, 2 ranks"}
COLOURS = {"dynamic_1x1": "#999", "dense_2r": "#4c72b0", "offload_1x1": "#55a868", "offload_2r": "#8172b3",
           "spec_1x1": "#dd8452", "spec_2r": "#c44e52", "spec_draft_2r": "#937860"}
MARKERS = {"dynamic_1x1": "o", "dense_2r": "s", "offload_1x1": "^", "offload_2r": "D", "spec_1x1": "v",
           "spec_2r": "P", "spec_draft_2r": "X"}


def _points(config: dict) -> list[tuple[int, dict]]:
    """(context, row) of every context the configuration ran at, in order."""
    return sorted((int(c), row) for c, row in config["contexts"].items() if "skipped" not in row)


def _context_axis(ax, configs: dict) -> None:
    """Log-2 x axis ticked at the contexts that ran, labelled in K tokens."""
    contexts = sorted({c for config in configs.values() for c, _ in _points(config)})
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [f"{c / 1024:g}K" for c in contexts])
    ax.minorticks_off()
    ax.set_xlabel("context (tokens: prompt + generated)")


def _plain_log_y(ax) -> None:
    """Log y axis with plain numbers."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)


def table(report: dict) -> str:
    """Markdown table: every configuration at every context."""
    rows = ["| context | configuration | prefill (median) | decode tok/s (median, p10–p90) | vs DynamicCache | "
            "device KV | host KV | fetched / token | acceptance | passkey | peak RSS / rank |", "|---" * 11 + "|"]
    configs = report["configs"]
    for context in report["workload"]["contexts"]:
        for name in (n for n in ORDER if n in configs and str(context) in configs[n]["contexts"]):
            c = configs[name]["contexts"][str(context)]
            if "skipped" in c:
                rows.append(f"| {context} | {LABELS[name]} | skipped: {c['skipped']} | | | | | | | | |")
                continue
            t = c["decode_tokens_per_s"]
            ratio = report["summary"].get(str(context), {}).get(name, {}).get("tokens_per_s_ratio")
            memory = " / ".join(f"{r['peak_rss_mib']:.0f}" for r in c["per_rank"])
            accepted = c["speculative"]["acceptance_rate"] if "speculative" in c else None
            rows.append(f"| {context} | {LABELS[name]} | {c['prefill_s']['median']:.2f} s | {t['median']:.1f} "
                        f"({t['p10']:.1f}–{t['p90']:.1f}) | {'' if ratio is None else f'{ratio:.2f}x'} | "
                        f"{c['device_bytes'] / 2**20:.2f} MiB | {c['host_bytes'] / 2**20:.2f} MiB | "
                        f"{c['fetched_bytes_per_token'] / 2**10:.1f} KiB | "
                        f"{'—' if accepted is None else f'{accepted:.2f}'} | {round(c['accuracy'] * c['requests'])}/"
                        f"{c['requests']} | {memory} MiB |")
    return "\n".join(rows)


def speed_lines(ax, configs: dict) -> None:
    """Decode tokens/s against the context, p10–p90 whiskers."""
    for name in (n for n in ORDER if n in configs):
        points = _points(configs[name])
        if not points:
            continue
        x = [c for c, _ in points]
        medians = [row["decode_tokens_per_s"]["median"] for _, row in points]
        errors = [[m - row["decode_tokens_per_s"]["p10"] for m, (_, row) in zip(medians, points)],
                  [row["decode_tokens_per_s"]["p90"] - m for m, (_, row) in zip(medians, points)]]
        ax.errorbar(x, medians, yerr=errors, capsize=3, marker=MARKERS[name], color=COLOURS[name], label=LABELS[name])
    _context_axis(ax, configs)
    _plain_log_y(ax)
    ax.set_ylabel("decode tokens per second (median, p10–p90)")
    ax.legend(fontsize=8)


def kv_lines(ax, configs: dict) -> None:
    """Device KV MiB (summed over ranks) against the context; the offload stores' host bytes dotted."""
    for name in (n for n in ORDER if n in configs):
        points = _points(configs[name])
        if not points:
            continue
        x = [c for c, _ in points]
        ax.plot(x, [row["device_bytes"] / 2**20 for _, row in points], marker=MARKERS[name], color=COLOURS[name],
                label=f"{LABELS[name]}: device")
        if any(row["host_bytes"] for _, row in points):
            ax.plot(x, [row["host_bytes"] / 2**20 for _, row in points], ":", marker=MARKERS[name], color=COLOURS[name],
                    fillstyle="none", label=f"{LABELS[name]}: host")
    _context_axis(ax, configs)
    _plain_log_y(ax)
    ax.set_ylabel("KV cache MiB (summed over ranks)")
    ax.set_title("device-resident KV cache (host: offloaded values)", fontsize=10)
    ax.legend(fontsize=7)


def main() -> None:
    path, report = load_report("llm_cpu.json")
    configs = report["configs"]
    fig, (ax_speed, ax_kv) = plt.subplots(1, 2, figsize=(13, 5))
    speed_lines(ax_speed, configs)
    w = report["workload"]
    ax_speed.set_title(f"{w['model']}: greedy decode of {w['new_tokens']} tokens on {report['machine']['cores']} CPU "
                       f"cores (1 thread per rank)", fontsize=10)
    kv_lines(ax_kv, configs)
    save_figure(fig, path)
    print(table(report))
    longest = report["longest_context"]
    print(f"\nlongest context: {longest['longest']} tokens, bound by {longest['bound_by']}")
    print("\n".join(summary_lines(report)))


if __name__ == "__main__":
    main()
