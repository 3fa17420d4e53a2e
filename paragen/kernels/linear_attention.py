"""ReLU-kernel linear attention (SANA): attention whose weights are `relu(q)·relu(k)`, summed over the keys once.

`out_i = Σ_j (relu(q_i)·relu(k_j)) v_j / Σ_j relu(q_i)·relu(k_j)`. Both sums over the keys are one product of the
keys' state `S = Σ_j relu(k_j) ⊗ [v_j, 1]` (`[B, H, D, Dv + 1]`) with the query, so keys cut over ranks need only
`S` summed over them (`reduce`: an all-reduce of a tensor whose size does not grow with the sequence).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

EPS = 1e-15  # added to the normaliser, as SANA's reference implementation does


def key_state(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`Σ_j relu(k_j) ⊗ [v_j, 1]` in fp32 over the given keys: `[B, H, D, Dv + 1]` from keys `[B, H, N, D]` and
    values `[B, H, N, Dv]`."""
    value = F.pad(value.float(), (0, 1), value=1.0)
    return torch.einsum("bhnd,bhne->bhde", F.relu(key.float()), value)


def relu_linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The attention of `query` over `key`/`value` (`[B, H, N, D]` each), in fp32: `[B, H, Nq, Dv]`. `reduce` sums the
    keys' state over the ranks holding the other keys (None: these are all the keys)."""
    state = key_state(key, value)
    if reduce is not None:
        state = reduce(state)
    out = torch.einsum("bhnd,bhde->bhne", F.relu(query.float()), state)
    return out[..., :-1] / (out[..., -1:] + EPS)
