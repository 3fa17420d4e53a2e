"""One benchmark configuration of the Wan workload (run by bench_wan.py, alone or under torchrun).

Variants: `stock` (the plain diffusers WanPipeline), `diffusers_ulysses` (diffusers' own context parallelism,
`enable_parallelism(ContextParallelConfig(ulysses_degree=N))`), and paragen's `ulysses`, `ring` and `cfg`, and
its clips: `clip_full` (exact), `clip_dual` and `clip_dual_blocking` (one clip per rank), `clip_ring_dual` (two
clips, each over a ring of the other ranks). Every
denoising step (both guidance calls) is timed with diffusers' step-end callback, the same clock for all variants,
after a warm-up request. The latent is returned (no VAE decode: the steps are what is compared). Rank 0 writes a
JSON result and the latent tensor.
"""
from __future__ import annotations

import argparse
import resource

import torch
from common import StepRecorder, open_pipeline, timed_request, write_result
from dit_worker import enable_diffusers_context_parallelism

import paragen
from paragen.comms import all_gather_objects, world_comm, world_size

VARIANTS = ("stock", "diffusers_ulysses", "ulysses", "ring", "cfg", "clip_full", "clip_dual", "clip_dual_blocking",
            "clip_ring_dual")
PROMPT = "a red fox running through fresh snow, long shot"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--frames", type=int, default=161)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup-request-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--halo", type=int, default=2, help="clips, dual scope: halo latent frames (TemporalAttention.local)")
    p.add_argument("--global-frames", type=int, default=4, help="clips, dual scope: global latent frames")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    pipe = open_pipeline("tiny-wan", args.threads)
    stats = None
    if args.variant == "diffusers_ulysses":
        enable_diffusers_context_parallelism(pipe.transformer, world_size())
    elif args.variant.startswith("clip"):
        degrees = {"clip": 2, "ring": world_size() // 2}
        temporal = paragen.TemporalAttention(scope="full" if args.variant == "clip_full" else "dual", local=args.halo,
                                             global_frames=args.global_frames, overlap="blocking" not in args.variant)
        paragen.parallelize(pipe, paragen.ParallelConfig(**degrees), temporal)
        stats = pipe.paragen.stats
    elif args.variant != "stock":
        degrees = {args.variant: world_size()} if args.variant != "cfg" else {"cfg": 2, "ring": world_size() // 2}
        paragen.parallelize(pipe, paragen.ParallelConfig(**degrees), paragen.TemporalAttention())
        stats = pipe.paragen.stats
    recorder = StepRecorder(stats)

    def request(steps: int) -> torch.Tensor:
        recorder.start()
        return pipe(PROMPT, num_frames=args.frames, height=args.size, width=args.size, num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=recorder).frames

    latent, total = timed_request(request, args.warmup_request_steps, args.steps)
    comm_by_rank = all_gather_objects(world_comm(), recorder.comm_per_step) if stats is not None else []
    peak_rss = all_gather_objects(world_comm(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if paragen.is_output_rank():
        config = pipe.transformer.config
        tokens = ((args.frames - 1) // 4 + 1) * (args.size // 16) ** 2
        result = {
            "variant": args.variant, "world_size": world_size(), "threads_per_rank": torch.get_num_threads(),
            "frames": args.frames, "size": args.size, "video_tokens": tokens, "steps": args.steps,
            "request_s": total, "step_s": recorder.step_s, "comm_per_step_by_rank": comm_by_rank,
            "peak_rss_bytes_by_rank": peak_rss,
            "transformer": {k: config[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim")},
        }
        write_result(args.out, result, latent)
    paragen.shutdown()


if __name__ == "__main__":
    main()
