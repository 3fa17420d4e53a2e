"""One configuration of `bench_step_cache.py`: a model, a layout, a step cache (paragen's, diffusers' own, or none),
every request of a list timed after one warm-up request; rank 0 writes the outputs and the timings.

usage: step_cache_worker.py --model M --requests R.json [--degrees '{"ring": 2}'] [--mode displaced] [--hires]
                            [--cache '{"method": "fbcache", "threshold": 0.1}' | --peer fbcache|taylorseer]
                            --threads T --out OUT.json
Images are written as PNG beside OUT (`<id>.png`), videos as tensors (`OUT.pt`: id -> [F, 3, H, W]).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import open_pipeline, spread

STEPS, GUIDANCE = 20, 4.0


def diffusers_cache(pipe, peer: str, setting: dict) -> None:
    """diffusers' own cache on the denoiser (one process). FBCache needs a cache context: the Wan pipeline opens one
    per call, PixArt's does not, so it is set once for its transformer (a single "cond" call per step)."""
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig
    from diffusers.hooks import apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context
    from diffusers.hooks.taylorseer_cache import apply_taylorseer_cache

    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    if peer == "fbcache":
        apply_first_block_cache(denoiser, FirstBlockCacheConfig(threshold=setting["threshold"]))
        if not hasattr(pipe, "cache_context") and type(pipe).__name__ != "WanPipeline":
            _set_cache_context(denoiser, CacheContext("cond"))
    else:
        apply_taylorseer_cache(denoiser, TaylorSeerCacheConfig(cache_interval=setting["interval"],
                                                               disable_cache_before_step=2,
                                                               max_order=setting.get("order", 1),
                                                               taylor_factors_dtype=torch.float32))


def last_block_counter(pipe) -> list[int]:
    """Counts the calls that really run the last block of the denoiser's body (its first layer with weights runs):
    the denoiser's evaluations, whatever cache skipped them."""
    from paragen.pipelines.step_cache import cache_plan, denoisers

    count = [0]
    for model in denoisers(pipe).values():
        plan = cache_plan(model)
        block = model.get_submodule(plan.body[-1])
        layer = next(m for m in block.modules()
                     if m is not block and next(m.parameters(recurse=False), None) is not None)
        layer.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def stamp_steps(pipe) -> list[float]:
    """A clock reading after every scheduler step: the denoising loop's time is the last minus the first (every step
    but the first, which also carries the prompt's encoding), for paragen and the peers alike."""
    from paragen.parallel.intercept import intercept

    stamps: list[float] = []

    def stepped(step, *args, **kwargs):
        output = step(*args, **kwargs)
        stamps.append(time.perf_counter())
        return output

    intercept(pipe.scheduler, "step", stepped, tag="bench.stamps")
    return stamps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--requests", required=True)
    p.add_argument("--degrees", default="{}")
    p.add_argument("--mode", default="sync")
    p.add_argument("--hires", action="store_true")
    p.add_argument("--cache", default=None)
    p.add_argument("--peer", choices=("none", "fbcache", "taylorseer"), default=None, help="the stock pipeline, "
                   "not parallelised: uncached, or with diffusers' own cache")
    p.add_argument("--peer-setting", default="{}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import paragen

    pipe = open_pipeline(args.model, args.threads)
    counter = last_block_counter(pipe)
    cache = None
    if args.peer:
        if args.peer != "none":
            diffusers_cache(pipe, args.peer, json.loads(args.peer_setting))
    else:
        if args.model == "tiny-wan":  # 9 latent frames: clips of 5 and 4 see ±2 frames of the next and 3 global ones
            options = paragen.TemporalAttention(local=2, global_frames=3)
        else:
            options = paragen.HiresConfig() if args.hires else paragen.ExchangeConfig(mode=args.mode, warmup_steps=4)
        paragen.parallelize(pipe, paragen.ParallelConfig(**json.loads(args.degrees)), options)
        if args.cache:
            cache = paragen.enable_step_cache(pipe, paragen.StepCacheConfig(**json.loads(args.cache)))
    stamps = stamp_steps(pipe)
    requests = json.loads(Path(args.requests).read_text())
    video = args.model == "tiny-wan"
    seconds, loops, evaluations, forwards, outputs = [], [], [], [], {}
    for index, request in enumerate([requests[0], *requests]):  # the first is the warm-up, not counted
        kwargs = dict(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(request["seed"]),
                      height=request["height"], width=request["width"])
        if video:
            kwargs.update(num_frames=request["frames"], output_type="pt", max_sequence_length=24)
        else:
            kwargs.update(guidance_scale=GUIDANCE)
            if args.model == "tiny-shapes-dit":
                kwargs["use_resolution_binning"] = False
        counter[0] = 0
        stamps.clear()
        start = time.perf_counter()
        result = pipe(request["prompt"], **kwargs)
        elapsed = time.perf_counter() - start
        if index == 0:
            continue
        seconds.append(elapsed)
        loops.append(stamps[-1] - stamps[0])
        evaluations.append(counter[0])
        if cache is not None:
            forwards.append(cache.last["forwards"])
        if paragen.is_output_rank():
            if video:
                outputs[request["id"]] = result.frames[0]
            else:
                result.images[0].save(Path(args.out).with_name(f"{request['id']}.png"))
    if paragen.is_output_rank():
        computed = sum(f["computed"] for f in forwards)
        summary = {"seconds": spread(seconds), "loop_seconds": spread(loops),
                   "evaluations_per_request": sum(evaluations) / len(evaluations),
                   "computed_share": computed / sum(f["computed"] + f["served"] for f in forwards) if forwards
                   else None,
                   "computed_steps_first": cache.last["computed_steps"] if cache else None}
        Path(args.out).write_text(json.dumps(summary))
        torch.save(outputs, Path(args.out).with_suffix(".pt"))
    paragen.shutdown()


if __name__ == "__main__":
    main()
