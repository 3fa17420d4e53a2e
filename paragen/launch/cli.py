"""`paragen` / `python -m paragen`: the command line.

    torchrun --nproc-per-node 2 -m paragen image --mode displaced --height 1024 --width 1024
    torchrun --nproc-per-node 4 -m paragen image --model tiny-flux --ulysses 2 --ring 2
    torchrun --nproc-per-node 2 -m paragen video --frames 64 --prompt "a fox" --prompt "a forest at night"
    torchrun --nproc-per-node 2 -m paragen llm --context 16384 --kv offload
    paragen slurm --nodes 2 --gpus-per-node 8 -- image --model /models/sdxl --cfg 2
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from torch.distributed import DistError
from torch.distributed.elastic.multiprocessing.errors import record

from paragen.comms import DEVICE_CHOICES, CommError, resolve_device
from paragen.launch.env import LaunchError, discover
from paragen.launch.process_group import DEFAULT_INIT_TIMEOUT_S, DEFAULT_TIMEOUT_S, init, shutdown
from paragen.launch.slurm import sbatch_script
from paragen.log import get_logger, setup_logging
from paragen.parallel.config import MODE_HELP, MODES, ParallelConfig
from paragen.parallel.clip import SCOPE_HELP, SCOPES, TemporalAttention
from paragen.parallel.hires import GUIDANCE_MODES, PLACEMENTS, HiresConfig
from paragen.pipelines.dtypes import DTYPE_HELP, DTYPES

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _add_image_parser(sub: argparse._SubParsersAction) -> None:
    from paragen.pipelines.image_job import ImageRequest  # imports diffusers: only when needed
    from paragen.pipelines.loading import EMBEDDED_MODELS

    defaults = ImageRequest()
    hires_defaults = HiresConfig()
    p = sub.add_parser("image", help="text-to-image across ranks (patch parallelism for UNets, sequence parallelism for DiTs)",
                       description="Generate one image with its work split across every rank of the job.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=defaults.model,
                   help=f"embedded model name ({', '.join(EMBEDDED_MODELS)}) or a local diffusers directory (safetensors)")
    p.add_argument("--prompt", default=defaults.prompt, help="text prompt")
    p.add_argument("--negative-prompt", default=defaults.negative_prompt, help="negative prompt")
    p.add_argument("--height", type=int, default=defaults.height, help="image height in pixels")
    p.add_argument("--width", type=int, default=defaults.width, help="image width in pixels")
    p.add_argument("--steps", type=int, default=defaults.steps, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale,
                   help="guidance scale (classifier-free; Flux: its guidance embedding); default: the pipeline's")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (the same on every rank)")
    p.add_argument("--cfg", type=int, default=1, choices=(1, 2),
                   help="2: the conditional and unconditional branches run on different halves of the ranks")
    p.add_argument("--patch", type=int, default=-1, help="UNet models: number of row bands (-1: the ranks left over)")
    p.add_argument("--ulysses", type=int, default=1,
                   help="DiT models: Ulysses degree (all-to-all to head shards; must divide the head count)")
    p.add_argument("--ring", type=int, default=1,
                   help="DiT models: Ring degree (K/V passed around a ring); with neither set, the ranks left form a ring")
    p.add_argument("--mode", choices=MODES, default="sync",
                   help="; ".join(f"{m}: {text}" for m, text in MODE_HELP.items()))
    p.add_argument("--warmup-steps", type=int, default=4,
                   help="the first N denoising steps of a request run exact (sync) before displaced/partial start "
                   "using stale data (DistriFusion's warmup_steps=k means k+1 exact steps)")
    p.add_argument("--partial-fraction", type=float, default=0.3,
                   help="partial mode: fraction of each neighbouring band's rows that attention sees")
    h = p.add_argument_group("beyond the training size (--hires, SD/SDXL)")
    h.add_argument("--hires", action="store_true",
                   help="denoise training-size windows spread over the ranks, steered by a low-resolution view")
    h.add_argument("--window", type=int, default=None, help="window side in latent pixels (default: the UNet's sample_size)")
    h.add_argument("--stride", type=int, default=None, help="latent pixels between windows (default: half the window)")
    h.add_argument("--guidance", choices=GUIDANCE_MODES, default="async",
                   help="async: mix in the previous step's low-resolution guidance (no waiting); sync: wait for this step's")
    h.add_argument("--guidance-weight", type=float, default=hires_defaults.guidance_weight,
                   help="structure guidance weight w0, in [0, 1]")
    h.add_argument("--guidance-decay", type=float, default=hires_defaults.guidance_decay,
                   help="exponent of the cosine decay of the weight over the steps (0: constant)")
    h.add_argument("--map-layers", default=",".join(hires_defaults.map_layers),
                   help="comma-separated UNet module prefixes whose cross-attention maps form the guidance mask")
    h.add_argument("--structure-fraction", type=float, default=hires_defaults.structure_fraction,
                   help="share of the steps run at low resolution before it seeds the large latent (0: none)")
    h.add_argument("--placement", choices=PLACEMENTS, default=hires_defaults.placement,
                   help="interleaved: the low-resolution pass is one more unit of a window rank; dedicated: a rank of its own")
    h.add_argument("--window-batch", type=int, default=hires_defaults.window_batch, help="windows per UNet call")
    _add_checkpoint_arguments(h, defaults.checkpoint_every)
    _add_output_arguments(p, defaults.out_dir, "the PNG and the JSON run report")
    p.set_defaults(handler=_run_image)


def _add_checkpoint_arguments(p, every: int) -> None:
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="save every rank's state in DIR every --checkpoint-every steps (must not hold a checkpoint)")
    p.add_argument("--checkpoint-every", type=int, default=every, help="steps between checkpoints")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run checkpointed in DIR (same request, layout and number of ranks)")


def _checkpoint_folder(args: argparse.Namespace) -> str | None:
    """The folder of --checkpoint / --resume (a resumed run keeps checkpointing where it was)."""
    if args.resume and args.checkpoint and args.resume != args.checkpoint:
        raise ValueError("--resume continues the run in its folder and keeps checkpointing there; drop --checkpoint")
    return args.resume or args.checkpoint


def _add_video_parser(sub: argparse._SubParsersAction) -> None:
    from paragen.pipelines.loading import EMBEDDED_MODELS
    from paragen.pipelines.outputs import VIDEO_FORMATS
    from paragen.pipelines.video_job import VideoRequest

    defaults, temporal = VideoRequest(), TemporalAttention()
    p = sub.add_parser("video", help="text-to-video across ranks (clip parallelism with dual-scope temporal attention)",
                       description="Generate one video with its frames split into clips, one per rank.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=defaults.model,
                   help=f"embedded model name ({', '.join(m for m in EMBEDDED_MODELS if m in ('tiny-t2v', 'tiny-animatediff'))}) "
                        "or a local diffusers TextToVideoSD/AnimateDiff directory (safetensors)")
    p.add_argument("--prompt", action="append", default=None,
                   help=f"text prompt; repeat it for one prompt per consecutive segment of the video (default: {defaults.prompts[0]!r})")
    p.add_argument("--segment-frames", default=None,
                   help="comma-separated frames of each prompt's segment, adding up to --frames (default: even)")
    p.add_argument("--negative-prompt", default=defaults.negative_prompt, help="negative prompt")
    p.add_argument("--frames", type=int, default=defaults.frames, help="frames of the video")
    p.add_argument("--height", type=int, default=defaults.height, help="frame height in pixels")
    p.add_argument("--width", type=int, default=defaults.width, help="frame width in pixels")
    p.add_argument("--steps", type=int, default=defaults.steps, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale; default: the pipeline's")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (the same on every rank)")
    p.add_argument("--clip", type=int, default=-1, help="clips (ranks) the frames are split into (-1: every rank)")
    p.add_argument("--scope", choices=SCOPES, default=temporal.scope,
                   help="; ".join(f"{s}: {text}" for s, text in SCOPE_HELP.items()))
    p.add_argument("--local", type=int, default=temporal.local, help="dual scope: local window half width p, in frames")
    p.add_argument("--global-frames", type=int, default=temporal.global_frames,
                   help="dual scope: frames sampled evenly over the video that every frame also attends to")
    p.add_argument("--bias", type=float, default=temporal.bias,
                   help="dual scope: logit bias for the global frames at timesteps >= --bias-switch, for the local window below")
    p.add_argument("--bias-switch", type=int, default=temporal.bias_switch, help="dual scope: timestep (of 1000) where the bias switches")
    p.add_argument("--blocking", action="store_true",
                   help="exchange, wait, then attend (Video-Infinity's released code), instead of overlapping the exchange")
    p.add_argument("--fps", type=int, default=defaults.fps, help="frames per second of the written video")
    p.add_argument("--format", choices=VIDEO_FORMATS, default=defaults.format,
                   help="mp4 (needs imageio-ffmpeg: pip install 'paragen[video]'; GIF if missing) or gif")
    _add_checkpoint_arguments(p, defaults.checkpoint_every)
    _add_output_arguments(p, defaults.out_dir, "the video and the JSON run report")
    p.set_defaults(handler=_run_video)


def _run_video(args: argparse.Namespace) -> int:
    from paragen.pipelines.loading import check_model_source
    from paragen.pipelines.video_job import VideoRequest, check_video_request, open_checkpoints, run_video_job

    folder = _checkpoint_folder(args)
    segments = None if args.segment_frames is None else tuple(_int_list(args.segment_frames, "--segment-frames"))
    request = VideoRequest(
        model=args.model, prompts=tuple(args.prompt or VideoRequest().prompts), segment_frames=segments,
        negative_prompt=args.negative_prompt, frames=args.frames, height=args.height, width=args.width,
        steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed, dtype=args.dtype,
        allow_pickle=args.allow_pickle, fps=args.fps, format=args.format, out_dir=args.out, name=args.name,
        checkpoint_dir=folder, checkpoint_every=args.checkpoint_every, resume=args.resume is not None,
    )
    temporal = TemporalAttention(scope=args.scope, local=args.local, global_frames=args.global_frames, bias=args.bias,
                                 bias_switch=args.bias_switch, overlap=not args.blocking)
    launch = discover()
    if args.clip != -1 and args.clip != launch.world_size:
        raise ValueError(f"--clip {args.clip} does not match the {launch.world_size} ranks of the job (one clip per rank)")
    config = ParallelConfig(clip=launch.world_size, patch=1, temporal=temporal)
    video_format = check_video_request(request, config, launch.world_size)
    check_model_source(args.model, allow_pickle=args.allow_pickle)
    _check_room(args, request, config, launch)
    checkpoints = open_checkpoints(request, config, launch.rank, launch.world_size)
    _init(args)
    run_video_job(request, config, checkpoints, video_format)
    return 0


def _add_llm_parser(sub: argparse._SubParsersAction) -> None:
    from paragen.parallel.llm import KV_MODES, KVConfig
    from paragen.pipelines.llm_job import LLMRequest
    from paragen.pipelines.llm_loading import EMBEDDED_LLMS

    defaults, kv = LLMRequest(), KVConfig()
    p = sub.add_parser("llm", help="long-context causal-LM generation across ranks (sequence-sharded prefill and KV cache)",
                       description="Generate from one long prompt with its sequence cut into shards, one per ring position, "
                                   "each shard's weights optionally split by tensor parallelism.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=defaults.model,
                   help=f"embedded model ({', '.join(EMBEDDED_LLMS)}: passkey prompts) or a local transformers "
                        "Llama/Qwen2/Mistral directory (safetensors) with its tokenizer")
    p.add_argument("--prompt", default=None, help="text prompt (local checkpoints)")
    p.add_argument("--prompt-file", default=None, help="read the text prompt from this file (local checkpoints)")
    p.add_argument("--context", type=int, default=defaults.context, help="embedded models: tokens of the passkey prompt")
    p.add_argument("--depth", type=float, default=defaults.depth, help="embedded models: where the key sits, 0 (start) to 1 (end)")
    p.add_argument("--new-tokens", type=int, default=defaults.new_tokens, help="tokens to generate")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (same seed on every rank)")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (prompt and sampling)")
    p.add_argument("--seq", type=int, default=-1, help="sequence shards (-1: the ranks / --tp)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per shard (DeepSpeed AutoTP)")
    p.add_argument("--kv", choices=KV_MODES, default=kv.mode,
                   help="dense: exact K/V on the device; offload: ShadowKV — low-rank keys, values in host memory, "
                        "top-k chunks fetched per token")
    p.add_argument("--budget", type=float, default=kv.budget, help="offload: fraction of the context fetched per token")
    p.add_argument("--rank", type=int, default=None, help="offload: SVD rank of the keys (default: 160/1024 of the key width)")
    p.add_argument("--chunk", type=int, default=kv.chunk, help="offload: tokens per chunk")
    p.add_argument("--window", type=int, default=kv.window, help="offload: most recent prompt tokens kept exact")
    p.add_argument("--allow-remote-code", action="store_true",
                   help="allow a checkpoint whose config names remote code (auto_map), which runs arbitrary Python")
    _add_output_arguments(p, defaults.out_dir, "the JSON run report")
    p.set_defaults(handler=_run_llm)


def _run_llm(args: argparse.Namespace) -> int:
    from paragen.parallel.llm import KVConfig
    from paragen.pipelines.llm_job import LLMRequest, prepare_prompt, run_llm_job
    from paragen.pipelines.outputs import check_out_dir

    request = LLMRequest(
        model=args.model, prompt=args.prompt, prompt_file=args.prompt_file, context=args.context, depth=args.depth,
        new_tokens=args.new_tokens, sample=args.sample, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
        dtype=args.dtype, allow_pickle=args.allow_pickle, allow_remote_code=args.allow_remote_code, out_dir=args.out,
        name=args.name,
    )
    kv = KVConfig(mode=args.kv, budget=args.budget, rank=args.rank, chunk=args.chunk, window=args.window)
    launch = discover()
    if args.tp < 1 or launch.world_size % args.tp:
        raise ValueError(f"--tp {args.tp} does not divide the {launch.world_size} ranks of the job")
    seq = launch.world_size // args.tp if args.seq == -1 else args.seq
    config = ParallelConfig(seq=seq, tp=args.tp)
    config.resolve(launch.world_size)
    prompt = prepare_prompt(request, config, kv)
    check_out_dir(args.out)
    _init(args)
    run_llm_job(request, config, kv, prompt)
    return 0


def _check_room(args: argparse.Namespace, request, config: ParallelConfig, launch) -> None:
    """An image or video request's output folder and its memory per rank, checked on every rank before init."""
    from paragen.pipelines.memory_estimate import check_memory
    from paragen.pipelines.outputs import check_out_dir

    check_out_dir(args.out)
    check_memory(request, config, launch.world_size, resolve_device(args.device, launch.local_rank),
                 launch.local_world_size)


