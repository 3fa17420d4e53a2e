"""Compute primitives shared by the parallel layers (no communication here)."""
from paragen.kernels.attention import attention_with_lse, dense_attention, merge_attention_states

__all__ = ["attention_with_lse", "dense_attention", "merge_attention_states"]
