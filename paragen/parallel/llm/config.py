"""`KVConfig`: how each rank stores the KV cache of its sequence shard."""
from __future__ import annotations

from dataclasses import dataclass, field

KV_MODES = ("dense", "offload", "speculative")
FULL_CACHE_PLACES = ("device", "host")
# ShadowKV keeps rank 160 of Llama-3-8B's 8 key heads × 128 dims (1024): the default rank is that fraction.
DEFAULT_RANK_FRACTION = 160 / 1024


@dataclass(frozen=True)
class SpeculativeConfig:
    """Lossless hierarchical speculative decoding (TriForce) over the sharded dense cache.

    - `gamma`: tokens drafted per verification (one forward of `gamma + 1` tokens over the full cache);
    - `budget`: tokens of the retrieval cache the target drafts over: the first `sink` tokens, the `recent`
      last ones and the top-scoring chunks of `chunk` tokens over the whole context (landmark scores
      compared across ranks); it must not exceed the prompt;
    - `refresh_every`: rebuild the retrieval cache after this many verifications (0: never, as TriForce);
      `refresh_below`: also rebuild it when the acceptance rate of the verifications since the last build
      (at least `gamma` of them) falls below this fraction (0: never);
    - `draft_gamma`: with a draft model (the third level), the tokens it drafts per check by the retrieval
      level; `draft_sink`, `draft_window`: its StreamingLLM cache (first tokens kept, size in all);
    - `full_cache`: where each rank keeps its shard's exact keys and values — `device`, or `host` (TriForce's
      offloaded setting: host memory, streamed to the device in blocks of `host_block` tokens per verification).
    """

    gamma: int = 6
    budget: int = 4096
    chunk: int = 8
    sink: int = 16
    recent: int = 64
    refresh_every: int = 0
    refresh_below: float = 0.0
    draft_gamma: int = 4
    draft_sink: int = 16
    draft_window: int = 256
    full_cache: str = "device"
    host_block: int = 8192

    def __post_init__(self) -> None:
        if self.gamma < 1 or self.draft_gamma < 1:
            raise ValueError(f"gamma (tokens drafted per verification) must be >= 1, got {self.gamma} and draft "
                             f"gamma {self.draft_gamma}")
        if self.chunk < 1 or self.sink < 0 or self.recent < 0:
            raise ValueError(f"the retrieval chunk must be >= 1 token and sink, recent >= 0; got {self.chunk}, "
                             f"{self.sink}, {self.recent}")
        if self.budget < self.sink + self.recent + self.chunk:
            raise ValueError(f"the retrieval budget ({self.budget} tokens) must hold the sink ({self.sink}), the recent "
                             f"window ({self.recent}) and at least one chunk of {self.chunk}")
        if self.refresh_every < 0 or not 0.0 <= self.refresh_below <= 1.0:
            raise ValueError(f"refresh_every must be >= 0 and refresh_below in [0, 1]; got {self.refresh_every} and "
                             f"{self.refresh_below}")
        if self.full_cache not in FULL_CACHE_PLACES or self.host_block < 1:
            raise ValueError(f"the full cache lives on one of {', '.join(FULL_CACHE_PLACES)} (got {self.full_cache!r}), "
                             f"streamed in blocks of >= 1 token (got {self.host_block})")
        if not 0 <= self.draft_sink < self.draft_window:
            raise ValueError(f"the draft model's window ({self.draft_window}) must exceed its sink ({self.draft_sink})")

    def check_context(self, prompt_tokens: int) -> None:
        """Refuse a retrieval budget larger than the prompt (same answer on every rank)."""
        if self.budget > prompt_tokens:
            raise ValueError(f"the retrieval budget ({self.budget} tokens) is larger than the prompt ({prompt_tokens} "
                             "tokens): give a smaller --retrieval-budget, or decode densely")


@dataclass(frozen=True)
class KVConfig:
    """The KV store of one shard.

    - `mode`: `dense` keeps exact keys and values on the device (the reference); `offload` is ShadowKV:
      pre-RoPE keys as a rank-`rank` SVD on the device, values in host memory in chunks of `chunk`
      tokens, one landmark (mean post-RoPE key) per chunk and the `outliers` fraction of chunks whose
      keys stray furthest from their landmark kept exact on the device, the last `window` tokens of the
      prompt and every generated token exact on the device; `speculative` keeps the dense store and decodes by
      hierarchical speculative decoding, configured by `speculative` (`SpeculativeConfig`);
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
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

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

    @property
    def tag(self) -> str:
        """What these options add to a run's file names (after the workload's degrees): the cache mode."""
        return self.mode

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
