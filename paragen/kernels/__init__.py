"""Compute primitives shared by the parallel layers (no communication here)."""
from paragen.kernels.attention import attention_with_lse, dense_attention, merge_attention_states
from paragen.kernels.linear_attention import relu_linear_attention

__all__ = ["attention_with_lse", "dense_attention", "merge_attention_states", "relu_linear_attention"]
