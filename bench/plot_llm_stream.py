"""The figure of `bench/bench_llm_stream.py`: time to first token and inter-token latency of streamed completions
through `paragen serve llm`, per context, for 1 and 2 ranks, dense and speculative."""
from __future__ import annotations

import matplotlib.pyplot as plt

from plotting import load_report


def main() -> None:
    path, report = load_report("llm_stream_cpu.json")
    results, work = report["results"], report["workload"]
    contexts = [str(c) for c in work["contexts"]]
    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(names)
    for axis, (metric, scale, label) in zip(axes, (("ttft_s", 1, "time to first token, s"),
                                                   ("inter_token_s", 1000, "inter-token latency, ms"))):
        for i, name in enumerate(names):
            values = [scale * results[name][c][metric]["median"] for c in contexts]
            axis.bar([k + (i - (len(names) - 1) / 2) * width for k in range(len(contexts))], values, width,
                     label=name.replace("_", " rank(s), ", 1))
        axis.set_xticks(range(len(contexts)), [f"{int(c) // 1024}K context" for c in contexts])
        axis.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"paragen serve llm, {work['model']}, {work['tokens']} greedy tokens streamed "
                 f"(median of {work['reps']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
