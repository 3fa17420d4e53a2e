"""The step cache on every embedded diffusion family in one process (the block lists and output positions of each
transformer class, DeepCache's cut of each UNet): at threshold 0 the output equals the uncached run bit for bit, and
a threshold every step passes serves every step from the cache's start with a finite output of the same shape."""
from __future__ import annotations

import pytest
import torch

import paragen
from paragen.pipelines.loading import load_pipeline
from tests.workers.family_worker import CALLS

pytestmark = pytest.mark.slow  # twenty families, three runs each

FAMILIES = {**CALLS, "tiny-sd": dict(height=64, width=64), "tiny-sdxl": dict(height=128, width=128),
            "tiny-sd3": dict(height=64, width=64), "tiny-flux": dict(height=64, width=64),
            "tiny-pixart": dict(height=128, width=128, use_resolution_binning=False),
            "tiny-t2v": dict(height=64, width=64, num_frames=8),
            "tiny-animatediff": dict(height=64, width=64, num_frames=8),
            "tiny-wan": dict(height=64, width=64, num_frames=9)}
STEPS = 5


def _run(model: str, cache: dict | None) -> tuple[torch.Tensor, dict | None]:
    pipe = paragen.parallelize(load_pipeline(model), paragen.ParallelConfig())
    pipe.set_progress_bar_config(disable=True)
    step_cache = paragen.enable_step_cache(pipe, paragen.StepCacheConfig(**cache)) if cache else None
    out = pipe(prompt="a red fox in the snow", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7),
               output_type="pt", **FAMILIES[model])
    out = out.frames if hasattr(out, "frames") else out.images
    return torch.as_tensor(out), None if step_cache is None else step_cache.last


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_every_family_caches(model):
    plain, _ = _run(model, None)
    zero, record = _run(model, {"method": "fbcache", "threshold": 0.0})
    assert torch.equal(plain, zero) and record["cached_steps"] == []
    served, record = _run(model, {"method": "fbcache", "threshold": 10.0})
    assert record["cached_steps"] == list(range(2, STEPS))
    assert served.shape == plain.shape and torch.isfinite(served).all()
