"""Plot bench/results/image_cpu.json and print the README's results tables from it."""
from __future__ import annotations

import matplotlib.pyplot as plt
from plotting import load_report, save_figure, step_time_bars, timing_cells

ORDER = ("stock_1x1", "stock_1x2", "sync_2x1", "distrifusion_sync_2x1", "displaced_2x1", "distrifusion_2x1",
         "partial_2x1")
LABELS = {"stock_1x1": "stock\n1 proc x 1 thr", "stock_1x2": "stock\n1 proc x 2 thr",
          "sync_2x1": "paragen sync\n2 ranks", "distrifusion_sync_2x1": "DistriFusion\nfull sync, 2 ranks",
          "displaced_2x1": "paragen displaced\n2 ranks", "distrifusion_2x1": "DistriFusion\ndefault, 2 ranks",
          "partial_2x1": "paragen partial\n2 ranks"}
COLOURS = ["#999", "#777", "#4c72b0", "#8da0cb", "#55a868", "#a6d854", "#c44e52"]


def _psnr_cell(config: dict) -> str:
    db = config["psnr_vs_stock_1x1_db"]
    return "identical" if db is None else f"{db:.2f} dB"


def latent_table(configs: dict) -> str:
    """Markdown table of one latent size."""
    rows = ["| configuration | step (median, p10–p90) | vs 1×1 thread | vs 1×2 threads | PSNR vs 1×1 | "
            "recv / step / rank | blocked / step / rank | comm hidden vs its sync |",
            "|---|---|---|---|---|---|---|---|"]
    for name in (n for n in ORDER if n in configs):
        c = configs[name]
        comm = c.get("comm_per_step_per_rank")
        hidden = c.get("comm_hidden_share_vs_sync")
        traffic = f"{comm['bytes_recv'] / 2**20:.2f} MiB" if comm else "—"
        blocked = f"{comm['wait_s'] * 1e3:.0f} ms" if comm else "—"
        rows.append(f"{timing_cells(name, c, LABELS)} {_psnr_cell(c)} | {traffic} | {blocked} | "
                    f"{f'{hidden:.0%}' if hidden is not None else '—'} |")
    return "\n".join(rows)


def bucket_table(configs: dict) -> str:
    """Markdown table of displaced mode's step time by stale-gather bucket size."""
    buckets = sorted((int(n[len("displaced_bucket"):-len("_2x1")]), n) for n in configs if n.startswith("displaced_bucket"))
    buckets = sorted([*buckets, (4, "displaced_2x1")])
    rows = ["| bucket | step (median, p10–p90) | blocked / step / rank |", "|---|---|---|"]
    for mib, name in buckets:
        s, comm = configs[name]["step_s_steady"], configs[name]["comm_per_step_per_rank"]
        rows.append(f"| {mib} MiB{' (default)' if mib == 4 else ''} | {s['median']:.3f} s ({s['p10']:.3f}–{s['p90']:.3f}) "
                    f"| {comm['wait_s'] * 1e3:.0f} ms |")
    return "\n".join(rows)


def call_table(configs: dict) -> str:
    """Markdown table of the whole-call part (seconds per request)."""
    rows = ["| configuration | request (median, p10–p90) | vs 1×1 thread | vs 1×2 threads | PSNR vs 1×1 (image) |",
            "|---|---|---|---|---|"]
    for name in (n for n in ORDER if n in configs):
        c, r = configs[name], configs[name]["request_s"]
        rows.append(f"| {LABELS[name].replace(chr(10), ' ')} | {r['median']:.2f} s ({r['p10']:.2f}–{r['p90']:.2f}) | "
                    f"{c['request_speedup_vs_1x1']:.2f}x | {c['request_speedup_vs_1x2']:.2f}x | {_psnr_cell(c)} |")
    return "\n".join(rows)


def main() -> None:
    path, report = load_report("image_cpu.json")
    parts, w = report["parts"], report["workload"]
    latents = [f"latent_{size}" for size in w["sizes"]]
    fig, axes = plt.subplots(1, len(latents) + 1, figsize=(8 * len(latents) + 4, 5),
                             gridspec_kw={"width_ratios": [3] * len(latents) + [1.3]})
    for ax, part in zip(axes, latents):
        configs = parts[part]
        order = tuple(n for n in ORDER if n in configs)
        step_time_bars(ax, configs, order, LABELS, [COLOURS[ORDER.index(n)] for n in order])
        ax.tick_params(axis="x", labelsize=7)
        size = int(part.split("_")[1])
        ax.set_title(f"latent {size // 8}² ({size}² px), {w['steps']} steps; x = speedup vs 1 thread")
    traffic = report["traffic_4_ranks"]
    names = list(traffic)
    axes[-1].bar([n.replace("_4x1", "") for n in names], [traffic[n]["bytes_recv"] / 2**20 for n in names])
    axes[-1].set_ylabel("MiB received per stale step per rank")
    axes[-1].set_title("traffic at 4 ranks")
    axes[-1].tick_params(axis="x", labelsize=8)
    save_figure(fig, path)
    for part in latents:
        print(f"{part}:\n{latent_table(parts[part])}\n")
    print(f"stale-gather bucket size, displaced, {latents[-1]}:\n{bucket_table(parts[latents[-1]])}\n")
    print(f"whole call at {w['call_size']}²:\n{call_table(parts['whole_call'])}\n")
    print("traffic at 4 ranks: " + ", ".join(f"{n} {t['bytes_recv'] / 2**20:.2f} MiB" for n, t in traffic.items()))


if __name__ == "__main__":
    main()