def _init(args: argparse.Namespace) -> None:
    """The process group and this rank's device, from the runtime options every workload takes."""
    init(device=args.device, init_timeout_s=args.init_timeout, timeout_s=args.timeout, threads=args.threads,
         verbose=args.verbose)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated whole numbers, got {text!r}") from None


def _add_output_arguments(p: argparse.ArgumentParser, out_dir: str, what: str) -> None:
    """--allow-pickle, --out (the folder for `what`), --name and the runtime options every workload takes."""
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickle (.bin/.ckpt) weights, which can run arbitrary code")
    p.add_argument("--out", default=out_dir, help=f"folder for {what}")
    p.add_argument("--name", default=None, help="output file name without extension (default: encodes the layout)")
    _add_runtime_arguments(p)


def _add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="auto: cuda:LOCAL_RANK when CUDA is present, else the CPU; cuda: fail at once without CUDA")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto", help=DTYPE_HELP)
    p.add_argument("--threads", type=int, default=None, help="CPU compute threads per rank (default: cores / local ranks)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds after which a collective fails (a dead or stuck rank stops the job)")
    p.add_argument("--init-timeout", type=float, default=DEFAULT_INIT_TIMEOUT_S,
                   help="seconds to wait for every rank to join")
    p.add_argument("--verbose", action="store_true", help="debug logging")


