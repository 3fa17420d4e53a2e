"""The step cache's parts in one process: its decisions against a separately written reference, the Taylor
forecast, the step plan held fresh after a served step, the cache plans, and one-process runs of the families the
multi-rank test does not cover (Flux's two block lists, Wan2.2's two transformers)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import paragen
from paragen.parallel.intercept import intercept, interceptions
from paragen.parallel.step_cache import StepCache, StepCacheConfig
from paragen.parallel.steps import StepPlan
from paragen.pipelines.loading import load_pipeline
from paragen.pipelines.step_cache import cache_plan

ONE = SimpleNamespace(size=1)  # a world of one: no collective


def _decide(config: StepCacheConfig, probes: list[torch.Tensor]) -> list[bool]:
    cache = StepCache(config, ONE)
    cache.begin_request()
    decided = []
    for probe in probes:
        site = cache.open_call("denoiser")
        decided.append(cache.decide(site, probe))
        if decided[-1]:
            cache.store(site, (probe,))
        cache.end_step()
    return decided


def _reference(method: str, threshold: float, start: int, probes: list[torch.Tensor]) -> list[bool]:
    """First-Block Cache and TeaCache's rules as their papers state them, written apart from the cache."""
    out, reference, accumulated, previous = [], None, 0.0, None
    for step, probe in enumerate(probes):
        if method == "fbcache":
            change = None if reference is None else float((probe - reference).abs().mean() / reference.abs().mean())
            compute = step < start or change is None or not change < threshold
            if compute:
                reference = probe
        else:
            change = None if previous is None else float((probe - previous).abs().mean() / previous.abs().mean())
            if step >= start and change is not None:
                accumulated += change
            compute = step < start or change is None or accumulated >= threshold
            if compute:
                accumulated = 0.0
            previous = probe
        out.append(compute)
    return out


PROBES = [torch.full((2, 3), 1.0 + 0.3 * math.sin(i) + 0.05 * i) * torch.linspace(1, 2, 6).view(2, 3)
          for i in range(12)]


@pytest.mark.parametrize("method", ["fbcache", "teacache"])
@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.2, 0.6])
def test_probed_decisions_follow_the_papers_rules(method, threshold):
    config = StepCacheConfig(method=method, threshold=threshold, start=2)
    assert _decide(config, PROBES) == _reference(method, threshold, 2, PROBES)


def test_threshold_zero_computes_every_step_and_taylorseer_follows_its_schedule():
    assert all(_decide(StepCacheConfig(method="fbcache", threshold=0.0), [torch.ones(3)] * 6))
    schedule = _decide(StepCacheConfig(method="taylorseer", interval=3, start=2), PROBES[:10])
    assert schedule == [True, True, True, False, False, True, False, False, True, False]


@pytest.mark.parametrize("order", [1, 2])
def test_taylor_forecast_extrapolates_the_backward_differences(order):
    """Order 1 is exact on a line; order 2 is v + k∇v + k²/2 ∇²v from the last three computed steps."""
    cache = StepCache(StepCacheConfig(method="taylorseer", interval=4, order=order, start=3), ONE)
    cache.begin_request()
    value = (lambda s: 2.0 + 0.5 * s) if order == 1 else (lambda s: 1.0 - 0.3 * s + 0.25 * s * s)
    v1, v2, v3 = value(1), value(2), value(3)
    for step in range(7):
        site = cache.open_call("unet")
        if cache.decide(site, torch.zeros(1)):
            cache.store(site, (torch.tensor([value(step)], dtype=torch.float64),))
        else:
            k = step - 3
            expected = value(step) if order == 1 else v3 + k * (v3 - v2) + k * k / 2 * (v3 - 2 * v2 + v1)
            assert cache.served(site)[0].item() == pytest.approx(expected, abs=1e-9)
        cache.end_step()
    assert cache.record()["cached_steps"] == [4, 5, 6]


def test_a_served_step_publishes_nothing_and_its_successor_reads_the_last_computed_data():
    """Displaced mode, 2 warm-up steps: the cache serves from step 2 on (not before the first stale step, though
    its start is 1); the probe runs exact; a served step reads stale data but publishes none."""
    plan = StepPlan(ONE, mode="displaced", warmup_steps=2)
    plan.begin_request(8)
    cache = StepCache(StepCacheConfig(method="fbcache", threshold=0.5, start=1), ONE, plan)
    cache.begin_request()
    seen = []
    for probe in [1.0, 1.01, 1.02, 1.03, 5.0, 5.01]:
        plan.begin_step()
        site = cache.open_call("transformer")
        with cache.head_scope():
            assert not plan.stale and not plan.publish  # the probe: exact, publishing nothing
        computed = cache.decide(site, torch.tensor([probe]))
        if computed:
            cache.store(site, (torch.zeros(1),))
        seen.append((plan.stale, plan.publish))  # what the rest of the step does
        cache.end_step()
    assert cache.record()["cached_steps"] == [2, 3, 5] and cache.record()["start"] == 2
    assert seen == [(False, False), (False, True), (True, False), (True, False), (True, True), (True, False)]


