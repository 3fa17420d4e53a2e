"""One benchmark configuration of one DiT family (run by bench_dit_families.py, alone or under torchrun).

Variants: `stock` (the plain diffusers pipeline), `diffusers_ulysses` (diffusers' own context parallelism, where
the transformer class declares a `_cp_plan`), and paragen's `ulysses` and `ring`. Every denoising step is timed
with diffusers' step-end callback after a warm-up request, as in dit_worker.py. Rank 0 writes a JSON result and
the output tensor (images, a video's frames, or the latents where the call asks for them).
"""
from __future__ import annotations

import argparse

import torch
from common import PROMPT, StepRecorder, open_pipeline, timed_request, write_result
from dit_worker import enable_diffusers_context_parallelism

import paragen
from paragen.comms import world_size

VARIANTS = ("stock", "diffusers_ulysses", "ulysses", "ring")
LATENTS = {"output_type": "latent"}
# model -> its call at a size where the split pays (a few thousand tokens), and how many tokens that is
CALLS = {
    "tiny-flux2": (dict(height=256, width=256), "64×64 = 4096 image tokens + 512 text"),
    "tiny-qwenimage": (dict(height=256, width=256), "64×64 = 4096 image tokens + the prompt's"),
    "tiny-sana": (dict(height=4096, width=4096, use_resolution_binning=False),
                  "128×128 = 16384 image tokens (linear attention) + 300 text"),
    "tiny-zimage": (dict(height=256, width=256), "64×64 = 4096 image tokens + the prompt's"),
    "tiny-hunyuandit": (dict(height=1024, width=1024, use_resolution_binning=False),
                        "64×64 = 4096 image tokens (text cross-attended)"),
    # its position table holds 32×32 tokens
    "tiny-auraflow": (dict(height=512, width=512), "32×32 = 1024 image tokens + 8 registers + 256 text"),
    "tiny-lumina2": (dict(height=1024, width=1024), "64×64 = 4096 image tokens + the prompt's"),
    # the video families at about 10k tokens, where attention is most of a step (as in every real video: 720p × 129
    # frames is 120k tokens), compared on their latents: their VAEs decode whole on every rank, for minutes here
    "tiny-ltx": (dict(LATENTS, height=384, width=384, num_frames=9),
                 "5 frames × 48×48 = 11520 video tokens + 128 text"),
    "tiny-ltx2": (dict(LATENTS, height=96, width=96, num_frames=9),
                  "5 frames × 48×48 = 11520 video tokens + the padded prompt; "
                  "the audio (9 tokens) whole on every rank"),
    "tiny-cogvideox": (dict(LATENTS, height=384, width=384, num_frames=17),
                       "5 frames × 48×48 = 11520 video tokens + 226 text"),
    "tiny-hunyuanvideo": (dict(LATENTS, height=384, width=384, num_frames=17),
                          "5 frames × 48×48 = 11520 video tokens + 256 text"),
    "tiny-mochi": (dict(LATENTS, height=576, width=576, num_frames=43),
                   "8 frames × 36×36 = 10368 video tokens + 256 text"),
    "tiny-helios": (dict(LATENTS, height=384, width=384, num_frames=33),
                    "a chunk of 9 frames × 24×24 = 5184 video tokens + its history; 40 blocks"),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--model", choices=list(CALLS), required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup-request-steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    pipe = open_pipeline(args.model, args.threads)
    if args.variant == "diffusers_ulysses":
        enable_diffusers_context_parallelism(pipe.transformer, world_size())
    elif args.variant != "stock":
        degrees = {"ring": world_size()} if args.variant == "ring" else {"ulysses": world_size(), "ring": 1}
        paragen.parallelize(pipe, paragen.ParallelConfig(**degrees))
    recorder = StepRecorder(None)

    def request(steps: int) -> torch.Tensor:
        recorder.start()
        out = pipe(prompt=PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                   callback_on_step_end=recorder, **{"output_type": "pt", **CALLS[args.model][0]})
        return out.frames if hasattr(out, "frames") else out.images

    output, total = timed_request(request, args.warmup_request_steps, args.steps)
    if paragen.is_output_rank():
        result = {"variant": args.variant, "world_size": world_size(), "threads_per_rank": torch.get_num_threads(),
                  "model": args.model, "steps": args.steps, "request_s": total, "step_s": recorder.step_s,
                  "tokens": CALLS[args.model][1]}
        write_result(args.out, result, output)
    paragen.shutdown()


if __name__ == "__main__":
    main()
