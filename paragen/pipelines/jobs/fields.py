"""The request fields several jobs declare, each declared once here (see `schema` for what a declaration says).
A job's request class uses them as `seed: int = fields.seed()`."""
from __future__ import annotations

from typing import Any, Literal

from paragen.parallel.step_cache import LIMITS, METHOD_HELP, METHODS, StepCacheConfig

from paragen.pipelines.dtypes import DTYPE_HELP
from paragen.pipelines.jobs.schema import LAUNCH, MAX_SEED, field
from paragen.pipelines.request_args import MAX_SIDE

MAX_STEPS = 10_000  # a bound before the model's own (its scheduler's training timesteps, usually 1000)


def model(default: str, help: str) -> Any:
    return field(default, help, scope=LAUNCH)


def dtype() -> Any:
    return field("auto", DTYPE_HELP, scope=LAUNCH)


def allow_pickle() -> Any:
    return field(False, "allow loading pickle (.bin/.ckpt) weights, which can run arbitrary code", scope=LAUNCH)


def shard_weights() -> Any:
    return field(False, "shard the denoisers' and text encoders' weights over the ranks (PyTorch FSDP2): each rank "
                        "keeps about 1/N of them and gathers each block's just before it runs", scope=LAUNCH)


def offload_layers() -> Any:
    return field(False, "keep the denoisers' and text encoders' blocks in host memory (pinned on CUDA) and copy each "
                        "onto the device just before it runs, the next one's copy in flight (with --shard-weights: "
                        "each rank's shards)", scope=LAUNCH)


def memory_gib() -> Any:
    return field(None, "memory each rank may use, in GiB (default: the device's free memory; on the CPU, the host's "
                       "available memory shared by its ranks); a request that will not fit is refused before loading",
                 scope=LAUNCH, gt=0, le=1 << 20, metavar="GIB")


def out_dir(what: str) -> Any:
    return field("out", f"folder for {what} (created if missing)", scope=LAUNCH, flag="--out")


def name() -> Any:
    return field(None, "output file name without extension (default: encodes the layout)", scope=LAUNCH)


def seed() -> Any:
    return field(0, "random seed (the same on every rank)", ge=0, le=MAX_SEED)


def steps() -> Any:
    return field(20, "denoising steps (at most the scheduler's training timesteps)", gt=0, le=MAX_STEPS)


def side(side: str, what: str) -> Any:
    return field(None, f"{what} {side} in pixels (default: the pipeline's own, its training size)", gt=0,
                 le=MAX_SIDE)


def negative_prompt() -> Any:
    return field("", "negative prompt")


def guidance_scale(what: str) -> Any:
    return field(None, f"{what}; default: the pipeline's", ge=0, le=1000)


def checkpoint_dir() -> Any:
    return field(None, "save every rank's state here (from --checkpoint or --resume)", scope=LAUNCH, cli=False)


def checkpoint_every(every: int) -> Any:
    return field(every, "steps between checkpoints", scope=LAUNCH, gt=0)


def resume() -> Any:
    return field(False, "continue the run saved in the checkpoint folder (from --resume)", scope=LAUNCH, cli=False)


CacheMethod = Literal[METHODS]  # a job's `cache`
_CACHE = StepCacheConfig()


def _bounds(name: str) -> dict:
    low, high = LIMITS[name]
    return {"ge": low, "le": high}


def cache() -> Any:
    return field(_CACHE.method, "skip denoiser work between nearby steps, every rank alike — "
                 + "; ".join(f"{m}: {text}" for m, text in METHOD_HELP.items()), scope=LAUNCH)


def cache_threshold() -> Any:
    return field(_CACHE.threshold, "fbcache/teacache: the relative L1 change below which a step is served from the "
                                   "cache (0: never)", scope=LAUNCH, **_bounds("threshold"))


def cache_interval() -> Any:
    return field(_CACHE.interval, "taylorseer: compute every N steps, forecast the others", scope=LAUNCH,
                 **_bounds("interval"))


def cache_order() -> Any:
    return field(_CACHE.order, "taylorseer: order of the Taylor forecast", scope=LAUNCH, **_bounds("order"))


def cache_start() -> Any:
    return field(_CACHE.start, "the first N steps always compute the whole denoiser", scope=LAUNCH, **_bounds("start"))