def test_a_scheduled_cache_decides_before_its_head():
    plan = StepPlan(ONE, mode="displaced", warmup_steps=1)
    plan.begin_request(6)
    cache = StepCache(StepCacheConfig(method="taylorseer", interval=2, start=1), ONE, plan)
    cache.begin_request()
    heads = []
    for _ in range(6):
        plan.begin_step()
        cache.open_call("unet")
        with cache.head_scope():
            heads.append((plan.stale, plan.publish))
        cache.end_step()
    assert cache.record()["cached_steps"] == [2, 4]
    assert heads == [(False, True), (True, True), (True, False), (True, True), (True, False), (True, False)]


def test_an_innermost_interception_sees_the_call_as_the_outer_ones_pass_it():
    class Box:
        def forward(self, x):
            return [x]

    box = Box()
    intercept(box, "forward", lambda f, x: f(x * 10), tag="outer")
    intercept(box, "forward", lambda f, x: f(x + 1) + ["inner saw", x], tag="inner", innermost=True)
    assert box.forward(1) == [11, "inner saw", 10]
    assert interceptions(box, "forward") == ["outer", "inner"]


@pytest.fixture(scope="module")
def sd():
    return load_pipeline("tiny-sd")


def test_cache_plans_are_read_from_the_models(sd):
    plan = cache_plan(sd.unet)
    assert plan.kind == "features" and plan.head == "down_blocks.0"
    assert plan.body == ("down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1")  # 3 levels
    flux = cache_plan(load_pipeline("tiny-flux").transformer)
    assert flux.kind == "residual" and flux.head == "transformer_blocks.0"
    assert flux.body[-1].startswith("single_transformer_blocks.")
    assert flux.io[flux.head].encoder_index is not None and flux.io[flux.head].hidden_index == 1


def test_blocks_of_an_unknown_class_are_refused_by_its_name():
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="Linear is not a transformer block whose outputs paragen knows"):
        cache_plan(model)


def test_a_joined_stream_is_split_at_the_texts_length():
    """Flux.2 and AuraFlow join [text, image] before their last blocks: the body's residual is split back."""
    from paragen.parallel.step_cache.hooks import _body_residual

    text, image = torch.randn(1, 3, 4), torch.randn(1, 5, 4)
    end = torch.randn(1, 8, 4)
    hidden, encoder = _body_residual((end, None), (image, text), joined=True)
    assert torch.equal(hidden, end[:, 3:] - image) and torch.equal(encoder, end[:, :3] - text)
    with pytest.raises(RuntimeError, match="not the first block's 3 text and 5 image tokens joined"):
        _body_residual((torch.randn(1, 9, 4), None), (image, text), joined=True)
    hidden, encoder = _body_residual((end[:, :5], None), (image, text), joined=False)  # a last block without text
    assert torch.equal(hidden, end[:, :5] - image) and encoder is None


def test_bad_settings_are_refused():
    for bad in ({"method": "deepcache"}, {"interval": 0}, {"threshold": -1.0}, {"start": 0}, {"order": 9}):
        with pytest.raises(ValueError):
            StepCacheConfig(**bad)
    with pytest.raises(ValueError, match="needs a pipeline parallelised"):
        paragen.enable_step_cache(load_pipeline("tiny-sd"), StepCacheConfig(method="fbcache"))


def _one_process(model: str, device: str, cache: StepCacheConfig | None) -> tuple[torch.Tensor, dict | None]:
    pipe = paragen.parallelize(load_pipeline(model).to(device), paragen.ParallelConfig())
    pipe.set_progress_bar_config(disable=True)
    step_cache = paragen.enable_step_cache(pipe, cache) if cache else None
    image = pipe("a red fox", height=64, width=64, num_inference_steps=6, generator=torch.Generator().manual_seed(3),
                 output_type="pt").images
    return image.cpu(), None if step_cache is None else step_cache.last


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd"])
def test_threshold_zero_is_exact_and_served_steps_reuse_what_was_kept(model, device):
    """Flux's two block lists (its residual) and a UNet's cut (its features); on CUDA in `make gpu-check`, where the
    decision's sums live on the device."""
    plain, _ = _one_process(model, device, None)
    zero, record = _one_process(model, device, StepCacheConfig(method="fbcache", threshold=0.0))
    assert torch.equal(plain, zero) and record["cached_steps"] == []
    served, record = _one_process(model, device, StepCacheConfig(method="fbcache", threshold=10.0))
    assert record["cached_steps"] == [2, 3, 4, 5] and record["forwards"] == {"computed": 2, "served": 4}
    assert not torch.equal(plain, served) and torch.isfinite(served).all()


def test_wan22_second_transformer_starts_from_nothing_kept():
    """Each transformer keeps its own sites: the step where Wan2.2 hands over to `transformer_2` computes, whatever the
    threshold, instead of adding the first transformer's residual."""
    pipe = paragen.parallelize(load_pipeline("tiny-wan22"), paragen.ParallelConfig(),
                               paragen.TemporalAttention(scope="full"))
    pipe.set_progress_bar_config(disable=True)
    cache = paragen.enable_step_cache(pipe, StepCacheConfig(method="fbcache", threshold=10.0))
    calls = []
    for name in ("transformer", "transformer_2"):
        getattr(pipe, name).register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
    pipe("a fox", num_frames=9, height=64, width=64, num_inference_steps=8, generator=torch.Generator().manual_seed(1),
         output_type="pt")
    handover = calls.index("transformer_2") // 2  # two calls (conditional, unconditional) per step
    assert 2 < handover < 7
    assert cache.last["computed_steps"] == [0, 1, handover]
