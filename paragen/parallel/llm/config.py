"""`KVConfig`: how each rank stores the KV cache of its sequence shard."""
from __future__ import annotations

from dataclasses import dataclass

KV_MODES = ("dense", "offload")
# ShadowKV keeps rank 160 of Llama-3-8B's 8 key heads × 128 dims (1024): the default rank is that fraction.
DEFAULT_RANK_FRACTION = 160 / 1024


@dataclass(frozen=True)
class KVConfig:
    """The KV store of one shard.

    - `mode`: `dense` keeps exact keys and values on the device (the reference); `offload` is ShadowKV:
      pre-RoPE keys as a rank-`rank` SVD on the device, values in host memory in chunks of `chunk`
      tokens, one landmark (mean post-RoPE key) per chunk and the `outliers` fraction of chunks whose
      keys stray furthest from their landmark kept exact on the device, the last `window` tokens of the
      prompt and every generated token exact on the device;
    - `budget`: the fraction of the context whose chunks each decode step fetches (top-k by landmark score);
    - `rank`: None takes 160/1024 of the key width (`kv_heads × head_dim` per rank), as ShadowKV does
      for Llama-3-8B.
    """

    mode: str = "dense"
    budget: float = 1 / 64
    rank: int | None = None
    chunk: int = 8
    window: int = 32
    outliers: float = 1 / 256

    def __post_init__(self) -> None:
        if self.mode not in KV_MODES:
            raise ValueError(f"kv mode must be one of {', '.join(KV_MODES)}; got {self.mode!r}")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"the budget is a fraction of the context in (0, 1]; got {self.budget}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"the key rank must be >= 1, got {self.rank}")
        if self.chunk < 1:
            raise ValueError(f"the chunk size must be >= 1 token, got {self.chunk}")
        if self.window < 0:
            raise ValueError(f"the local window must be >= 0 tokens, got {self.window}")
        if not 0.0 <= self.outliers < 1.0:
            raise ValueError(f"the outlier fraction must be in [0, 1), got {self.outliers}")

    def layout_tag(self, config) -> str:
        """A file-name fragment naming the layout (`config` resolved), e.g. `seq2_tp1_offload`."""
        return f"seq{config.seq}_tp{config.tp}_{self.mode}"

    def key_rank(self, key_width: int) -> int:
        """The SVD rank for keys `key_width` wide (kv heads × head dim on one rank); refuses one too large."""
        if self.rank is None:
            return max(1, round(key_width * DEFAULT_RANK_FRACTION))
        if self.rank > key_width:
            raise ValueError(
                f"key rank {self.rank} is larger than the key width allows: the keys are kv_heads × head_dim = "
                f"{key_width} wide on each rank, so the rank can be at most {key_width}"
            )
        return self.rank
