"""DistriFusion (mit-han-lab/distrifuser 0.0.1b1) as the image benchmark's peer, on this CPU/gloo machine.

`make bench-peers` installs the published package without its dependency pins (it pins diffusers 0.24, which
this environment does not have). The package is written for CUDA, NCCL, CUDA graphs and diffusers 0.24; to run
it here the benchmark changes, at run time and in this process only (the installed files are never edited):
1. what diffusers moved since 0.24 is aliased where the package looks for it: the module
   `diffusers.models.unet_2d_condition` (now `diffusers.models.unets.unet_2d_condition`) and
   `diffusers.models.resnet.USE_PEFT_BACKEND` (now only in `diffusers.utils`);
2. its CUDA version check is skipped (there is no CUDA);
3. its `init_process_group("nccl")` is skipped: the benchmark worker already started a gloo world;
4. its `torch.cuda.set_device` is skipped and its device set to the CPU; CUDA graphs are off;
5. its attention passes no LoRA `scale` argument to `nn.Linear` (diffusers' PEFT-backend calling convention).
Its own numerics are untouched. Every collective it issues is counted (bytes received, seconds blocked) into a
`CommStats` under a label per layer kind, so its rows in the report read like paragen's.

The process group is started by the worker (`paragen.init`), as for paragen's configurations; everything
else the peer does with `torch.distributed` is its own code.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from paragen.comms.stats import CommStats

# Where each of DistriFusion's modules sends its traffic, labelled like paragen's.
_LABELS = {
    "distrifuser.utils": "unet.stale_gather",
    "distrifuser.modules.pp.groupnorm": "unet.norm_stats",
    "distrifuser.modules.pp.conv2d": "unet.conv_halo",
    "distrifuser.modules.pp.attn": "unet.attn_kv",
    "distrifuser.models.distri_sdxl_unet_pp": "unet.output_gather",
}
# DistriFusion's GroupNorm modes: stale statistics corrected by the own band's change (its default), or every
# exchange synchronous.
MODES = ("corrected_async_gn", "full_sync")


def unavailable() -> str | None:
    """Why DistriFusion cannot run here, or None."""
    try:
        _import_distrifuser()
    except Exception as error:  # noqa: BLE001 - any failure to import is reported, and the benchmark goes on
        return f"distrifuser cannot be imported ({type(error).__name__}: {error}); `make bench-peers` installs it"
    return None


class _Handle:
    """An async work handle whose `wait()` is timed."""

    def __init__(self, work: Any, stats: CommStats, label: str) -> None:
        self._work, self._stats, self._label = work, stats, label

    def wait(self) -> None:
        start = time.perf_counter()
        self._work.wait()
        self._stats.add_wait(self._label, time.perf_counter() - start)


class _MeteredDist:
    """`torch.distributed` as one DistriFusion module sees it, with its collectives counted."""

    def __init__(self, stats: CommStats, label: str) -> None:
        self._stats, self._label = stats, label

    def __getattr__(self, name: str) -> Any:
        return getattr(dist, name)

    def all_gather(self, tensor_list: list[torch.Tensor], tensor: torch.Tensor, group=None, async_op: bool = False):
        volume = (len(tensor_list) - 1) * tensor.numel() * tensor.element_size()
        self._stats.record(self._label, sent=volume, recv=volume)
        return self._timed(dist.all_gather, tensor_list, tensor, group=group, async_op=async_op)

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None, async_op: bool = False):
        volume = (dist.get_world_size(group) - 1) * tensor.numel() * tensor.element_size()
        self._stats.record(self._label, sent=volume, recv=volume)
        return self._timed(dist.all_reduce, tensor, op=op, group=group, async_op=async_op)

    def _timed(self, collective, *args, async_op: bool, **kwargs):
        if async_op:
            return _Handle(collective(*args, async_op=True, **kwargs), self._stats, self._label)
        start = time.perf_counter()
        collective(*args, **kwargs)
        self._stats.add_wait(self._label, time.perf_counter() - start)
        return None


def _import_distrifuser():
    """Import DistriFusion's pipeline module with what diffusers moved aliased (change 1)."""
    from diffusers import utils
    from diffusers.models import resnet
    from diffusers.models.unets import unet_2d_condition

    sys.modules.setdefault("diffusers.models.unet_2d_condition", unet_2d_condition)
    if not hasattr(resnet, "USE_PEFT_BACKEND"):
        resnet.USE_PEFT_BACKEND = utils.USE_PEFT_BACKEND
    return importlib.import_module("distrifuser.pipelines")


@contextlib.contextmanager
def _cpu_gloo_config():
    """While DistriFusion builds its config: no CUDA check, no second process group, no CUDA device (2-4)."""
    utils = importlib.import_module("distrifuser.utils")
    saved = utils.check_env, dist.init_process_group, torch.cuda.set_device
    utils.check_env = lambda: None
    dist.init_process_group = lambda *args, **kwargs: None
    torch.cuda.set_device = lambda device: None
    try:
        yield utils
    finally:
        utils.check_env, dist.init_process_group, torch.cuda.set_device = saved


def distrifuse(pipe, mode: str, warmup_steps: int, height: int, width: int, stats: CommStats):
    """DistriFusion's patch-parallel pipeline around `pipe` (its UNet wrapped in place), over every rank, with
    the CFG batch kept whole on each rank (`split_batch=False`: all ranks are patch ranks, as in paragen's
    configurations). `warmup_steps` is DistriFusion's own count: it runs `warmup_steps + 1` exact steps."""
    if mode not in MODES:
        raise ValueError(f"DistriFusion mode must be one of {MODES}, got {mode!r}")
    pipelines = _import_distrifuser()
    for module, label in _LABELS.items():
        importlib.import_module(module).dist = _MeteredDist(stats, label)
    importlib.import_module("distrifuser.modules.pp.attn").USE_PEFT_BACKEND = True  # change 5
    with _cpu_gloo_config() as utils:
        config = utils.DistriConfig(height=height, width=width, split_batch=False, warmup_steps=warmup_steps,
                                    mode=mode, use_cuda_graph=False)
    config.device = torch.device("cpu")
    pipe.register_modules(unet=pipelines.DistriUNetPP(pipe.unet, config))
    return pipelines.DistriSDPipeline(pipe, config)
