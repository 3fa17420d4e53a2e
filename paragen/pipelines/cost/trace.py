"""What one call of a model computes, counted without computing it: the model runs once on torch's `meta` device
(no memory, no arithmetic) under two interception modes, and every kernel it would launch is recorded with its
floating-point operations and the bytes it reads and writes.

- Matrix products and convolutions: FLOPs from torch's own formulas (`torch.utils.flop_counter.flop_registry`).
- Attention: `scaled_dot_product_attention` is caught before it decomposes, counted as one fused kernel
  (4 · B · H · Lq · Lk · D FLOPs, halved where causal) and kept as a site with its shapes.
- Everything else that launches a kernel (norms, activations, copies): its bytes; views and metadata launch none.

The sites the parallel modes exchange at are kept too: every convolution taller than one row (its halo), every
GroupNorm (its statistics), every attention call (its token counts and width).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from paragen.parallel.sequence.seam import TORCH_SDPA

MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm")
CONV_OPS = ("convolution", "_convolution", "convolution_overrideable")
# Operators that only re-describe memory: no kernel, no traffic.
FREE_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice", "select",
    "split", "split_with_sizes", "unbind", "detach", "alias", "as_strided", "chunk", "narrow", "view_as_real",
    "view_as_complex", "lift_fresh", "_to_copy_noop", "unflatten", "flatten", "empty", "empty_strided", "zeros",
    "ones", "arange", "randn", "rand", "full", "new_empty", "new_zeros", "new_ones", "scalar_tensor", "_local_scalar_dense",
    "sym_size", "sym_stride", "is_same_size", "_has_compatible_shallow_copy_type", "set_", "resize_",
})
CLASSES = ("matmul", "conv", "attention", "memory")


@dataclass(frozen=True)
class Kernel:
    """One kernel launch: its class (`CLASSES`), FLOPs and bytes moved."""

    kind: str
    flops: float
    bytes: float


@dataclass(frozen=True)
class AttentionSite:
    """One attention call: batch, heads, query and key tokens, head width, element bytes, whether causal, and
    whether its keys are its queries' own tokens (self-attention)."""

    batch: int
    heads: int
    queries: int
    keys: int
    dim: int
    element: int
    causal: bool
    self_attention: bool


@dataclass(frozen=True)
class ConvSite:
    """A 2D convolution taller than one row: its module's name, its input `[B, C, H, W]`, kernel, stride, padding and
    dilation (rows)."""

    name: str
    shape: tuple[int, ...]
    kernel: int
    stride: int
    padding: int
    dilation: int
    element: int


@dataclass(frozen=True)
class NormSite:
    """A GroupNorm: batch and groups (its statistics are per batch row and group)."""

    batch: int
    groups: int


@dataclass
class Trace:
    """Every kernel of one call and the exchange sites it passed."""

    kernels: list[Kernel] = field(default_factory=list)
    attentions: list[AttentionSite] = field(default_factory=list)
    convs: list[ConvSite] = field(default_factory=list)
    norms: list[NormSite] = field(default_factory=list)
    output_bytes: int = 0  # what the call returns

    def flops(self, kind: str | None = None) -> float:
        """FLOPs of every kernel (of class `kind`)."""
        return sum(k.flops for k in self.kernels if kind is None or k.kind == kind)

    def bytes(self, kind: str | None = None) -> float:
        """Bytes moved by every kernel (of class `kind`)."""
        return sum(k.bytes for k in self.kernels if kind is None or k.kind == kind)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class _Kernels(TorchDispatchMode):
    """Records one `Kernel` per operator that launches one."""

    def __init__(self, trace: Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in FREE_OPS or name.endswith("_") and name.rstrip("_") in FREE_OPS:
            return out
        moved = _nbytes(list(args)) + _nbytes(list(kwargs.values())) + _nbytes(out)
        counter = flop_registry.get(func.overloadpacket)
        if counter is not None and (name in MATMUL_OPS or name in CONV_OPS):
            flops = counter(*args, **kwargs, out_val=out)  # torch's formula, read from the shapes
            self.trace.kernels.append(Kernel("matmul" if name in MATMUL_OPS else "conv", float(flops), float(moved)))
        else:
            self.trace.kernels.append(Kernel("memory", 0.0, float(moved)))
        return out


class _Attention(TorchFunctionMode):
    """Counts `scaled_dot_product_attention` as one fused kernel and keeps its site."""

    def __init__(self, trace: Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not TORCH_SDPA:  # torch's own, also where paragen's seam has replaced `F`'s name for it
            return func(*args, **kwargs)
        named = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), args), **kwargs)
        query, key, value = named["query"], named["key"], named["value"]
        causal = bool(named.get("is_causal", False))
        *lead, queries, dim = query.shape
        keys = key.shape[-2]
        batch, heads = (lead[0], lead[1]) if len(lead) == 2 else (1, lead[0] if lead else 1)
        flops = 4.0 * batch * heads * queries * keys * dim * (0.5 if causal else 1.0)
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        moved = _nbytes([query, key, value, out])
        self.trace.kernels.append(Kernel("attention", flops, float(moved)))
        self.trace.attentions.append(AttentionSite(batch, heads, queries, keys, dim, query.element_size(), causal,
                                                   keys == queries))
        return out


def _site_hooks(model: torch.nn.Module, trace: Trace) -> list:
    """Forward hooks that keep the conv and GroupNorm sites."""
    handles = []

    def conv(name, module, args, out):
        trace.convs.append(ConvSite(name, tuple(args[0].shape), module.kernel_size[0], module.stride[0],
                                    module.padding[0] if isinstance(module.padding, tuple) else 0, module.dilation[0],
                                    args[0].element_size()))

    def norm(module, args, out):
        trace.norms.append(NormSite(args[0].shape[0], module.num_groups))

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size[0] > 1:
            handles.append(module.register_forward_hook(functools.partial(conv, name)))
        elif isinstance(module, torch.nn.GroupNorm):
            handles.append(module.register_forward_hook(norm))
    return handles


def trace_call(model: torch.nn.Module, kwargs: dict[str, Any]) -> Trace:
    """Run `model(**kwargs)` on the `meta` device (its parameters and `kwargs`' tensors must be there) and record
    what it would compute."""
    trace = Trace()
    handles = _site_hooks(model, trace)
    try:
        with torch.no_grad(), torch.device("meta"), _Attention(trace), _Kernels(trace):
            out = model(**kwargs)
        trace.output_bytes = _nbytes(out[0] if isinstance(out, tuple) else getattr(out, "sample", out))
    finally:
        for handle in handles:
            handle.remove()
    return trace
