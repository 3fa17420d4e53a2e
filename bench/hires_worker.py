"""One configuration of the hires benchmark (run by bench_hires.py, alone or under torchrun).

`direct`: the stock pipeline asked for the large size at once. `hires`: paragen's hires mode (windows
of the training size over the ranks, low-resolution guidance `async` or `sync`), also at world size 1.
After a warm-up request, every denoising step is stamped by diffusers' step-end callback (hires chains
its own callback after it) together with `CommStats`. Every rank reports its step times, its waits and
bytes per label per step, its units of work per step and its peak resident memory; rank 0 writes them
with the image tensor.
"""
from __future__ import annotations

import argparse
import resource

import torch
from common import StepRecorder, open_pipeline, square_image_request, timed_request, write_result

import paragen
from paragen.comms import all_gather_objects, world_size
from paragen.parallel.hires import GUIDANCE_MODES, PLACEMENTS

def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rank_report(pipe, recorder: StepRecorder, hires: bool) -> dict:
    """What this rank saw during the timed request."""
    report = {"step_s": recorder.step_s, "comm_per_step": recorder.comm_per_step, "peak_rss_mib": peak_rss_mib()}
    if hires:
        runtime = pipe.paragen
        rank = runtime.comm.rank
        report.update(unet_s=runtime.step_seconds, load=runtime.layout.assignment.load(rank),
                      windows=len(runtime.layout.assignment.windows[rank]), lr=rank == runtime.layout.assignment.lr_rank)
    return report


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=("direct", "hires"), required=True)
    p.add_argument("--guidance", choices=GUIDANCE_MODES, default="async")
    p.add_argument("--placement", choices=PLACEMENTS, default="interleaved")
    p.add_argument("--window", type=int, default=None, help="hires window in latent pixels (default: the UNet's)")
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup-request-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    pipe = open_pipeline(args.model, args.threads)
    hires = args.variant == "hires"
    if hires:
        config = paragen.HiresConfig(guidance=args.guidance, window=args.window, placement=args.placement)
        paragen.parallelize(pipe, paragen.ParallelConfig(), config)
    recorder = StepRecorder(pipe.paragen.stats if hires else None)

    request = square_image_request(pipe, recorder, args.size)
    image, total = timed_request(request, args.warmup_request_steps, args.steps)
    mine = rank_report(pipe, recorder, hires)
    ranks = all_gather_objects(pipe.paragen.mesh.group("world"), mine) if hires else [mine]
    if paragen.is_output_rank():
        result = {
            "variant": args.variant, "guidance": args.guidance if hires else None,
            "placement": args.placement if hires else None, "world_size": world_size(),
            "threads_per_rank": torch.get_num_threads(), "model": args.model, "size": args.size,
            "steps": args.steps, "request_s": total, "step_s": recorder.step_s,
            "seed_step": pipe.paragen.seed_step if hires else 0,
            "trace": pipe.paragen.trace if hires else [],
            "windows": len(pipe.paragen.layout.windows) if hires else 0,
            "lr_size": list(pipe.paragen.layout.lr_size) if hires else None,
            "ranks": ranks,
        }
        write_result(args.out, result, image)
    paragen.shutdown()


if __name__ == "__main__":
    main()
