"""What `parallelize` refuses for DiT pipelines (one process, no process group), and the shard maths."""
import re

import pytest
import torch

import paragen
from paragen.parallel.partition import split_bounds, split_sizes
from paragen.parallel.attention_contract import heads_first
from paragen.parallel.intercept import intercepted
from paragen.parallel.sequence.apply import PlannedSharding
from paragen.parallel.sequence.plan import Gather, Length, ShardingPlan, Split, from_diffusers
from paragen.pipelines.dit import plans
from paragen.pipelines.loading import load_pipeline


class ManualAttentionProcessor:
    """A processor that computes attention itself (as a flash-attn backend would), never through torch's SDPA."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        q, k, v = (heads_first(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        return attn.to_out[0]((weights @ v).transpose(1, 2).flatten(2))


def test_attention_that_bypasses_the_seam_is_an_error_naming_the_module():
    pipe = paragen.parallelize(load_pipeline("tiny-pixart"), paragen.ParallelConfig())
    pipe.transformer.get_submodule("transformer_blocks.1.attn1").processor = ManualAttentionProcessor()
    with pytest.raises(RuntimeError, match="transformer_blocks.1.attn1: its attention did not go through"):
        pipe("a cat", height=64, width=64, num_inference_steps=1, output_type="pt", use_resolution_binning=False)


def test_a_plan_naming_a_module_the_model_lacks_is_refused_before_any_change(monkeypatch):
    pipe = load_pipeline("tiny-pixart")
    plan = plans.OWN_PLANS["PixArtTransformer2DModel"]
    monkeypatch.setitem(plans.OWN_PLANS, "PixArtTransformer2DModel",
                        ShardingPlan({**plan.modules, "final_norm": Gather(1, 3)}, plan.replicated))
    with pytest.raises(ValueError, match="names module 'final_norm', which PixArtTransformer2DModel does not have"):
        paragen.parallelize(pipe, paragen.ParallelConfig())
    assert not hasattr(pipe, "paragen") and not intercepted(pipe.transformer.pos_embed, "forward")


def test_a_diffusers_plan_is_read_as_it_is_declared():
    """FluxTransformer2DModel's `_cp_plan` (diffusers 0.42): both streams and their position ids cut at the
    transformer's input, the output gathered at `proj_out`; no attention module sees whole keys."""
    from diffusers import FluxTransformer2DModel

    plan = from_diffusers(FluxTransformer2DModel._cp_plan)
    assert plan.source == "diffusers" and plan.replicated == ()
    assert plan.splits() == [("", "hidden_states", Split(1, 3)), ("", "encoder_hidden_states", Split(1, 3)),
                             ("", "img_ids", Split(0, 2)), ("", "txt_ids", Split(0, 2))]
    assert plan.gathers() == [("proj_out", (Gather(1, 3),))]


class SecondHalf:
    """The layout of the second of two shards, without a process group."""

    def bounds(self, length: int) -> tuple[int, int]:
        return length // 2, length


def test_a_split_of_a_tuple_element_cuts_that_element_alone():
    """`input.i` (Allegro's rotary embedding, (tables, positions)): element i is cut, the other elements pass whole;
    an input that is no such tuple is an error naming the split."""

    class Toy(torch.nn.Module):
        def forward(self, emb, scale=1):
            return emb

    toy = Toy()
    PlannedSharding(ShardingPlan({"": {"emb.1": Split(1, 2)}}), SecondHalf, "toy.").install(toy)
    tables = (torch.randn(5, 4), torch.randn(5, 4))
    positions = tuple(torch.arange(7)[None] + i for i in range(3))
    got_tables, got_positions = toy((tables, positions))
    assert got_tables is tables
    assert all(torch.equal(got, whole[:, 3:]) for got, whole in zip(got_positions, positions))
    with pytest.raises(RuntimeError, match="a split of 'emb.1' expected a tuple with an element 1, got Tensor"):
        toy(torch.randn(7, 4))


class Halves:
    """The layout of the second of two shards, its gathers recorded (and answered with zeros of the whole length)."""

    def __init__(self):
        self.gathered = []

    def bounds(self, length: int) -> tuple[int, int]:
        return length // 2, length

    def gather(self, tensor, dim, length, label):
        self.gathered.append(length)
        return tensor.new_zeros(*tensor.shape[:dim], length, *tensor.shape[dim + 1:])


def test_a_module_that_cuts_and_gathers_its_own_input_gathers_by_the_length_it_cut():
    """Diffusers' Helios plan cuts and gathers around each attention; its cross-attention sees only the newest
    frames' tokens, fewer than the self-attention's (history + newest): each gathers by the length it cut."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])

        def forward(self, x):
            return self.blocks[1](self.blocks[0](x)[:, -5:])

    block, layout = Block(), Halves()
    plan = ShardingPlan({"blocks.*": {"input": Split(1, 3)}, "blocks.0": Gather(1, 3), "blocks.1": Gather(1, 3)})
    PlannedSharding(plan, lambda: layout, "toy.").install(block)
    assert block(torch.randn(1, 12, 4)).shape == (1, 5, 4)
    assert layout.gathered == [12, 5]


def test_a_split_with_alternatives_cuts_by_the_dimensions_the_tensor_has():
    """LTX-2's rotary tables are [B, L, D] or, where its config's rope_type is "split", [B, H, L, D/2]: one plan
    entry gives both cuts, and the tensor's dimensions choose."""

    class Rope(torch.nn.Module):
        def forward(self, table):
            return table, table

    rope = Rope()
    cut = (Split(1, 3, output=True), Split(2, 4, output=True))
    PlannedSharding(ShardingPlan({"": {0: cut, 1: cut}}), SecondHalf, "toy.").install(rope)
    interleaved, split = torch.randn(1, 8, 6), torch.randn(1, 2, 8, 3)
    assert all(torch.equal(got, interleaved[:, 4:]) for got in rope(interleaved))
    assert all(torch.equal(got, split[:, :, 4:]) for got in rope(split))
    other = torch.randn(8, 6)
    assert all(got is other for got in rope(other))  # neither: left whole


