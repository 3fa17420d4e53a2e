"""Compute pieces of a sparse, low-rank KV cache (ShadowKV): chunk landmarks, outlier scores, top-k
chunk selection, gathering chunks per head, and rebuilding keys from a low-rank factorisation.

Shapes: keys and values `[B, Hkv, S, D]`; chunked `[B, Hkv, n, c, D]` (n chunks of c tokens); chunk
indices `[B, Hkv, k]`, one selection per key head.
"""
from __future__ import annotations

import torch


def chunked(states: torch.Tensor, chunk: int) -> torch.Tensor:
    """`[B, H, n·c, D]` → `[B, H, n, c, D]` (a view)."""
    batch, heads, length, dim = states.shape
    return states.view(batch, heads, length // chunk, chunk, dim)


def chunk_landmarks(keys: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean key of each chunk: `[B, H, n·c, D]` → `[B, H, n, D]`."""
    return chunked(keys, chunk).mean(dim=3)


def chunk_max_deviation(keys: torch.Tensor, landmarks: torch.Tensor, chunk: int) -> torch.Tensor:
    """Largest distance between a chunk's keys and its landmark, `[B, H, n]`.

    It bounds how far the landmark's score can be from the score of the chunk's best key:
    |q·k − q·landmark| ≤ |q|·‖k − landmark‖. A chunk with a large deviation is poorly summarised by its
    landmark (an *outlier*).
    """
    return (chunked(keys, chunk) - landmarks.unsqueeze(3)).norm(dim=-1).amax(dim=-1)


def low_rank_factors(keys: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD of `[B, S, F]` keys truncated to `rank`: `(U [B, S, r], diag(s)·Vᵀ [B, r, F])`, so keys ≈ U @ SV."""
    u, s, vh = torch.linalg.svd(keys.float(), full_matrices=False)
    return u[..., :rank].contiguous(), (s[..., :rank, None] * vh[..., :rank, :]).contiguous()


def chunk_scores(query: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """Each chunk's score per key head, `[B, Hkv, n]`: the largest `q · landmark` over the query heads the key
    head serves. `query [B, Hq, 1, D]`, `landmarks [B, Hkv, n, D]`."""
    batch, heads, _, dim = query.shape
    kv_heads = landmarks.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim).to(landmarks.dtype)
    return torch.matmul(grouped, landmarks.transpose(-1, -2)).amax(dim=2)


def select_chunks(
    query: torch.Tensor, landmarks: torch.Tensor, count: int, excluded: torch.Tensor | None = None
) -> torch.Tensor:
    """The `count` chunks per key head whose landmarks score highest (`chunk_scores`) against the query.

    `excluded [B, Hkv, n]` (True: never chosen, e.g. outliers kept exactly). Returns indices
    `[B, Hkv, count]`, best first.
    """
    scores = chunk_scores(query, landmarks)
    if excluded is not None:
        scores.masked_fill_(excluded, float("-inf"))
    return scores.topk(count, dim=-1, sorted=False).indices


def per_head_factor(right: torch.Tensor, head_dim: int) -> torch.Tensor:
    """`right [B, r, Hkv·D]` → `[B, Hkv, r, D]`: each key head's `D` columns of the low-rank factor."""
    batch, rank, _ = right.shape
    return right.view(batch, rank, -1, head_dim).permute(0, 2, 1, 3).contiguous()


def rebuild_keys(
    left: torch.Tensor, right_heads: torch.Tensor, batch_index: torch.Tensor, head_index: torch.Tensor,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Pre-RoPE keys of M chunks from `left [B, S, r]` and `right_heads [B, Hkv, r, D]` → `[M, c, D]`.

    Chunk m belongs to batch row `batch_index[m]` and key head `head_index[m]` and covers token
    `rows [M, c]`; each multiplies its own rows of `left` by its head's factor, in one batched matmul.
    """
    return torch.matmul(left[batch_index.unsqueeze(-1), rows], right_heads[batch_index, head_index])


def gather_chunks(chunks: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Per head, the chunks `indices [B, H, k]` of `chunks [B, H, n, c, D]` → `[B, H, k, c, D]`."""
    batch, heads, _, size, dim = chunks.shape
    index = indices[..., None, None].expand(batch, heads, indices.shape[-1], size, dim)
    return torch.gather(chunks, 2, index.to(chunks.device))