def _add_slurm_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slurm", help="print an sbatch script that runs a paragen command on N nodes x G GPUs",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node; 0 for CPU nodes")
    p.add_argument("--job-name", default="paragen", help="SLURM job name")
    p.add_argument("--time", default="01:00:00", help="SLURM time limit")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the head node")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the paragen command to run, after `--`")
    p.set_defaults(handler=_run_slurm)


def build_parser() -> argparse.ArgumentParser:
    """The `paragen` argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(prog="paragen", description="paragen: one generation request, many ranks.")
    sub = parser.add_subparsers(dest="workload", required=True, metavar="{image,video,llm,slurm}")
    _add_image_parser(sub)
    _add_video_parser(sub)
    _add_llm_parser(sub)
    _add_slurm_parser(sub)
    return parser


def _run_slurm(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    print(sbatch_script(nodes=args.nodes, gpus_per_node=args.gpus_per_node, command=command,
                        job_name=args.job_name, time=args.time, partition=args.partition, port=args.port))
    return 0


def _run_image(args: argparse.Namespace) -> int:
    from paragen.pipelines.image_job import ImageRequest, open_checkpoints, run_image_job
    from paragen.pipelines.loading import check_model_source

    # Everything that can be checked without the other ranks is checked here, on every rank.
    folder = _checkpoint_folder(args)
    request = ImageRequest(
        model=args.model, prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height,
        width=args.width, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
        dtype=args.dtype, allow_pickle=args.allow_pickle, out_dir=args.out, name=args.name,
        checkpoint_dir=folder, checkpoint_every=args.checkpoint_every, resume=args.resume is not None,
    )
    config = ParallelConfig(cfg=args.cfg, patch=args.patch, mode=args.mode, warmup_steps=args.warmup_steps,
                            partial_fraction=args.partial_fraction, ulysses=args.ulysses, ring=args.ring,
                            hires=_hires_config(args))
    launch = discover()
    config.resolve(launch.world_size)
    check_model_source(args.model, allow_pickle=args.allow_pickle)
    _check_room(args, request, config, launch)
    checkpoints = open_checkpoints(request, config, launch.rank, launch.world_size)
    _init(args)
    run_image_job(request, config, checkpoints)
    return 0


def _hires_config(args: argparse.Namespace) -> HiresConfig | None:
    """The --hires options as a `HiresConfig` (None without --hires; its options alone are refused)."""
    if not args.hires:
        given = [flag for flag, value in (("--window", args.window), ("--stride", args.stride)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --hires")
        return None
    return HiresConfig(
        window=args.window, stride=args.stride, guidance=args.guidance, guidance_weight=args.guidance_weight,
        guidance_decay=args.guidance_decay, map_layers=tuple(p.strip() for p in args.map_layers.split(",") if p.strip()),
        structure_fraction=args.structure_fraction, placement=args.placement, window_batch=args.window_batch,
    )


def _quiet_third_party() -> None:
    """Hide the libraries' notices (such as transformers' "requires torchvision" fallback lines when diffusers loads
    image processors) and deprecation chatter; errors still show. The levels go through the libraries' logging API:
    an environment variable is read once, when the library is imported, and transformers is imported with paragen.
    A TRANSFORMERS_VERBOSITY or DIFFUSERS_VERBOSITY set by the user still decides."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(diffusers|transformers)\b")
    from diffusers.utils import logging as diffusers_logging  # the parser imports diffusers anyway
    from transformers.utils import logging as transformers_logging

    libraries = (("TRANSFORMERS_VERBOSITY", transformers_logging), ("DIFFUSERS_VERBOSITY", diffusers_logging))
    for variable, library in libraries:
        if variable not in os.environ:
            library.set_verbosity_error()


@record
def main(argv: list[str] | None = None) -> int:
    """Entry point of `paragen` and `python -m paragen`; returns the exit status."""
    _quiet_third_party()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, TypeError, LaunchError, FileNotFoundError) as error:
        _report(f"error: {error}")
        return EXIT_BAD_INPUT
    except (CommError, DistError) as error:
        _report(f"communication failed in {error}\n(a rank died, hung past --timeout, or lost its connection; "
                "the whole job stops — look for the first rank that reported an error)")
        _exit_now(EXIT_FAILED)
    except RuntimeError as error:
        _report(f"failed: {error}")
        return EXIT_FAILED
    finally:
        shutdown()


def _exit_now(status: int) -> None:
    """Leave without tearing down a broken process group (that can hang or abort in the backend)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _report(message: str) -> None:
    logger = get_logger()
    if not logger.handlers:
        try:
            info = discover()
            setup_logging(info.rank, info.rank == 0)
        except LaunchError:
            setup_logging(0, True)
    logger.error(message, exc_info=logger.isEnabledFor(logging.DEBUG))


if __name__ == "__main__":
    sys.exit(main())
