"""Tensor parallelism for a causal LM through DeepSpeed's automatic tensor parallelism (AutoTP).

`shard_weights` cuts every decoder layer of a Hugging Face model across the ranks of one tensor-parallel
group, in place: each rank keeps its own attention heads and a slice of the MLP, and the output
projections sum the partial results over the group. The caller creates the process group itself
(`paragen.init()`, gloo on CPU); the tp group may be any subgroup of the world.

What AutoTP leaves on a Llama-style attention module (DeepSpeed 0.19):

- `q_proj`, `k_proj`, `v_proj` become `deepspeed.module_inject.layers.LinearLayer` holding this rank's
  rows: `num_attention_heads / tp` query heads and `num_key_value_heads / tp` key/value heads.
- `o_proj` becomes `LinearAllreduce`: it holds this rank's input columns and all-reduces its output over
  the group inside its own `forward`, so a replacement attention forward must still call `self.o_proj`.
- `head_dim`, `num_key_value_groups` and `scaling` are untouched and stay right (the query/kv ratio is
  unchanged); the model config still holds the *global* head counts, so reshape with `-1` heads.
- `lm_head` becomes `LmHeadLinearAllreduce` (weights split along the hidden size, cloned first, so a tied
  embedding is untied); the embedding and the norms are replicated.

Both all-reduce through `deepspeed.comm.inference_all_reduce`, i.e. the method of the same name on
DeepSpeed's backend object `deepspeed.comm.comm.cdb`; `shard_weights` meters that method, so each of those
all-reduces over the tp group is counted in the group's `CommStats` under `TP_ALL_REDUCE_LABEL`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
from typing import Any

import torch

from paragen.comms import GroupComm, backend_name, meter_inference_all_reduce
from paragen.log import get_logger

# How to get DeepSpeed into an environment that already has torch (CPU or CUDA), without replacing it.
DEEPSPEED_INSTALL_HINT = "pip install 'paragen[deepspeed]' (or: pip install --no-build-isolation 'deepspeed>=0.19')"

# The CommStats label of the sharded layers' all-reduces.
TP_ALL_REDUCE_LABEL = "llm_tp_all_reduce"


def check_tensor_parallel(config: Any, tp: int) -> None:
    """Raise `ValueError` unless `tp` ranks can split the model's attention heads evenly, and DeepSpeed (an
    optional extra) is installed when `tp > 1` — said before the process group exists, with the install command.

    `config` is a `transformers.PretrainedConfig`; both the query heads and the key/value heads must be
    divisible by `tp`, so that every rank owns whole heads and whole grouped-query groups.
    """
    if tp < 1:
        raise ValueError(f"tensor parallel degree must be >= 1, got {tp}")
    if tp > 1 and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"tensor parallelism (tp > 1) needs DeepSpeed, which is not installed: {DEEPSPEED_INSTALL_HINT}")
    heads = getattr(config, "num_attention_heads", None)
    if heads is None:
        raise ValueError(f"{type(config).__name__} has no num_attention_heads; cannot check tensor parallelism")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % tp:
        raise ValueError(f"tensor parallel degree {tp} does not divide the model's {heads} attention heads; "
                         f"choose a tp that divides {heads}")
    if kv_heads % tp:
        raise ValueError(f"tensor parallel degree {tp} does not divide the model's {kv_heads} key-value heads "
                         f"({heads} attention heads); choose a tp that divides {kv_heads}")


def shard_weights(model: torch.nn.Module, comm: GroupComm, tp: int) -> torch.nn.Module:
    """Shard `model` across the `tp` ranks of `comm`'s group with DeepSpeed AutoTP and return the module to use.

    The returned object is `model` itself, changed in place (not a DeepSpeed `InferenceEngine`): its
    `generate`, its submodules and their instance attributes are the usual Hugging Face ones, with the
    linear layers swapped as described in this module's docstring.

    Every rank of the world must call this together, even ranks of other tp groups: DeepSpeed broadcasts
    rank 0's RNG state over the world while sharding. `tp == 1` returns `model` unchanged. Once it returns,
    DeepSpeed's all-reduces over `comm`'s group are counted in `comm.stats` under `TP_ALL_REDUCE_LABEL`.
    """
    if tp == 1:
        return model
    if comm.group is None or comm.size != tp:
        raise ValueError(f"the tensor parallel group has {comm.size} ranks but tp={tp}")
    config = getattr(model, "config", None)
    if config is not None:
        check_tensor_parallel(config, tp)
    first = next(model.parameters())
    _prepare_environment(first.device.type)
    deepspeed = _import_deepspeed()
    _check_accelerator(first.device.type)
    backend = _attach_comm_backend(deepspeed)
    engine = _init_inference(deepspeed, model, comm, tp, first.dtype)
    _check_group_all_reduce(comm, tp, first)
    meter_inference_all_reduce(backend, comm, TP_ALL_REDUCE_LABEL)
    return engine.module


def _prepare_environment(device_type: str) -> None:
    """Set what DeepSpeed reads from the environment when it is first imported and initialised.

    `DS_ACCELERATOR` pins DeepSpeed to the model's device (it otherwise probes the hardware and, with a
    GPU present, would move a CPU model onto it). `LOCAL_SIZE` is DeepSpeed's name for the ranks on this
    node; torchrun calls it `LOCAL_WORLD_SIZE`, and its shared-memory all-reduce crashes without it.
    Values the user already set are kept.
    """
    if device_type in ("cpu", "cuda"):
        os.environ.setdefault("DS_ACCELERATOR", device_type)
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local:
        os.environ.setdefault("LOCAL_SIZE", local)


def _import_deepspeed() -> Any:
    """Import DeepSpeed, or explain how to install it."""
    try:
        return importlib.import_module("deepspeed")
    except ImportError as exc:
        raise RuntimeError(f"tensor parallelism (tp > 1) needs DeepSpeed, which is not installed: "
                           f"{DEEPSPEED_INSTALL_HINT}") from exc


def _check_accelerator(device_type: str) -> None:
    """Refuse to go on if DeepSpeed picked an accelerator other than the model's device."""
    from deepspeed.accelerator import get_accelerator

    chosen = get_accelerator().device_name()
    if chosen != device_type:
        raise RuntimeError(f"DeepSpeed uses the '{chosen}' accelerator but the model is on '{device_type}'; "
                           f"set DS_ACCELERATOR={device_type} before DeepSpeed is first imported")


