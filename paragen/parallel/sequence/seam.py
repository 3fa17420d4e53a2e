"""The one attention seam: every planned attention module's attention runs through `SequenceAttention`.

Every diffusers attention ends in torch's scaled-dot-product attention: the processors built on
`dispatch_attention_fn` through its native backend, the older processors (PixArt, SD3, SANA, CogVideoX, …) by
calling it themselves, after their projections, norms and rotary embedding, on the rank's own tokens. So that
call is the seam: while a planned attention module runs (its `forward` intercepted with tag `sequence.attention`),
`torch.nn.functional.scaled_dot_product_attention` goes to the module's `AttentionSite` instead; at any other time,
and inside the site itself, it is torch's own. No processor is replaced and no library code is copied.

A site learns, once per request, sequence shape and attention call of its forward, every shard's query and key
lengths (one small all-gather on the sequence group), so the same code serves self-attention over split tokens,
joint attention over split text and image tokens, and attention of split queries to split keys of another length:
- queries and keys of the same lengths, with no mask or a padding mask over the keys: Ulysses, Ring, both, or
  displaced (`SequenceAttention`). Keys the mask hides from every query (a prompt's padding) are left out, which is
  exact and cheaper; a mask that still hides or biases some keys (batch elements padded differently) is folded into
  one more channel of q, k and v, so that it travels with its keys;
- otherwise (a mask that depends on the query, a cross-attention to a split text): every shard's keys, values and
  mask gathered, then the module's attention on its own queries (exact; the text is short). With clips, where the
  queries are whole on every rank and the keys are the clip's video (LTX-2's audio attending to the video), the
  clips' partial attentions are merged by log-sum-exp over the clips.
A site that ends without reaching the seam (an attention backend such as flash-attn called directly) is an error,
not a silently local attention. Modules whose keys are whole on every rank (the plan's `replicated`) get no site.
"""
from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Any, Callable, Hashable

import torch
import torch.nn.functional as F

from paragen.comms import GroupComm
from paragen.kernels.attention import attention_with_lse
from paragen.parallel.intercept import intercept
from paragen.parallel.sequence.attention import OutsideKeys, SequenceAttention, merge_over_group
from paragen.parallel.sequence.context import SequenceContext

TAG = "sequence.attention"
_SITE: ContextVar["AttentionSite | None"] = ContextVar("paragen_attention_site", default=None)
TORCH_SDPA = F.scaled_dot_product_attention  # torch's own, kept before `open_seam` takes its name


def _seam(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
          dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
          **kwargs: Any) -> torch.Tensor:
    """torch's `scaled_dot_product_attention`, or the running site's when a planned attention module runs."""
    site = _SITE.get()
    if site is None:
        return TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa, **kwargs)
    token = _SITE.set(None)  # the site's own attention kernels are torch's
    try:
        return site.attend(query, key, value, attn_mask, dropout_p, is_causal, scale)
    finally:
        _SITE.reset(token)


def open_seam() -> None:
    """Route torch's scaled-dot-product attention through the seam (idempotent; a no-op outside sites)."""
    F.scaled_dot_product_attention = _seam


def _per_key(mask: torch.Tensor, keys: int) -> bool:
    """Whether `mask` depends on the key alone (`[B, 1, 1, keys]`: a padding mask over the keys)."""
    return mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1 and mask.shape[3] == keys


def _hidden(mask: torch.Tensor) -> torch.Tensor:
    """Where a mask (boolean: True is seen; additive: -inf is not) hides a key."""
    return ~mask if mask.dtype == torch.bool else mask == float("-inf")


