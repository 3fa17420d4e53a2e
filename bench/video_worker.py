"""One configuration of the clip-parallel video benchmark (run by bench_video.py, alone or under torchrun).

Loads the embedded text-to-video model, splits the frames of the video into clips, one per rank
(`clip` = the world size, also at world size 1, where the one clip is the whole video), with the
requested temporal attention (`dual` or `full` scope, exchanges overlapped with compute or not).
After a warm-up request, every denoising step is stamped by the pipeline's step callback together
with `CommStats`, and probes on the temporal layers record what each exchange of the timed request
carries (see `ShapeProbe`), so the driver can put the bytes it measured against its formula. Every
rank reports its step times, its bytes and waits per label per step, the shapes its probes saw and its
peak resident memory; rank 0 writes them with the decoded frames.
"""
from __future__ import annotations

import argparse
import inspect
import resource
import time
from collections import defaultdict

import numpy as np
import torch
from common import PROMPT, StepRecorder, open_pipeline, write_result

import paragen
from paragen.comms import all_gather_objects, world_size
from paragen.parallel.clip.attention import ClipTemporalAttnProcessor
from paragen.parallel.clip.conv import ClipTemporalConv
from paragen.parallel.clip.norm import ClipGroupNorm


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ShapeProbe:
    """Records, per denoising step, the shapes that the clip-parallel temporal layers exchange.

    - temporal attention (an `Attention` whose processor is `ClipTemporalAttnProcessor`): its input is
      `[N, frames, channels]`, one sequence of frames per pixel (N counts pixels × batch); K and V are
      `to_k.out_features` wide. A forward pre-hook records N, the clip's frames and the width.
    - temporal conv stack (`ClipTemporalConv`): input `[batch × frames, C, H, W]`; the pre-hook records
      batch, C, H×W and the stacked halo.
    - `ClipGroupNorm`: the conv stacks call `video_stats` directly (not the module's forward), so that
      method is wrapped on each instance; it records the batch and the group count of every call.
    - the UNet: the whole latent it is called with, `[batch, C, frames, h, w]` (for the noise gather).

    The step a record belongs to is the runtime's step counter (`plan.step`, advanced before the UNet).
    """

    def __init__(self, pipe) -> None:
        self.plan = pipe.paragen.plan
        self.attention: dict[int, list[dict]] = defaultdict(list)
        self.conv: dict[int, list[dict]] = defaultdict(list)
        self.norm: dict[int, list[dict]] = defaultdict(list)
        self.unet: dict[int, list[dict]] = defaultdict(list)
        self.installed = {"attention": 0, "conv": 0, "norm": 0}
        pipe.unet.register_forward_pre_hook(self._on_unet, with_kwargs=True)
        for module in pipe.unet.modules():
            if isinstance(getattr(module, "processor", None), ClipTemporalAttnProcessor):
                module.register_forward_pre_hook(self._on_attention, with_kwargs=True)
                self.installed["attention"] += 1
            elif isinstance(module, ClipTemporalConv):
                module.register_forward_pre_hook(self._on_conv, with_kwargs=True)
                self.installed["conv"] += 1
            if isinstance(module, ClipGroupNorm):
                self._wrap_norm(module)
                self.installed["norm"] += 1

    def _on_unet(self, unet, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        batch, channels, frames, height, width = sample.shape
        self.unet[self.plan.step + 1].append(  # the step counter advances inside the call
            {"batch": batch, "channels": channels, "frames": frames, "pixels": height * width,
             "itemsize": sample.element_size()})

    def _on_attention(self, attn, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.attention[self.plan.step].append(
            {"pixels": hidden.shape[0], "frames": hidden.shape[1], "kv_width": attn.to_k.out_features,
             "itemsize": hidden.element_size()})

    def _on_conv(self, conv, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        frames = args[1] if len(args) > 1 else kwargs.get("num_frames", 1)
        self.conv[self.plan.step].append(
            {"batch": hidden.shape[0] // frames, "channels": hidden.shape[1], "pixels": hidden.shape[2] * hidden.shape[3],
             "frames": frames, "halo": conv.halo, "itemsize": hidden.element_size()})

    def _wrap_norm(self, norm: ClipGroupNorm) -> None:
        original = norm.video_stats  # the bound method of the class

        def video_stats(own: torch.Tensor):
            self.norm[self.plan.step].append({"batch": own.shape[0], "groups": norm.num_groups})
            return original(own)

        norm.video_stats = video_stats

    def per_step(self, steps: int) -> list[dict]:
        """Per step of the timed request: the records of each kind."""
        return [{"unet": self.unet.get(i, []), "attention": self.attention.get(i, []), "conv": self.conv.get(i, []),
                 "norm": self.norm.get(i, [])} for i in range(steps)]


def layout_report(pipe) -> dict:
    """The clips of the request just run: frames per clip, the global frames, those this rank holds."""
    ctx = pipe.paragen.ctx
    layout = ctx.layout
    return {"frames": layout.frames, "sizes": list(layout.sizes), "global_frames": list(layout.global_frames),
            "global_in": [len(layout.global_in(i)) for i in range(len(layout.sizes))], "conv_halo": pipe.paragen.conv_halo}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-t2v")
    p.add_argument("--scope", choices=("dual", "full"), default="dual")
    p.add_argument("--blocking", action="store_true", help="overlap=False: exchange, wait, then attend")
    p.add_argument("--local-window", type=int, default=8,
                   help="the local window's half width p (not --local: torchrun reads it as an abbreviation of its own)")
    p.add_argument("--global-frames", type=int, default=16)
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup-request-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    pipe = open_pipeline(args.model, args.threads)
    # TextToVideoSD (deprecated in diffusers) has only the old per-step `callback(i, t, latents)`; AnimateDiff the new one
    new_callback = "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
    temporal = paragen.TemporalAttention(scope=args.scope, local=args.local_window, global_frames=args.global_frames,
                                         overlap=not args.blocking)
    paragen.parallelize(pipe, paragen.ParallelConfig(clip=world_size()), temporal)
    stats = pipe.paragen.stats
    recorder = StepRecorder(stats)

    def request(steps: int) -> np.ndarray:
        recorder.start()
        stamp = {"callback_on_step_end": recorder} if new_callback else {"callback": lambda i, t, _: recorder(pipe, i, t, {})}
        return pipe(PROMPT, num_frames=args.frames, height=args.size, width=args.size, num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(0), output_type="np", **stamp).frames

    request(args.warmup_request_steps)
    probe = ShapeProbe(pipe)
    start = time.perf_counter()
    frames = request(args.steps)
    request_s = time.perf_counter() - start
    request_comm = _delta(recorder.snapshots[0], stats.snapshot())  # the steps and the gather of the frames

    mine = {
        "step_s": recorder.step_s, "unet_s": list(pipe.paragen.step_seconds), "comm_per_step": recorder.comm_per_step,
        "request_comm": request_comm, "shapes_per_step": probe.per_step(args.steps),
        "probes_installed": probe.installed, "start": pipe.paragen.ctx.start, "stop": pipe.paragen.ctx.stop,
        "peak_rss_mib": peak_rss_mib(),
    }
    ranks = all_gather_objects(pipe.paragen.mesh.group("world"), mine)
    if paragen.is_output_rank():
        result = {
            "scope": args.scope, "overlap": not args.blocking, "local": args.local_window, "global_frames": args.global_frames,
            "world_size": world_size(), "threads_per_rank": torch.get_num_threads(), "model": args.model,
            "frames": args.frames, "size": args.size, "steps": args.steps, "request_s": request_s,
            "frames_per_s": args.frames / request_s, "step_s": recorder.step_s, "output_shape": list(frames.shape),
            "latent": {"channels": pipe.unet.config.in_channels, "side": args.size // pipe.vae_scale_factor},
            "layout": layout_report(pipe), "ranks": ranks,
        }
        write_result(args.out, result, torch.from_numpy(np.ascontiguousarray(frames)))
    paragen.shutdown()


def _delta(before: dict, after: dict) -> dict:
    """Per label: what `after` counts beyond `before` (two `CommStats` snapshots)."""
    zero = {"bytes_recv": 0, "bytes_sent": 0, "wait_s": 0.0, "calls": 0}
    return {label: {k: row[k] - before.get(label, zero)[k] for k in zero} for label, row in after.items()}


if __name__ == "__main__":
    main()
