"""`DenseStore`: a shard's exact post-RoPE keys and values on the device (the reference KV store)."""
from __future__ import annotations

import torch

from paragen.kernels.attention import (
    causal_attention_with_lse,
    grouped_query_attention_with_lse,
    merge_attention_states,
    repeat_kv,
)


def _room(length: int) -> int:
    """Spare slots for generated tokens: 64 plus 1/64 of what is held, so a copy of the store happens
    once per that many tokens rather than per token, and the spare capacity stays a small fraction."""
    return 64 + length // 64


class DenseStore:
    """Keys and values `[B, Hkv, S, D]` of one layer's shard. `grows`: this rank stores generated tokens,
    so it keeps spare capacity for them (the others hold exactly their tokens)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, grows: bool) -> None:
        self.length = keys.shape[2]
        room = _room(self.length) if grows else 0
        self._keys = self._with_room(keys, room)
        self._values = self._with_room(values, room)

    @staticmethod
    def _with_room(states: torch.Tensor, room: int) -> torch.Tensor:
        batch, heads, length, dim = states.shape
        grown = torch.empty(batch, heads, length + room, dim, dtype=states.dtype, device=states.device,
                            pin_memory=states.is_pinned())  # a pinned host store stays pinned as it grows
        grown[:, :, :length] = states
        return grown

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add the post-RoPE keys and values of new tokens at the end."""
        count = keys.shape[2]
        if self.length + count > self._keys.shape[2]:
            room = _room(self.length) + count
            self._keys = self._with_room(self._keys[:, :, : self.length], room)
            self._values = self._with_room(self._values[:, :, : self.length], room)
        self._keys[:, :, self.length: self.length + count] = keys
        self._values[:, :, self.length: self.length + count] = values
        self.length += count

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the stored keys and values, `[B, Hkv, length, D]`."""
        return self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def attend(self, query: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of `query [B, Hq, Lq, D]` over every stored token: `(out, lse)`."""
        return grouped_query_attention_with_lse(query, *self.tokens(), scale)

    def append_and_attend(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the L new tokens' keys and values, then attend their `query [B, Hq, L, D]` causally: each over
        every earlier token and the new ones up to itself. `(out, lse)`."""
        if keys.shape[2] == 1:
            self.append(keys, values)
            return self.attend(query, scale)
        groups = query.shape[1] // keys.shape[1]
        out, lse = causal_attention_with_lse(query, repeat_kv(keys, groups), repeat_kv(values, groups), scale)
        if self.length:
            past, past_lse = self.attend(query, scale)
            out, lse = merge_attention_states(past, past_lse, out, lse)
        self.append(keys, values)
        return out, lse

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens (drop rejected drafts); the capacity stays."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot keep {length} of the {self.length} stored tokens")
        self.length = length

    def allocated_bytes(self) -> int:
        """Bytes of the store's allocated capacity."""
        return sum(t.numel() * t.element_size() for t in (self._keys, self._values))

    def device_bytes(self) -> int:
        """Bytes this store holds on the device (its allocated capacity)."""
        return self.allocated_bytes()

    def host_bytes(self) -> int:
        """Bytes this store holds in host memory (none)."""
        return 0
