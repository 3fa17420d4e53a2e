"""Attention with log-sum-exp, and the exact merge of partial attentions."""
import pytest
import torch
import torch.nn.functional as F

from paragen.kernels import attention_with_lse, merge_attention_states
from paragen.kernels.attention import reference_attention_with_lse


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, 40, 16, generator=g), torch.randn(2, 3, 70, 16, generator=g),
            torch.randn(2, 3, 70, 16, generator=g))


def test_attention_with_lse_matches_definition(qkv):
    q, k, v = qkv
    out, lse = attention_with_lse(q, k, v)
    scores = q @ k.transpose(-1, -2) / 4.0
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    assert torch.allclose(lse, scores.logsumexp(-1), atol=1e-5)
    ref_out, ref_lse = reference_attention_with_lse(q, k, v)
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)


@pytest.mark.parametrize("cut", [1, 23, 69])
def test_merge_equals_attention_over_union(qkv, cut):
    q, k, v = qkv
    a = attention_with_lse(q, k[:, :, :cut], v[:, :, :cut])
    b = attention_with_lse(q, k[:, :, cut:], v[:, :, cut:])
    out, lse = merge_attention_states(*a, *b)
    full_out, full_lse = attention_with_lse(q, k, v)
    assert torch.allclose(out, full_out, atol=1e-5)
    assert torch.allclose(lse, full_lse, atol=1e-5)