def _drop_unseen(key: torch.Tensor, value: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keys and values without the keys that a per-key `mask` hides from every query of every batch element (a
    prompt's padding), and the mask over the keys left, or None where it no longer hides or biases any: attention
    over the keys left is the masked attention, and costs less. A shard whose keys are all hidden keeps them."""
    seen = ~_hidden(mask)[:, 0, 0].all(0)
    if bool(seen.any()) and not bool(seen.all()):
        index = seen.nonzero().squeeze(1)
        key, value, mask = key.index_select(2, index), value.index_select(2, index), mask.index_select(3, index)
    neutral = bool(mask.all()) if mask.dtype == torch.bool else not bool(mask.any())
    return key, value, None if neutral else mask


def _fold_key_bias(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                   scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v with a per-key mask folded into one more channel, so that unmasked attention over them (at the
    default scale of the wider head) is the masked attention: `scale·q·k + bias`, the bias riding with its key
    through Ulysses, Ring and the clips' exchange. A boolean mask's excluded keys get a bias of -1e4 (a weight
    of exactly 0 in fp32 beside any kept key), not -inf, so that a block of excluded keys merges without NaN."""
    width = query.shape[-1]
    wider = math.sqrt(width + 1)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, -1e4)
    bias = mask.to(query.dtype)[:, :, 0, :, None].expand(key.shape[0], key.shape[1], key.shape[2], 1)
    query = torch.cat([query * ((scale or 1 / math.sqrt(width)) * wider), query.new_ones(*query.shape[:-1], 1)], -1)
    key = torch.cat([key, bias * wider], -1)
    value = torch.cat([value, value.new_zeros(*value.shape[:-1], 1)], -1)
    return query, key, value


class AttentionSite:
    """One attention module's sequence-parallel attention (it keeps that module's stale K/V and lengths)."""

    def __init__(self, ctx: SequenceContext, name: str, shape: Callable[[], Hashable] = tuple,
                 outside: OutsideKeys | None = None,
                 clip_video: Callable[[], tuple[list[int], str] | None] = lambda: None,
                 clips: GroupComm | None = None) -> None:
        """`shape`: what every rank knows alike of the current forward's sequence (its streams' whole lengths): the
        lengths learnt for one shape are reused only for that shape (two guidance calls may differ in text).
        `outside` (clips): the K/V this shard also sees of the other clips, for the self-attention over the clip's
        video tokens; `clip_video()` gives every shard's video tokens in the clip and where a joint attention puts
        its text among the keys ("before", "after"; "": the keys must be the video tokens alone). `clips`: for a
        module whose queries are whole on every rank and whose keys are the clip's video tokens, the ranks holding
        the same shard of the other clips, over which the clips' partial attentions are merged."""
        self.ctx, self.name, self.shape, self.clip_video = ctx, name, shape, clip_video
        self.outside, self.clips = outside, clips
        self.core = SequenceAttention(ctx)
        self.clip_core = None if outside is None else SequenceAttention(ctx, self._outside)
        self._video = (0, 0)  # this call's video tokens among the shard's keys, for the outside exchange
        self.lengths: dict[Hashable, tuple[list[int], list[int]]] = {}  # (shape, call) -> every shard's q, k lengths
        self.calls = 0
        ctx.on_reset(self.reset)

    def reset(self) -> None:
        self.lengths = {}

    def install(self, module: torch.nn.Module) -> None:
        """Route `module`'s attention through this site while its forward runs."""
        intercept(module, "forward", self._around, tag=TAG)

    def _around(self, forward, *args, **kwargs):
        self.calls = 0
        token = _SITE.set(self)
        try:
            output = forward(*args, **kwargs)
        finally:
            _SITE.reset(token)
        if self.calls == 0:
            raise RuntimeError(f"{self.name}: its attention did not go through torch's scaled_dot_product_attention, "
                               "so paragen cannot shard it (an attention backend such as flash-attn or sage is set); "
                               "use diffusers' native backend (`set_attention_backend('native')`)")
        return output

    def _sees_clips(self, keys: list[int]) -> bool:
        """Whether this call is the clip's self-attention over its video tokens (then `_video` says where they are
        among this shard's keys)."""
        clip = self.clip_video()
        if clip is None:
            return False
        video, text = clip
        if keys != video and not (text and all(k >= v for k, v in zip(keys, video))):
            return False
        mine, rank = video[self.ctx.comm.rank], self.ctx.comm.rank
        start = keys[rank] - mine if text == "before" else 0
        self._video = (start, start + mine)
        return True

    def _outside(self, key: torch.Tensor, value: torch.Tensor):
        start, stop = self._video
        return self.outside(key[:, :, start:stop], value[:, :, start:stop])

    def attend(self, query, key, value, mask, dropout_p, is_causal, scale) -> torch.Tensor:
        """The attention of this shard's queries over every shard's keys, `[B, H, Lq, D]` like torch's."""
        call, self.calls = (self.shape(), self.calls), self.calls + 1
        if dropout_p or is_causal:
            raise ValueError(f"{self.name}: sequence-parallel attention takes neither dropout nor a causal mask")
        if key.shape[1] != query.shape[1]:  # grouped-query attention
            key, value = (t.repeat_interleave(query.shape[1] // key.shape[1], dim=1) for t in (key, value))
        per_key = mask is not None and _per_key(mask, key.shape[2])
        mine = [query.shape[2], key.shape[2]]
        if per_key:  # the keys no query sees are left out; what the shards keep can change with every call
            key, value, mask = _drop_unseen(key, value, mask)
        queries, keys, kept, masked = self._lengths(call, [*mine, key.shape[2], int(mask is not None)],
                                                    query.device, learn=per_key)
        if mask is None and any(masked):  # another shard's keys keep a mask: every shard attends alike
            mask = query.new_zeros(key.shape[0], 1, 1, key.shape[2])
        if queries == keys and (mask is None or per_key):
            width = query.shape[-1]
            if mask is not None:
                query, key, value = _fold_key_bias(query, key, value, mask, scale)
            elif scale is not None:
                query = query * (scale * math.sqrt(width))
            core = self.clip_core if self.clip_core is not None and self._sees_clips(kept) else self.core
            return core(query, key, value, kept, queries).transpose(1, 2)[..., :width]
        comm, label = self.ctx.comm, self.ctx.label("attn.gathered_kv")
        key, value = (comm.all_gather_varlen(t.contiguous(), 2, kept, label) for t in (key, value))
        if self.clips is not None and self.clips.size > 1:
            return self._over_clips(query, key, value, mask, scale)
        if mask is not None and mask.shape[-1] == kept[comm.rank] != key.shape[2]:
            flags = mask.dtype == torch.bool  # gathered as bytes: not every backend moves bools
            whole = mask.expand(*key.shape[:2], mask.shape[-2], mask.shape[-1]).to(torch.uint8 if flags else mask.dtype)
            mask = comm.all_gather_varlen(whole.contiguous(), 3, kept, label)
            mask = mask.bool() if flags else mask
        return TORCH_SDPA(query, key, value, attn_mask=mask, scale=scale)

    def _over_clips(self, query, key, value, mask, scale) -> torch.Tensor:
        """Attention of queries that every clip holds alike over the video keys of all clips: this clip's part, the
        clips' parts gathered and merged by log-sum-exp (exact; every rank merges the same parts alike)."""
        if mask is not None:
            raise ValueError(f"{self.name}: a mask on an attention whose keys are the video of every clip is not "
                             "supported with clips")
        out, lse = attention_with_lse(query, key, value, scale)
        return merge_over_group(self.clips, out, lse, self.ctx.label("attn.clip_parts"), query.dtype)

    def _lengths(self, call: Hashable, mine: list[int], device: torch.device, learn: bool) -> tuple[list[int], ...]:
        """Every shard's query, key and kept-key lengths for this call, and whether its kept keys still carry a
        mask: gathered the first time the call is seen in a request, or every time where `learn` (keys were
        left out by a mask: how many can change from call to call)."""
        rank = self.ctx.comm.rank
        if learn or call not in self.lengths:
            gathered = self.ctx.comm.all_gather(torch.tensor(mine, device=device), self.ctx.label("attn.lengths"))
            self.lengths[call] = tuple(gathered.view(-1, len(mine)).t().tolist())
        lengths = self.lengths[call]
        if [lengths[0][rank], lengths[1][rank]] != mine[:2]:
            raise RuntimeError(f"{self.name}: attention call {call} got {mine[0]} queries and {mine[1]} keys, earlier "
                               f"in this request {[lengths[0][rank], lengths[1][rank]]}")
        return lengths
