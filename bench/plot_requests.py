"""The figures of `bench/bench_requests.py`: wall time of N requests one launch each, in one request file and through
`paragen serve` (its start-up included), and the server's request latency at 1 and 4 concurrent clients
(`requests_cpu.png`); the server's throughput and latency at 1, 4 and 8 clients with batching off and on
(`requests_batching_cpu.png`)."""
from __future__ import annotations

import matplotlib.pyplot as plt

from plotting import load_report


def batching() -> None:
    """Requests per minute and latency (p50, p95) against concurrent clients, batching off and on."""
    path, report = load_report("requests_batching_cpu.json")
    summary, work = report["summary"], report["workload"]
    clients = work["clients"]
    fig, (rate, latency) = plt.subplots(1, 2, figsize=(10, 4))
    for setting, colour in (("off", "#999999"), ("on", "#3572b0")):
        label = "--max-batch 8" if setting == "on" else "one at a time"
        ways = [summary[f"{setting}_{c}"] for c in clients]
        rate.errorbar(clients, [w["requests_per_min"]["median"] for w in ways],
                      yerr=[[w["requests_per_min"]["median"] - w["requests_per_min"]["p10"] for w in ways],
                            [w["requests_per_min"]["p90"] - w["requests_per_min"]["median"] for w in ways]],
                      marker="o", color=colour, label=label, capsize=3)
        for quantile, style in (("p50", "-"), ("p95", "--")):
            latency.plot(clients, [w["latency_s"][quantile] for w in ways], style, marker="o", color=colour,
                         label=f"{label}, {quantile}")
    for axis in (rate, latency):
        axis.set_xticks(clients)
        axis.set_xlabel("concurrent clients")
        axis.legend(fontsize=8)
    rate.set_ylabel("requests per minute (median, p10–p90)")
    latency.set_ylabel("seconds, request sent → response read")
    rate.set_title(f"paragen serve: {work['model']} {work['size']}², {work['steps']} steps, {work['ranks']} ranks",
                   fontsize=10)
    latency.set_title("latency", fontsize=10)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print(f"wrote {path.with_suffix('.png')}")


def main() -> None:
    batching()
    path, report = load_report("requests_cpu.json")
    summary, work, clients = report["summary"], report["workload"], report["clients"]
    start = summary["server_start_s"]["wall_s"]["median"]
    labels = ["one launch\nper request", "one launch,\n--requests file",
              *(f"serve: start +\n{c} client{'s' * (c > 1)}" for c in clients)]
    medians = [summary["one_launch_per_request_s"]["wall_s"]["median"], summary["request_file_s"]["wall_s"]["median"],
               *(start + summary[f"server_{c}_clients"]["wall_s"]["median"] for c in clients)]
    rates = [summary["one_launch_per_request_s"]["requests_per_min"]["median"],
             summary["request_file_s"]["requests_per_min"]["median"],
             *(summary[f"server_{c}_clients"]["requests_per_min"]["median"] for c in clients)]
    fig, (walls, latency) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    bars = walls.bar(labels, medians, color=["#999999", "#3572b0", "#4a9c5d", "#2d6b3c"])
    for bar, rate, label in zip(bars, rates, labels):
        note = f"{rate:.0f} req/min" + (" once up" if label.startswith("serve") else "")
        walls.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                       xytext=(0, 4), textcoords="offset points", fontsize=8)
    walls.set_ylabel("wall seconds (median over rounds)")
    walls.set_title(f"{work['requests']} {work['model']} requests, {work['size']}², {work['steps']} steps, "
                    f"{work['ranks']} ranks", fontsize=10)
    walls.tick_params(axis="x", labelsize=8)
    for offset, quantile in ((-0.2, "p50"), (0.2, "p95")):
        values = [summary[f"server_{c}_clients"]["latency_s"][quantile] for c in clients]
        latency.bar([i + offset for i in range(len(clients))], values, width=0.4, label=quantile)
    latency.set_xticks(range(len(clients)), [f"{c} client{'s' * (c > 1)}" for c in clients])
    latency.set_ylabel("seconds, request sent → response read")
    latency.set_title("paragen serve: latency", fontsize=10)
    latency.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
