"""One benchmark configuration of the DiT workload (run by bench_dit.py, alone or under torchrun).

Variants: `stock` (the plain diffusers pipeline), `diffusers_ulysses` (diffusers' own context
parallelism, `enable_parallelism(ContextParallelConfig(ulysses_degree=N))`), and paragen's `ulysses`,
`ring` and `displaced`. Every denoising step is timed with diffusers' step-end callback, the same
clock for all variants, after a warm-up request. Rank 0 writes a JSON result and the image tensor.
"""
from __future__ import annotations

import argparse

import torch
from common import PROMPT, StepRecorder, open_pipeline, timed_request, write_result

import paragen
from paragen.comms import all_gather_objects, world_size
from paragen.pipelines.jobs.image import exact_size_options

VARIANTS = ("stock", "diffusers_ulysses", "ulysses", "ring", "displaced")


def enable_diffusers_context_parallelism(transformer, ulysses: int) -> None:
    """diffusers' own Ulysses, with the one shim a CPU build needs.

    `enable_parallelism` divides by `torch.accelerator.device_count()`, which is 0 without a GPU;
    it is made to return 1 for that call only.
    """
    from diffusers import ContextParallelConfig

    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses))
    finally:
        torch.accelerator.device_count = original


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--model", default="tiny-flux")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--warmup-request-steps", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=2, help="displaced: exact steps before stale K/V")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    pipe = open_pipeline(args.model, args.threads)
    stats = None
    if args.variant == "diffusers_ulysses":
        enable_diffusers_context_parallelism(pipe.transformer, world_size())
    elif args.variant != "stock":
        degrees = {"ring": world_size()} if args.variant == "ring" else {"ulysses": world_size()}
        mode = "displaced" if args.variant == "displaced" else "sync"
        paragen.parallelize(pipe, paragen.ParallelConfig(**degrees),
                            paragen.ExchangeConfig(mode=mode, warmup_steps=args.warmup_steps))
        stats = pipe.paragen.stats
    recorder = StepRecorder(stats)

    def request(steps: int) -> torch.Tensor:
        recorder.start()
        return pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=steps,
                    max_sequence_length=args.text_tokens, generator=torch.Generator().manual_seed(0),
                    output_type="pt", callback_on_step_end=recorder, **exact_size_options(pipe)).images

    image, total = timed_request(request, args.warmup_request_steps, args.steps)
    step_s, per_step_comm = recorder.step_s, recorder.comm_per_step
    comm_by_rank = all_gather_objects(pipe.paragen.mesh.group("world"), per_step_comm) if stats is not None else []
    if paragen.is_output_rank():
        result = {
            "variant": args.variant, "warmup_steps": args.warmup_steps, "world_size": world_size(),
            "threads_per_rank": torch.get_num_threads(), "model": args.model, "size": args.size,
            "steps": args.steps, "text_tokens": args.text_tokens, "request_s": total, "step_s": step_s,
            "comm_per_step_by_rank": comm_by_rank,
            "transformer": {k: pipe.transformer.config[k] for k in ("num_layers", "num_single_layers",
                                                                    "num_attention_heads", "attention_head_dim")},
        }
        write_result(args.out, result, image)
    paragen.shutdown()


if __name__ == "__main__":
    main()
