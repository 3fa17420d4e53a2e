"""SANA's parts of the sharding (one process): linear attention against diffusers' own processor, its keys' state
summed over shards, shards of whole token rows, and what is refused. (Its equality on real ranks is in
test_dit_families.py.)"""
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, SanaLinearAttnProcessor2_0

import paragen
from paragen.kernels.linear_attention import key_state, relu_linear_attention
from paragen.parallel.intercept import intercepted
from paragen.parallel.sequence.context import SequenceContext
from paragen.parallel.sequence.layout import EvenShards, RowShards
from paragen.parallel.sequence.linear import LinearAttentionSite
from paragen.pipelines.dit import plans
from paragen.pipelines.loading import load_pipeline


class Alone:
    """A sequence group of one rank (its all-reduce returns its input), with a count of all-reduces."""

    rank, size, reduced = 0, 1, 0

    def all_reduce(self, tensor, label):
        self.reduced += 1
        return tensor


def _linear_attention(dtype=torch.float32) -> Attention:
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16, bias=False, processor=SanaLinearAttnProcessor2_0())
    return attn.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_linear_attention_site_computes_what_diffusers_processor_does(dtype):
    attn = _linear_attention(dtype)
    x = torch.randn(2, 35, 32).to(dtype)
    expected = attn(x)
    comm = Alone()
    LinearAttentionSite(SequenceContext(comm, comm, comm), "attn1").install(attn)
    got = attn(x)
    assert comm.reduced == 1 and got.dtype == expected.dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - expected.float()).abs().max().item() <= tolerance


def test_the_keys_state_summed_over_shards_is_the_whole_keys_state():
    q, k, v = (torch.randn(1, 2, 35, 16) for _ in range(3))
    whole = relu_linear_attention(q[:, :, :13], k, v)
    shards = [key_state(k[:, :, a:b], v[:, :, a:b]) for a, b in ((0, 14), (14, 25), (25, 35))]
    split = relu_linear_attention(q[:, :, :13], k[:, :, :14], v[:, :, :14], lambda _: sum(shards))
    assert (split - whole).abs().max().item() <= 1e-5
    assert (relu_linear_attention(q, k[:, :, :14], v[:, :, :14]) - whole[:, :, :1]).abs().max().item() > 1e-3


def test_a_module_with_another_processor_is_refused():
    attn = _linear_attention()
    attn.set_processor(AttnProcessor2_0())
    comm = Alone()
    with pytest.raises(ValueError, match="attn1: the plan says its attention is ReLU linear attention, but its "
                                         "processor is AttnProcessor2_0"):
        LinearAttentionSite(SequenceContext(comm, comm, comm), "attn1").install(attn)


@pytest.mark.parametrize("rows, cols, size", [(5, 7, 2), (5, 7, 4), (9, 3, 4), (4, 4, 4)])
def test_row_shards_hold_whole_rows_of_the_grid(rows, cols, size):
    shards = [RowShards(SimpleNamespace(rank=r, size=size), rows, cols) for r in range(size)]
    bounds = [s.bounds(rows * cols) for s in shards]
    assert bounds[0][0] == 0 and bounds[-1][1] == rows * cols
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(start % cols == 0 and end % cols == 0 for start, end in bounds)
    assert [s.rows(rows) for s in shards] == [(end - start) // cols for start, end in bounds]
    heights = [s.rows(rows) for s in shards]
    assert max(heights) - min(heights) <= 1
    # another stream (a text of 29 tokens) is cut evenly, as everywhere else
    assert [s.bounds(29) for s in shards] == [EvenShards(SimpleNamespace(rank=r, size=size)).bounds(29)
                                             for r in range(size)]


def test_row_shards_refuse_more_ranks_than_rows_and_a_block_given_another_grid():
    with pytest.raises(ValueError, match="more ranks than token rows: 4 sequence shards for a grid of 3 rows"):
        RowShards(SimpleNamespace(rank=0, size=4), 3, 64)
    with pytest.raises(RuntimeError, match="a block was given a grid of 6 rows; this forward's tokens are 5 rows"):
        RowShards(SimpleNamespace(rank=0, size=2), 5, 7).rows(6)
    with pytest.raises(RuntimeError, match="not cut by whole rows"):
        EvenShards(SimpleNamespace(rank=0, size=2)).rows(5)


def test_a_plan_that_folds_the_grid_needs_a_row_grid(monkeypatch):
    pipe = load_pipeline("tiny-sana")
    monkeypatch.delitem(plans.ROW_GRIDS, "SanaTransformer2DModel")
    with pytest.raises(ValueError, match="folds tokens back into their grid, but the class has no row grid"):
        paragen.parallelize(pipe, paragen.ParallelConfig())
    assert not hasattr(pipe, "paragen")


def test_a_sana_whose_linear_attention_has_another_processor_is_refused_before_any_change():
    pipe = load_pipeline("tiny-sana")
    pipe.transformer.get_submodule("transformer_blocks.1.attn1").set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match="SanaTransformer2DModel.transformer_blocks.1.attn1: the plan says its "
                                         "attention is ReLU linear attention"):
        paragen.parallelize(pipe, paragen.ParallelConfig())
    assert not hasattr(pipe, "paragen") and not intercepted(pipe.transformer.patch_embed, "forward")
