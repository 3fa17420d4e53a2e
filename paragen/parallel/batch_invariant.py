"""A pipeline whose every request's output does not depend on what it was batched with.

Dynamic batching (`paragen serve --max-batch`) runs several requests in one pipeline call. Each sample's output must
be the bytes it would be alone, and the library kernels do not promise that: a matrix product's kernel (and so the
order it sums in) is picked by the number of rows, and a convolution's by the batch. Measured on this project's CPU
(oneDNN/MKL through torch 2.x): a linear layer's rows come out the same for every row count of 12 or more, and
differ below it (the timestep embeddings, adaLN modulations and pooled projections, whose rows are the batch); a
convolution's samples come out the same for every batch of 2 or more, and differ at 1. So here:

- every `nn.Linear` of the denoisers and text encoders given fewer than `MIN_ROWS` rows runs on them padded with zero
  samples to at least `MIN_ROWS` rows (the padding's outputs dropped);
- a convolution of the denoisers in a call of several requests (`requests_in_call`) where each request gives it one
  sample (no guidance batch: guidance off, or `--cfg 2`) runs one sample at a time, as each request's would alone;
  where each gives it two or more (the guidance batch) it runs as it is;
- the VAE decodes one sample at a time (diffusers' own `enable_slicing`), so a decode always sees a batch of 1.

Attention, norms and the large linear layers (rows: batch × tokens) are row-wise and need nothing. The cost: a few
padded small products, and, in a batch whose requests give the denoiser one sample each, its convolutions one sample
at a time (measured in `bench/bench_requests.py --part batching --job-options '--cfg 2'`). On CUDA the kernels'
choice by shape follows other rules (cuBLAS's split-K); that the outputs are the same bytes there is for a GPU run
to show.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import torch

from paragen.parallel.components import MODELS
from paragen.parallel.intercept import intercept

MIN_ROWS = 16  # a linear layer's rows below this are padded to it
CONVOLUTIONS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_REQUESTS = contextvars.ContextVar("paragen_requests_in_call", default=1)


@contextlib.contextmanager
def requests_in_call(count: int) -> Iterator[None]:
    """Within it, the pipeline call in progress makes `count` requests together (their samples side by side)."""
    token = _REQUESTS.set(count)
    try:
        yield
    finally:
        _REQUESTS.reset(token)


def _linear(forward, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The layer on `x` padded with zero samples (its first dimension) to at least `MIN_ROWS` rows."""
    rows = x.numel() // x.shape[-1] if x.dim() >= 2 and x.shape[-1] else 0
    if not 0 < rows < MIN_ROWS:
        return forward(x, *args, **kwargs)
    per_sample = rows // x.shape[0]
    samples = -(-MIN_ROWS // per_sample)
    padded = torch.cat([x, x.new_zeros((samples - x.shape[0],) + x.shape[1:])])
    return forward(padded, *args, **kwargs)[: x.shape[0]]


def _convolution(batched_dims: int):
    """A convolution that runs a call's samples one at a time where each request gave it one."""
    def around(forward, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        requests = _REQUESTS.get()
        if x.dim() != batched_dims or requests == 1 or x.shape[0] != requests:
            return forward(x, *args, **kwargs)
        return torch.cat([forward(x[i:i + 1], *args, **kwargs) for i in range(requests)])
    return around


def make_batch_invariant(pipe: Any) -> int:
    """Make `pipe`'s outputs per sample independent of the batch (see the module's docstring), in place; the number
    of layers converted."""
    converted = 0
    for name in MODELS:
        model = getattr(pipe, name, None)
        if not isinstance(model, torch.nn.Module):
            continue
        denoiser = not name.startswith("text_encoder")
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                intercept(module, "forward", _linear, tag="batch_invariant")
            elif denoiser and isinstance(module, CONVOLUTIONS):
                # a conv of paragen's own that exchanges halos first (`convolve`): the conv proper, on what it got
                method = "convolve" if hasattr(module, "convolve") else "forward"
                intercept(module, method, _convolution(len(module.kernel_size) + 2), tag="batch_invariant")
            else:
                continue
            converted += 1
    vae = getattr(pipe, "vae", None)
    if vae is not None and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    return converted


__all__ = ["MIN_ROWS", "make_batch_invariant", "requests_in_call"]
