"""One benchmark configuration of the image workload (run by bench_image.py, alone or under torchrun).

Every configuration gets the same inputs: the prompt's embeddings (conditional and unconditional, for CFG) and
a seeded initial latent, passed to the stock pipeline, which returns the final latent (`output_type="latent"`:
the VAE, which DistriFusion does not parallelise, stays out of the timing); `--whole-call` instead asks the
shipped pipeline for an image from the prompt (text encoder, UNet, VAE decode). The stock pipeline runs alone,
or under paragen (`--mode`), or under DistriFusion (`--peer-mode`, see `distrifusion_peer.py`). Every denoising step
is stamped by diffusers' step-end callback (the same clock for all), after a warm-up request, with per-step
communication from a `CommStats` (paragen's own, or the one the peer's collectives are counted into).
Rank 0 writes a JSON result and the final latent.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from common import PROMPT, StepRecorder, open_pipeline, square_image_request, timed_request, write_result

import paragen
from paragen.comms.stats import CommStats


def replace_unet(pipe, config_path: str, seed: int = 0) -> None:
    """Give `pipe` a random-weight UNet built from a diffusers config file (drawn on the CPU with `seed`)."""
    from diffusers import UNet2DConditionModel

    config = json.loads(Path(config_path).read_text())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(config)
    if pipe.unet.dtype != unet.dtype:
        unet = unet.to(dtype=pipe.unet.dtype)
    pipe.register_modules(unet=unet.eval().to(pipe.unet.device))


def latent_request(pipe, call, recorder: StepRecorder, size: int, guidance_scale: float = 7.5):
    """`request(steps)` for `timed_request`: `call` (the pipeline, or a wrapper that fixes the size itself) on
    fixed prompt embeddings and a fixed initial latent of `size`² pixels; returns the final latent."""
    embeds, negative = pipe.encode_prompt(PROMPT, pipe.device, 1, True)
    factor = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, size // factor, size // factor)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(pipe.device, pipe.unet.dtype)
    sized = {} if call is not pipe else {"height": size, "width": size}

    def request(steps: int) -> torch.Tensor:
        recorder.start()
        return call(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents.clone(),
                    num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
                    callback_on_step_end=recorder, **sized).images

    return request


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--unet-config", default=None, help="a diffusers UNet config: a random-weight UNet replaces the model's")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup-request-steps", type=int, default=3)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--stock", action="store_true", help="the stock diffusers pipeline, no paragen")
    which.add_argument("--mode", help="paragen's patch parallelism in this mode")
    which.add_argument("--peer-mode", help="DistriFusion's patch parallelism in this GroupNorm mode")
    p.add_argument("--exact-steps", type=int, default=5,
                   help="steps run exact before the stale ones (paragen's warmup_steps; DistriFusion's warmup_steps + 1)")
    p.add_argument("--whole-call", action="store_true", help="prompt to image, the shipped pipeline as it is")
    p.add_argument("--bucket-mib", type=int, default=None, help="paragen's stale-gather bucket size (default 4 MiB)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    pipe = open_pipeline(args.model, args.threads)
    if args.unet_config:
        replace_unet(pipe, args.unet_config)
    call, stats = pipe, None
    if args.mode:
        paragen.parallelize(pipe, paragen.ParallelConfig(),
                            paragen.ExchangeConfig(mode=args.mode, warmup_steps=args.exact_steps))
        stats = pipe.paragen.stats
        if args.bucket_mib:
            pipe.paragen.plan.stale_gather.bucket_bytes = args.bucket_mib << 20
    elif args.peer_mode:
        from distrifusion_peer import distrifuse

        stats = CommStats()
        call = distrifuse(pipe, args.peer_mode, args.exact_steps - 1, args.size, args.size, stats)
        stats.reset()  # its set-up forwards are not part of any request
    recorder = StepRecorder(stats)

    if args.whole_call:
        request = square_image_request(pipe, recorder, args.size)
    else:
        request = latent_request(pipe, call, recorder, args.size)
    latent, total = timed_request(request, args.warmup_request_steps, args.steps)
    ranks = paragen.comms.world_size()
    comm_by_rank = [None] * ranks
    if ranks > 1:
        dist.all_gather_object(comm_by_rank, recorder.comm_per_step)
    else:
        comm_by_rank = [recorder.comm_per_step]
    if paragen.is_output_rank():
        result = {
            "stock": args.stock, "mode": args.mode, "peer_mode": args.peer_mode, "exact_steps": args.exact_steps,
            "world_size": ranks, "threads_per_rank": torch.get_num_threads(), "model": args.model,
            "unet_config": args.unet_config, "size": args.size, "steps": args.steps, "request_s": total,
            "step_s": recorder.step_s, "comm_per_step_by_rank": comm_by_rank,
        }
        write_result(args.out, result, latent)
    paragen.shutdown()


if __name__ == "__main__":
    main()
