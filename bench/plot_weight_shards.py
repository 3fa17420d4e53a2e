"""Plot bench/results/weight_shards_cpu.json and print the README's results table from it."""
from __future__ import annotations

import matplotlib.pyplot as plt
from plotting import load_report, save_figure

ORDER = ("whole_1", "whole_2", "sharded_2", "whole_4", "sharded_4")
LABELS = {"whole_1": "1 rank", "whole_2": "2 ranks\nwhole", "sharded_2": "2 ranks\nsharded",
          "whole_4": "4 ranks\nwhole", "sharded_4": "4 ranks\nsharded"}
GB = 1e9


def table(report: dict) -> str:
    """Markdown table of the results."""
    rows = ["| layout | transformer weights a rank | peak resident memory a rank | load a rank | step (median, p10–p90) |",
            "|---|---|---|---|---|"]
    for name in ORDER:
        c = report["configs"].get(name)
        if c is None:
            continue
        step, peak, load = c["step_s_steady"], c["peak_rss_bytes_per_rank"], c["load_s"]
        share = f" ({c['transformer_bytes_vs_1_rank']:.2f}×)" if "transformer_bytes_vs_1_rank" in c else ""
        rows.append(f"| {LABELS[name].replace(chr(10), ', ')} | {c['transformer_bytes_per_rank'] / GB:.2f} GB{share} | "
                    f"{peak['median'] / GB:.2f} GB | {load['median']:.1f} s | "
                    f"{step['median']:.1f} s ({step['p10']:.1f}–{step['p90']:.1f}) |")
    return "\n".join(rows)


def main() -> None:
    path, report = load_report("weight_shards_cpu.json")
    configs = report["configs"]
    order = [n for n in ORDER if n in configs]
    labels = [LABELS[n] for n in order]
    fig, (memory, steps) = plt.subplots(1, 2, figsize=(12, 4.5))
    memory.bar(labels, [configs[n]["peak_rss_bytes_per_rank"]["median"] / GB for n in order], color="#bbb",
               label="peak resident memory (process)")
    memory.bar(labels, [configs[n]["transformer_bytes_per_rank"] / GB for n in order], color="#4c72b0",
               label="transformer weights held")
    memory.set_ylabel("GB per rank")
    memory.legend()
    medians = [configs[n]["step_s_steady"]["median"] for n in order]
    steps.bar(labels, medians, color=["#4c72b0" if "sharded" in n else "#999" for n in order])
    steps.set_ylabel("seconds per denoising step (median)")
    parameters = report["workload"]["transformer_parameters"] / 1e9
    tokens = report["workload"].get("tokens", 512)
    fig.suptitle(f"{parameters:.2f}B-parameter Wan-shaped transformer, fp32, {tokens} tokens, "
                 f"{report['machine']['cores']} CPU cores (gloo, 1 thread a rank): --shard-weights")
    save_figure(fig, path)
    print(table(report))


if __name__ == "__main__":
    main()
