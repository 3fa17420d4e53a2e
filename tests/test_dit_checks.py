"""What `parallelize` refuses for DiT pipelines (one process, no process group), and the shard maths."""
import pytest
import torch

import paragen
from paragen.parallel.partition import split_bounds, split_sizes
from paragen.pipelines.loading import load_pipeline


class HomemadeProcessor:
    """A processor paragen has never seen: it must be refused by name, not silently replaced."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        raise AssertionError("never called")


@pytest.mark.parametrize("model, module", [("tiny-flux", "transformer_blocks.0.attn"),
                                           ("tiny-pixart", "transformer_blocks.1.attn1"),
                                           ("tiny-sd3", "transformer_blocks.0.attn")])
def test_unknown_attention_processor_is_named(model, module):
    pipe = load_pipeline(model)
    pipe.transformer.get_submodule(module).processor = HomemadeProcessor()
    with pytest.raises(ValueError, match=f"HomemadeProcessor on {module} is not supported"):
        paragen.parallelize(pipe, paragen.ParallelConfig())
    assert not hasattr(pipe, "paragen")


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
