"""The token choice of speculative decoding: logits to the distribution a token is drawn from, and the test of
drafted tokens against the target's distributions.

Sampled verification is the standard rejection scheme (Leviathan et al., Chen et al.; TriForce uses it at
each level): drafted token x with draft probability q(x) and target probability p(x) is kept with
probability min(1, p(x)/q(x)); at the first rejection the replacement is drawn from the residual
max(0, p − q) renormalised, and when every drafted token is kept a bonus token is drawn from the target's
next distribution. Each emitted token then follows p exactly, whatever q is. Greedy verification keeps
drafted tokens while they equal the target's argmax, and emits the argmax where they first differ.
Batch size 1: a row of distributions per position.
"""
from __future__ import annotations

import torch


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """`[N, V]` logits → the `[N, V]` fp32 distributions sampling draws from: softmax at `temperature`, then,
    for `top_p` < 1, only the most likely tokens whose mass first reaches `top_p` (renormalised)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    ordered, order = probs.sort(dim=-1, descending=True)
    before = ordered.cumsum(dim=-1) - ordered  # the mass of the tokens ranked above each one
    ordered = ordered.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, ordered)
    return kept / kept.sum(dim=-1, keepdim=True)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token drawn from the distribution `probs [V]`."""
    return int(torch.multinomial(probs, 1, generator=generator))


def verify_greedy(target_logits: torch.Tensor, drafted: torch.Tensor) -> tuple[int, int]:
    """`(kept, next)`: how many of the `γ` `drafted` tokens equal the target's argmax at their position
    (`target_logits [γ+1, V]`, row i predicting drafted token i), and the target's token after them."""
    best = target_logits.argmax(dim=-1)
    kept = int(torch.cumprod((best[: len(drafted)] == drafted).int(), dim=0).sum()) if len(drafted) else 0
    return kept, int(best[kept])


def verify_sampled(
    target: torch.Tensor, draft: torch.Tensor, drafted: torch.Tensor, generator: torch.Generator | None
) -> tuple[int, int]:
    """`(kept, next)` by the rejection test: `target [γ+1, V]` and `draft [γ, V]` are the distributions
    (`sampling_probs`) at the `γ` `drafted` tokens' positions (the target's last row is the bonus position)."""
    for i, token in enumerate(drafted.tolist()):
        p, q = float(target[i, token]), float(draft[i, token])
        if float(torch.rand((), generator=generator)) * q < p:
            continue
        residual = (target[i] - draft[i]).clamp_min(0.0)
        total = float(residual.sum())
        return i, draw(residual / total if total > 0 else target[i], generator)
    return len(drafted), draw(target[len(drafted)], generator)
