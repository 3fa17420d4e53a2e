"""`DenseStore`: a shard's exact post-RoPE keys and values on the device (the reference KV store)."""
from __future__ import annotations

import torch

from paragen.kernels.attention import grouped_query_attention_with_lse

# Generated tokens are appended into spare capacity grown by this many slots at a time, not by a
# copy of the whole cache per token.
GROWTH = 256


class DenseStore:
    """Keys and values `[B, Hkv, S, D]` of one layer's shard, with room to append generated tokens."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.length = keys.shape[2]
        self._keys = self._with_room(keys)
        self._values = self._with_room(values)

    def _with_room(self, states: torch.Tensor) -> torch.Tensor:
        batch, heads, length, dim = states.shape
        grown = states.new_empty(batch, heads, length + GROWTH, dim)
        grown[:, :, :length] = states
        return grown

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add the post-RoPE keys and values of new tokens at the end."""
        count = keys.shape[2]
        if self.length + count > self._keys.shape[2]:
            self._keys = self._with_room(self._keys[:, :, : self.length])
            self._values = self._with_room(self._values[:, :, : self.length])
        self._keys[:, :, self.length: self.length + count] = keys
        self._values[:, :, self.length: self.length + count] = values
        self.length += count

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the stored keys and values, `[B, Hkv, length, D]`."""
        return self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def attend(self, query: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of `query [B, Hq, Lq, D]` over every stored token: `(out, lse)`."""
        return grouped_query_attention_with_lse(query, *self.tokens(), scale)

    def device_bytes(self) -> int:
        """Bytes this store holds on the device (its allocated capacity)."""
        return sum(t.numel() * t.element_size() for t in (self._keys, self._values))

    def host_bytes(self) -> int:
        """Bytes this store holds in host memory (none)."""
        return 0
