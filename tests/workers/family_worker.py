"""Run sequence-parallel layouts of the embedded DiT families on real ranks; rank 0 saves the outputs.

usage: family_worker.py SPEC.json OUT.pt   (SPEC: a list of runs, see tests/test_dit_families.py)
Each family is called at a size whose token count the ranks do not divide (where the pipeline allows one).
A spec without parallel degrees runs unparallelised.
"""
import torch

import paragen
from paragen.pipelines.loading import load_pipeline
from tests.workers.specs import serve_specs

# model -> its call: a size whose tokens do not divide by 2 or 4 ranks where the pipeline's multiples allow it.
CALLS = {
    "tiny-flux2": dict(height=36, width=36),  # 9×9 tokens (+ the text padded to 512)
    "tiny-qwenimage": dict(height=36, width=36, negative_prompt="blurry", true_cfg_scale=2.0),
    "tiny-zimage": dict(height=36, width=36),
    "tiny-hunyuandit": dict(height=80, width=80, use_resolution_binning=False),  # 5×5 tokens
    "tiny-auraflow": dict(height=80, width=80, max_sequence_length=29),  # 5×5 tokens (+ 8 registers and 29 text)
    "tiny-sana": dict(height=160, width=224, max_sequence_length=29, use_resolution_binning=False),  # 5 rows × 7
    "tiny-lumina2": dict(height=80, width=80, max_sequence_length=64),  # 5×5 tokens after 34 (1 unconditional) of text
    "tiny-ltx": dict(height=32, width=32, num_frames=9, max_sequence_length=30),  # 5 frames × 16 (sides: 32 px)
    "tiny-cogvideox": dict(height=40, width=40, num_frames=17, max_sequence_length=29),  # 5 × 25 tokens
    "tiny-hunyuanvideo": dict(height=48, width=48, num_frames=9, max_sequence_length=37),  # 3 × 36 (+ 37 text)
    # 1 chunk of 9 latent frames × 2×2 tokens after Helios' short, mid and long history (4 + 1 + 4 tokens)
    "tiny-helios": dict(height=32, width=32, num_frames=33, max_sequence_length=29),
    # 5 latent frames × 16×16 video tokens (+ its audio, whole on every rank; sides are multiples of 32 px, so the
    # ranks divide the tokens); guidance and its variants off, as in diffusers' own LTX-2 test
    "tiny-ltx2": dict(height=32, width=32, num_frames=9, max_sequence_length=16, guidance_scale=1.0, stg_scale=0.0,
                      modality_scale=1.0, guidance_rescale=0.0, audio_guidance_scale=1.0, audio_stg_scale=0.0,
                      audio_modality_scale=1.0, audio_guidance_rescale=0.0, spatio_temporal_guidance_blocks=None,
                      use_cross_timestep=False, frame_rate=25.0),
    "tiny-mochi": dict(height=48, width=48, num_frames=13, max_sequence_length=29),  # 3 × 9 tokens
    # 6 × 9×11 tokens: 4 ranks do not divide them (its VAE decodes only in tiles of 24 frames and 128 px, with
    # overlaps of 8 frames, 120 and 80 px, so the latent frames are 6 + 4k and 2 ranks always divide the tokens)
    "tiny-allegro": dict(height=144, width=176, num_frames=24, max_sequence_length=29, clean_caption=False),
}


def generate(pipe, model: str, frames: int | None = None) -> torch.Tensor:
    """The family's output (images or frames) for a fixed prompt and seed (`frames`: other than `CALLS`')."""
    call = dict(CALLS[model], **({"num_frames": frames} if frames else {}))
    out = pipe(prompt="a red fox in the snow", num_inference_steps=2, generator=torch.Generator().manual_seed(7),
               output_type="pt", **call)
    return out.frames if hasattr(out, "frames") else out.images


def run(spec: dict) -> dict:
    pipe = load_pipeline(spec["model"])
    pipe.set_progress_bar_config(disable=True)
    if spec.get("parallel", True):
        config = paragen.ParallelConfig(cfg=spec.get("cfg", 1), clip=spec.get("clip", 1), ulysses=spec.get("ulysses", 1),
                                        ring=spec.get("ring"))
        options = None  # the class's workload with its default options (video families take no exchange mode)
        if "mode" in spec:
            options = paragen.ExchangeConfig(mode=spec["mode"], warmup_steps=spec.get("warmup", 1))
        if "scope" in spec:
            options = paragen.TemporalAttention(scope=spec["scope"], local=spec.get("local", 1),
                                                global_frames=spec.get("global_frames", 1))
        paragen.parallelize(pipe, config, options)
    return {"output": generate(pipe, spec["model"], spec.get("frames"))}


if __name__ == "__main__":
    serve_specs(run)