def _attach_comm_backend(deepspeed: Any) -> Any:
    """Make `deepspeed.comm` wrap the process group that already exists, without its shared-memory path;
    return its backend object (`deepspeed.comm.comm.cdb`).

    On CPU, DeepSpeed would JIT-compile a shared-memory all-reduce (about a minute of g++) whose
    `inference_all_reduce` ignores the group it is given and sums over every rank of the node: wrong for
    a tp group smaller than the world. Without that op, DeepSpeed's inference all-reduce falls back to
    `torch.distributed.all_reduce` over the tp group.
    """
    ds_comm = importlib.import_module("deepspeed.comm.comm")
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    if ds_comm.cdb is None:
        build_shm_op = ds_torch.build_shm_op
        ds_torch.build_shm_op = lambda: None
        try:
            deepspeed.init_distributed(dist_backend=backend_name(), verbose=False)
        finally:
            ds_torch.build_shm_op = build_shm_op
    if getattr(ds_comm.cdb, "shm_comm_op", None) is not None:
        # Someone initialised DeepSpeed's comm with the shared-memory op already: disable its use.
        ds_comm.cdb.shm_vector_kernel_level = 0
    return ds_comm.cdb


class _TensorParallelUnit:
    """The model-parallel unit DeepSpeed asks for: one tensor-parallel group, no data parallelism."""

    def __init__(self, comm: GroupComm) -> None:
        self.comm = comm

    def get_model_parallel_group(self) -> Any:
        return self.comm.group

    def get_model_parallel_world_size(self) -> int:
        return self.comm.size

    def get_model_parallel_rank(self) -> int:
        return self.comm.rank


def _init_inference(deepspeed: Any, model: torch.nn.Module, comm: GroupComm, tp: int,
                    dtype: torch.dtype) -> Any:
    """Run AutoTP and return the DeepSpeed engine.

    Both `tp_group` and `mpu` are passed: with `tp_group` alone DeepSpeed replaces the group by ranks
    `0..tp-1`, and with `mpu` alone it shards nothing. `dtype` is the model's own (DeepSpeed's default
    would convert it to float16). AutoTP prints its layer plan on every rank; it goes to the debug log.
    """
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        engine = deepspeed.init_inference(model,
                                          tensor_parallel={"tp_size": tp, "tp_group": comm.group,
                                                           "mpu": _TensorParallelUnit(comm)},
                                          dtype=dtype,
                                          replace_with_kernel_inject=False)
    for line in printed.getvalue().splitlines():
        get_logger().debug("deepspeed: %s", line)
    return engine


def _check_group_all_reduce(comm: GroupComm, tp: int, like: torch.Tensor) -> None:
    """Check that DeepSpeed's inference all-reduce sums over the tp group and nothing more (with a tensor on the
    device and of the dtype of `like`, as the model's all-reduces will be)."""
    from deepspeed import comm as ds_dist

    probe = torch.ones(1, dtype=like.dtype, device=like.device)
    ds_dist.inference_all_reduce(probe, group=comm.group)
    if probe.item() != tp:
        raise RuntimeError(f"DeepSpeed's all-reduce over a tensor parallel group of {tp} ranks summed "
                           f"{probe.item():g} ranks; its shared-memory all-reduce is in use")
