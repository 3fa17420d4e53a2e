"""Attention processors for a model whose image rows are spread over the band group.

Queries are the band's own tokens. What crosses ranks is the attention *input* (the band's hidden
states, C channels), not its keys and values (2C): every rank projects K/V for the tokens it receives.
That halves the traffic for the price of projecting the other bands' tokens, which is small next to
attention itself (tokens·C² against tokens²·C). The keys and values are those of:
- fresh steps: every band, gathered now. The gather starts before the band's own projections; the
  band attends over its own keys meanwhile and merges the other bands' part with log-sum-exp, so the
  exchange hides behind that compute. Exact.
- stale steps (displaced): this band's fresh inputs plus the other bands' inputs of the previous step;
  this step's inputs leave asynchronously in the flat stale buffer.
- stale steps (partial, PCPP): this band's fresh inputs plus the nearest `partial_fraction` of the
  rows of the band above and below from the previous step, sent point-to-point.
Cross-attention keys come from the text, identical on every band: they are projected once per request.

The processors follow diffusers' `AttnProcessor2_0` contract (spatial norm, 4-D inputs, group norm,
residual, output rescale, q/k norms), so they work for UNet transformer blocks and VAE mid-blocks.
"""
from __future__ import annotations

import torch

from paragen.comms import Pending, Slot, ready
from paragen.kernels import attention_with_lse, dense_attention, merge_attention_states
from paragen.parallel.attention_contract import AttnProcessorContract, heads_first
from paragen.parallel.partition import partial_rows
from paragen.parallel.patch.context import PatchContext

KNOWN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0")


def check_processor(module_name: str, processor: object) -> None:
    """Refuse attention processors whose behaviour paragen would silently change."""
    name = type(processor).__name__
    if name not in KNOWN_PROCESSORS and not isinstance(processor, AttnProcessorContract):
        raise ValueError(
            f"attention processor {name} on {module_name} is not supported by patch parallelism "
            f"(supported: {', '.join(KNOWN_PROCESSORS)}); reset it with `set_default_attn_processor()` "
            "or remove the adapter before calling paragen.parallelize"
        )


class PatchCrossAttnProcessor(AttnProcessorContract):
    """Cross-attention whose text keys/values are projected once per request and reused."""

    def __init__(self, ctx: PatchContext) -> None:
        super().__init__(ctx)
        self._key: tuple | None = None
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None
        ctx.on_reset(self.reset)

    def reset(self) -> None:
        """Forget the cached text keys/values (at the end of each request)."""
        self._key = self._kv = None

    def attend(self, attn, hidden_states, encoder_hidden_states):
        text = encoder_hidden_states
        identity = (text.data_ptr(), tuple(text.shape), text.stride(), text._version, text.dtype)
        if self._kv is None or self._key != identity:
            source = attn.norm_encoder_hidden_states(text) if attn.norm_cross else text
            key, value = heads_first(attn.to_k(source), attn.heads), heads_first(attn.to_v(source), attn.heads)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            self._key, self._kv = identity, (key, value)
        query = heads_first(attn.to_q(hidden_states), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        return dense_attention(query, *self._kv)


class PatchSelfAttnProcessor(AttnProcessorContract):
    """Self-attention over the whole image from a band of queries; see the module docstring."""

    def __init__(self, ctx: PatchContext) -> None:
        super().__init__(ctx)
        self._stale: Slot | Pending | None = None
        ctx.on_reset(self.reset)

    def reset(self) -> None:
        """Drop the attention inputs kept for the next step."""
        self._stale = None

    def attend(self, attn, hidden_states, encoder_hidden_states):
        if encoder_hidden_states is not None:
            raise ValueError("a self-attention layer was given encoder states (only_cross_attention is not supported)")
        ctx = self.ctx
        if ctx.stale:
            keys_from = self._with_stale(hidden_states)
            query = self._query(attn, hidden_states)
            return dense_attention(query, *self._key_value(attn, keys_from))
        pending = ctx.comm.all_gather_async(hidden_states, ctx.label("attn_kv"))
        query = self._query(attn, hidden_states)
        out, lse = attention_with_lse(query, *self._key_value(attn, hidden_states))
        everyone = pending.wait()  # [bands, B, tokens, channels]
        if ctx.publish:
            tokens = hidden_states.shape[1]
            self._stale = ready(self._neighbour_rows(everyone, tokens)) if ctx.partial else ready(everyone)
        if ctx.comm.size == 1:
            return out
        others = torch.cat([*everyone[: ctx.comm.rank], *everyone[ctx.comm.rank + 1 :]], dim=1)
        remote_out, remote_lse = attention_with_lse(query, *self._key_value(attn, others))
        return merge_attention_states(out, lse, remote_out, remote_lse)[0]

    @staticmethod
    def _query(attn, hidden_states: torch.Tensor) -> torch.Tensor:
        query = heads_first(attn.to_q(hidden_states), attn.heads)
        return attn.norm_q(query) if attn.norm_q is not None else query

    @staticmethod
    def _key_value(attn, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = heads_first(attn.to_k(hidden_states), attn.heads)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return key, heads_first(attn.to_v(hidden_states), attn.heads)

    def _with_stale(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Own fresh inputs joined with what the other bands sent last step; publish this step's."""
        ctx = self.ctx
        previous = self._stale.wait()  # type: ignore[union-attr]
        if ctx.partial:
            from_prev, from_next = previous
            rows = self._rows_per_neighbour(hidden_states.shape[1])
            if ctx.publish:
                self._stale = ctx.comm.exchange_neighbours_async(
                    hidden_states[:, :rows], hidden_states[:, -rows:], ctx.label("attn_kv")
                )
            return torch.cat([p for p in (from_prev, hidden_states, from_next) if p is not None], dim=1)
        parts = list(previous)
        parts[ctx.comm.rank] = hidden_states
        joined = torch.cat(parts, dim=1)  # copied out before publishing: a full bucket relaunches into `previous`
        if ctx.publish:
            self._stale = ctx.stale_gather.submit(hidden_states, ctx.label("attn_kv"))
        return joined

    def _rows_per_neighbour(self, tokens: int) -> int:
        """Tokens of a neighbouring band that partial attention sees (whole image rows)."""
        band_rows, cols = self.ctx.band_grid(tokens)
        return partial_rows(band_rows, self.ctx.partial_fraction) * cols

    def _neighbour_rows(self, everyone: torch.Tensor, tokens: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """From a full gather, the rows partial attention would have received from the neighbours."""
        rank, size, rows = self.ctx.comm.rank, self.ctx.comm.size, self._rows_per_neighbour(tokens)
        from_prev = everyone[rank - 1][:, tokens - rows :].contiguous() if rank > 0 else None
        from_next = everyone[rank + 1][:, :rows].contiguous() if rank < size - 1 else None
        return from_prev, from_next
