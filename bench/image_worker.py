"""One benchmark configuration of the image workload (run by bench_image.py, alone or under torchrun).

Times every denoising step with diffusers' step-end callback (the same clock for the stock pipeline
and for paragen), after a warm-up request, and records per-step communication from `CommStats`.
Rank 0 writes a JSON result and the image tensor.
"""
from __future__ import annotations

import argparse

import torch
from common import StepRecorder, open_pipeline, square_image_request, timed_request, write_result

import paragen
from paragen.comms import all_gather_objects

def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup-request-steps", type=int, default=3)
    p.add_argument("--mode", default="sync")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stock", action="store_true", help="the stock diffusers pipeline, no paragen")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    pipe = open_pipeline(args.model, args.threads)
    if not args.stock:
        paragen.parallelize(pipe, paragen.ParallelConfig(mode=args.mode, warmup_steps=args.warmup_steps))
    stats = None if args.stock else pipe.paragen.stats
    recorder = StepRecorder(stats)

    request = square_image_request(pipe, recorder, args.size)
    image, total = timed_request(request, args.warmup_request_steps, args.steps)
    step_s, per_step_comm = recorder.step_s, recorder.comm_per_step
    world = pipe.paragen.mesh.comm("world") if stats is not None else None
    comm_by_rank = all_gather_objects(world, per_step_comm) if world is not None else [per_step_comm]
    if paragen.is_output_rank():
        result = {
            "stock": args.stock, "mode": None if args.stock else args.mode, "warmup_steps": args.warmup_steps,
            "world_size": paragen.comms.world_size(), "threads_per_rank": torch.get_num_threads(),
            "model": args.model, "size": args.size, "steps": args.steps, "request_s": total,
            "step_s": step_s, "comm_per_step_by_rank": comm_by_rank,
        }
        write_result(args.out, result, image)
    paragen.shutdown()


if __name__ == "__main__":
    main()