def test_a_stream_length_input_becomes_the_shards_and_a_join_learns_its_rest():
    """Helios' blocks get [history, newest] tokens and the newest frames' count: the count is learnt as that stream's
    length and replaced by the shard's; the history is the rest of the joined sequence; each part is cut by its own
    stream (the second of two shards: history 6 → [3, 6), newest 5 → [2, 5)); the output gathers the newest."""

    class Block(torch.nn.Module):
        def forward(self, tokens, newest):
            seen.append((tokens, newest))
            return tokens[:, -newest:]

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.out = Block(), torch.nn.Identity()

        def forward(self, tokens, newest):
            return self.out(self.block(tokens, newest))

    model, layout, seen = Model(), Halves(), []
    parts = ("history", "newest")
    plan = ShardingPlan({"block": {"tokens": Split(1, 3, joins=parts), "newest": Length("newest")},
                         "out": Gather(1, 3, stream="newest")})
    sharding = PlannedSharding(plan, lambda: layout, "toy.")
    sharding.install(model)
    tokens = torch.arange(11.0).view(1, 11, 1)
    output = model(tokens, 5)
    (cut, newest), = seen
    assert cut.flatten().tolist() == [3.0, 4.0, 5.0, 8.0, 9.0, 10.0] and newest == 3
    assert output.shape == (1, 5, 1) and layout.gathered == [5]
    assert sharding.lengths == {"newest": 5, "history": 6}
    with pytest.raises(RuntimeError, match="got 4 tokens along dim 1, fewer than the streams it joins"):
        sharding.begin_forward()
        model(tokens[:, :4], 5)


def test_refusals_name_the_problem():
    pipe = load_pipeline("tiny-pixart")
    with pytest.raises(ValueError, match="partial.*UNet pipelines"):
        paragen.parallelize(pipe, paragen.ParallelConfig(), paragen.ExchangeConfig(mode="partial"))
    with pytest.raises(ValueError, match="ulysses and ring shard a diffusion transformer"):
        paragen.parallelize(load_pipeline("tiny-sd"), paragen.ParallelConfig(ulysses=2, patch=1))
    with pytest.raises(TypeError, match="supports StableDiffusionPipeline"):
        paragen.parallelize(object())


def test_single_rank_parallelize_keeps_the_output():
    reference = load_pipeline("tiny-flux")
    pipe = paragen.parallelize(load_pipeline("tiny-flux"), paragen.ParallelConfig())
    kwargs = dict(height=64, width=64, num_inference_steps=2, max_sequence_length=16, output_type="pt")
    expected = reference("a cat", generator=torch.Generator().manual_seed(1), **kwargs).images
    got = pipe("a cat", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert (got - expected).abs().max().item() <= 1e-5
    assert type(pipe).__name__ == "FluxPipeline" and len(pipe.paragen.step_seconds) == 2


@pytest.mark.parametrize("tokens, parts", [(81, 2), (81, 4), (64, 4), (5, 5), (3969, 8)])
def test_shards_cover_the_sequence_evenly(tokens, parts):
    sizes = split_sizes(tokens, parts)
    assert sum(sizes) == tokens and max(sizes) - min(sizes) <= 1
    bounds = [split_bounds(tokens, parts, i) for i in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == tokens
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_clips_are_refused_for_a_video_transformer_without_a_grid(monkeypatch):
    """Without a video grid (where its call gives the latent frames) clip > 1 is refused before any process group,
    with the layout that works; with one the same check passes."""
    from paragen.pipelines import registry

    workload = registry.find("LTXPipeline")
    config = workload.resolve(paragen.ParallelConfig(clip=2), world=2)
    pipe = load_pipeline("tiny-ltx")
    workload.check(pipe, config, paragen.TemporalAttention())
    monkeypatch.delitem(plans.VIDEO_GRIDS, "LTXVideoTransformer3DModel")
    with pytest.raises(ValueError, match="clips need a video grid.*LTXVideoTransformer3DModel has none.*clip=1"):
        workload.check(pipe, config, paragen.TemporalAttention())


def test_a_video_grid_naming_a_module_the_model_lacks_is_refused(monkeypatch):
    """The modules a video grid names (`whole_queries`: LTX-2's audio attending to every clip's video) are checked
    like a plan's, before any process group."""
    import dataclasses

    from paragen.pipelines import registry

    workload = registry.find("LTX2Pipeline")
    config = workload.resolve(paragen.ParallelConfig(clip=2), world=2)
    pipe = load_pipeline("tiny-ltx2")
    workload.check(pipe, config, paragen.TemporalAttention())
    grid = plans.VIDEO_GRIDS["LTX2VideoTransformer3DModel"]
    monkeypatch.setitem(plans.VIDEO_GRIDS, "LTX2VideoTransformer3DModel",
                        dataclasses.replace(grid, whole_queries=("transformer_blocks.*.audio_to_text_attn",)))
    with pytest.raises(ValueError, match=re.escape("names module 'transformer_blocks.*.audio_to_text_attn', which "
                                                   "LTX2VideoTransformer3DModel does not have")):
        workload.check(pipe, config, paragen.TemporalAttention())
