"""Attention that also returns its log-sum-exp, and the exact merge of two partial attentions.

Attention over a key set K = K_a ∪ K_b can be computed as two attentions over K_a and K_b and merged:
    lse = logaddexp(lse_a, lse_b);  out = exp(lse_a - lse)·out_a + exp(lse_b - lse)·out_b
This is what lets a rank attend over its own keys while the other ranks' keys are still in flight.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Queries per chunk in the reference path, so scores never exceed ~chunk × keys elements per head.
_REFERENCE_QUERY_CHUNK = 1024


def _fused_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None, causal: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The device's fused attention kernel that also returns the log-sum-exp; None where there is none."""
    if query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16, torch.float16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, attn_mask=None, scale=scale
        )
        return out, lse.float()
    if query.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, None, True, is_causal=causal, scale=scale
        )[:2]
        return out, lse.float()
    return None


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention over `[B, H, L, D]` tensors; returns `(out [B,H,Lq,D], lse [B,H,Lq] fp32)`."""
    fused = _fused_attention_with_lse(query, key, value, scale, causal=False)
    return fused if fused is not None else reference_attention_with_lse(query, key, value, scale)


def reference_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch attention with log-sum-exp, chunked over queries to bound memory."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    outs, lses = [], []
    for q in query.split(_REFERENCE_QUERY_CHUNK, dim=2):
        scores = (q.float() @ key.float().transpose(-1, -2)) * scale
        lse = torch.logsumexp(scores, dim=-1)
        outs.append((torch.exp(scores - lse.unsqueeze(-1)) @ value.float()).to(query.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact combination of two attentions of the same queries over disjoint key sets."""
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).unsqueeze(-1)
    weight_b = torch.exp(lse_b - lse).unsqueeze(-1)
    out = (out_a.float() * weight_a + out_b.float() * weight_b).to(out_a.dtype)
    return out, lse


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Non-causal attention without the log-sum-exp (the fused backend of the device)."""
    return F.scaled_dot_product_attention(query, key, value)


def masked_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over `[B, H, L, D]` with an additive `[Lq, Lk]` mask (-inf: not seen); returns (out, lse fp32).

    A query that sees no key gets a zero output and lse -inf, so that merging it with another part's
    attention (`merge_attention_states`) gives that part's attention unchanged.
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)).mul_(scale).add_(mask)
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(scores - finite.unsqueeze(-1))
    return torch.matmul(weights, value.float()).to(query.dtype), lse


def causal_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of `[B, H, L, D]` queries over keys at the same positions; returns (out, lse fp32)."""
    fused = _fused_attention_with_lse(query, key, value, scale, causal=True)
    if fused is not None:
        return fused
    length = query.shape[-2]
    future = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
    mask = torch.zeros(length, length, device=query.device).masked_fill(future, float("-inf"))
    return masked_attention_with_lse(query, key, value, mask, scale)


def merge_attention_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact combination of N partial attentions `outs [N, …, D]`, `lses [N, …]` over disjoint key sets.

    A part with lse -inf (it saw no key) gets weight 0. The result does not depend on which rank
    computes it: every rank that merges the same gathered parts gets bit-identical output.
    """
    lse = torch.logsumexp(lses, dim=0)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lses - finite.unsqueeze(0)).unsqueeze(-1)
    return (outs.float() * weights).sum(dim=0).to(outs.dtype), lse


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """`[B, Hkv, L, D]` → `[B, Hkv·groups, L, D]`: each key/value head serves `groups` query heads."""
    if groups == 1:
        return states
    batch, heads, length, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


def grouped_query_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention of `[B, Hq, Lq, D]` queries over `[B, Hkv, Lk, D]` keys (Hq a multiple of Hkv).

    The query heads sharing one key head are folded into the query length, so the keys are read once
    per key head instead of being repeated (decode: `Lq` = 1).
    """
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    folded = query.reshape(batch, kv_heads, (heads // kv_heads) * length, dim)
    out, lse = attention_with_lse(folded, key, value, scale)
    return out.reshape(batch, heads, length, dim), lse.reshape(batch, heads, length)
