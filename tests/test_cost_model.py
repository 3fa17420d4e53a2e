"""The cost model and `paragen plan` (`paragen/pipelines/cost/`).

- The planner lists exactly the layouts the registry accepts on the real pipeline (its checks run here on the
  loaded embedded model, not on the planner's weightless stand-in), one per layout without exchanges.
- A traced call counts what torch's own FLOP counter counts, on real tensors.
- Calibration: a fit over measured numbers is deterministic and recovers known rates from synthetic ones.
- Groups that span nodes: their share of remote peers follows the mesh's rank order.
- `paragen plan` ranks by predicted time and refuses bad input with a clear error; `--layout auto` runs the first
  plan (2 ranks).
(The byte counts equal the run reports': tests/test_image_parallel.py and tests/test_dit_parallel.py compare
`request_bytes` with the counts of their runs.)
"""
from __future__ import annotations

import itertools
import json
import math
import os

import numpy
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from paragen.launch.cli import main
from paragen.parallel import ParallelConfig
from paragen.parallel.config import MODES, ExchangeConfig
from paragen.pipelines import registry
from paragen.pipelines.cost.calibrate import RankedSample, Sample, fit, fit_ranks
from paragen.pipelines.cost.devices import profile
from paragen.pipelines.cost.inputs import CALLS, Latent
from paragen.pipelines.cost.model import Placement, group_span
from paragen.pipelines.cost.plan import TIE, Layout, layouts, model_cost, rank_plans, request_bytes
from paragen.pipelines.cost.trace import trace_call
from paragen.pipelines.jobs.image import ImageRequest
from paragen.pipelines.jobs.video import VideoRequest
from paragen.pipelines.loading import load_pipeline
from tests.multiproc import check_all_ok, run_ranks

REQUESTS = {"tiny-sd": ImageRequest(model="tiny-sd", height=64, width=64, steps=2),
            "tiny-pixart": ImageRequest(model="tiny-pixart", height=128, width=128, steps=2),
            "tiny-flux": ImageRequest(model="tiny-flux", height=128, width=128, steps=2),
            "tiny-wan": VideoRequest(model="tiny-wan", height=64, width=64, frames=9, steps=2)}


def _registry_accepts(pipe, request, job: str, world: int) -> set[tuple]:
    """Every (workload, degrees, mode) the registry's checks accept on the loaded pipeline, written out here: the
    degrees' every product equal to `world`, each exchange mode where a layout exchanges."""
    accepted = set()
    for workload in registry.job_workloads(job):
        if type(pipe).__name__ not in workload.accepts or not workload.planned:
            continue
        ranges = [registry.DEGREE_CHOICES.get(d, range(1, world + 1)) for d in workload.degrees]
        for values in itertools.product(*ranges):
            if math.prod(values) != world:
                continue
            degrees = tuple(zip(workload.degrees, values))
            exchanges = any(v > 1 for d, v in degrees if d != "cfg") and workload.options is ExchangeConfig
            modes = MODES if exchanges else ("sync",)
            for mode in modes:
                options = ExchangeConfig(mode=mode) if workload.options is ExchangeConfig else workload.options()
                try:
                    config = workload.resolve(ParallelConfig(**dict(degrees)), world)
                    workload.check(pipe, config, options)
                    workload.check_request(request, config, options)
                except (ValueError, TypeError):
                    continue
                accepted.add((workload.name, degrees, mode if exchanges else None))
    return accepted


@pytest.mark.parametrize("model", list(REQUESTS))
def test_planner_lists_exactly_the_layouts_the_registry_accepts(model):
    request = REQUESTS[model]
    job = "video" if isinstance(request, VideoRequest) else "image"
    pipe = load_pipeline(model)
    cost = model_cost(model, torch.float32)
    for world in (2, 4):
        found, refused = layouts(cost, request, job, world)
        listed = {(x.workload, x.degrees, x.mode if any(v > 1 for d, v in x.degrees if d != "cfg") and
                   isinstance(x.options, ExchangeConfig) else None) for x in found}
        assert len(listed) == len(found)  # no layout twice
        assert listed == _registry_accepts(pipe, request, job, world), f"{model} on {world} ranks"
    if model == "tiny-flux":  # its refusals say why: no CFG batch, no PCPP for transformers
        assert any("cfg=2 needs a pipeline that batches" in why for why in refused)
        assert any("partial" in why for why in refused)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-pixart", "tiny-flux"])
def test_traced_flops_equal_torch_flop_counter_on_real_tensors(model):
    """The meta-device trace counts matmul and conv FLOPs as torch's FlopCounterMode does on a real forward (its
    attention counted apart: torch's counter sees the CPU's decomposed attention as matmuls)."""
    cost = model_cost(model, torch.float32)
    request = REQUESTS[model]
    rows = request.height // cost.facts.vae.factor
    trace = cost.call(1, 1, rows, rows)
    pipe = load_pipeline(model)
    denoiser = getattr(pipe, cost.facts.denoiser)
    real = {k: torch.randn(v.shape) if isinstance(v, torch.Tensor) else v
            for k, v in CALLS[cost.denoiser_class](denoiser.config, Latent(1, 1, rows, rows, cost.text),
                                                   torch.float32).items()}
    if "img_ids" in real:  # Flux's positions: small integers, as the pipeline makes them
        real["img_ids"], real["txt_ids"] = torch.zeros_like(real["img_ids"]), torch.zeros_like(real["txt_ids"])
    with FlopCounterMode(display=False) as counter, torch.no_grad(), \
            torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        denoiser(**real)
    counted = counter.get_total_flops()
    attention = trace.flops("attention")
    assert counted == pytest.approx(trace.flops("matmul") + trace.flops("conv") + attention, rel=1e-9)
    assert attention > 0 and len(trace.attentions) > 0


def test_calibration_is_deterministic_and_recovers_known_rates():
    rng = numpy.random.default_rng(0)
    truth = numpy.array([1 / 6e10, 1 / 1.2e11, 1 / 8e10, 0.0, 4e-5])  # s per FLOP (3 classes), per byte, per launch
    samples = [Sample(f"s{i}", tuple(float(v) for v in features), float(features @ truth))
               for i, features in enumerate(rng.uniform([1e9, 0, 1e8, 1e6, 100], [5e10, 4e9, 2e10, 1e9, 2000],
                                                        size=(8, 5)))]
    first, worst = fit(samples)
    assert numpy.array_equal(first, fit(samples)[0])
    assert first == pytest.approx(truth, rel=1e-6, abs=1e-18)
    assert worst < 1e-9
    ranked = [RankedSample(f"r{i}", c, n, b, 1.1 * c + n * 2e-3 + b / 5e8)
              for i, (c, n, b) in enumerate([(0.05, 60, 1e6), (0.05, 1, 4e3), (0.04, 9, 2e6), (0.2, 30, 8e6)])]
    contention, link, worst = fit_ranks(ranked, "test")
    assert (contention, link.latency, link.bandwidth) == pytest.approx((1.1, 2e-3, 5e8), rel=1e-6)
    assert fit_ranks(ranked, "test") == (contention, link, worst)


def test_group_span_follows_the_mesh_order():
    two_nodes = Placement(16, 8)
    degrees = {"ulysses": 8, "ring": 2}  # ulysses innermost: its 8 ranks are one node's
    assert group_span("ulysses", degrees, two_nodes) == (8, 0.0)
    assert group_span("ring", degrees, two_nodes) == (2, 1.0)  # its 2 ranks are 8 apart: the other node
    assert group_span("world", degrees, two_nodes) == (16, 8 / 15)
    assert group_span("ulysses", degrees, Placement(16, 16)) == (8, 0.0)
    assert group_span("patch", {"cfg": 2, "patch": 8}, two_nodes) == (8, 0.0)
    assert group_span("cfg", {"cfg": 2, "patch": 8}, two_nodes) == (2, 1.0)


def test_plan_command_ranks_by_predicted_time(capsys):
    assert main(["plan", "image", "--model", "tiny-pixart", "--height", "256", "--width", "256", "--gpus", "4",
                 "--device", "h100", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    times = [p["request_s"] for p in answer["plans"]]
    assert len(times) >= 8 and all(b >= a / (1 + TIE) for a, b in zip(times, times[1:]))  # an exact layout
    # goes before a stale one predicted less than TIE faster
    first = answer["plans"][0]
    assert first["memory_bytes"] > 0 and first["bytes_per_step_inter"] == 0  # 4 ranks fit one node
    assert main(["plan", "image", "--model", "tiny-pixart", "--height", "256", "--width", "256", "--gpus", "16",
                 "--nodes", "2", "--device", "a100", "--json"]) == 0
    spread = json.loads(capsys.readouterr().out)["plans"]
    assert any(p["bytes_per_step_inter"] > 0 for p in spread)


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "3", "--nodes", "2"], "spread evenly"),
    (["--gpus", "0"], "spread evenly"),
    (["--model", "tiny-sd3", "--gpus", "2"], "no cost model for SD3Transformer2DModel"),
    (["--gpus", "2", "--device", "tpu"], "invalid choice"),
])
def test_plan_command_refuses_bad_input(argv, message, capsys, caplog):
    try:
        status = main(["plan", "image", *argv])
    except SystemExit as stop:  # argparse's own refusal
        status = stop.code
    assert status == 2
    assert message in caplog.text + capsys.readouterr().err


@pytest.mark.slow
def test_layout_auto_runs_the_first_plan(tmp_path):
    request = ImageRequest(model="tiny-sd", height=64, width=64, steps=2)
    threads = max(1, (os.cpu_count() or 1) // 2)
    plans, _ = rank_plans(request, "image", Placement(2, 2, threads), profile("cpu"), torch.float32)
    first = plans[0].layout
    results = run_ranks(["-m", "paragen", "image", "--model", "tiny-sd", "--height", "64", "--width", "64",
                         "--steps", "2", "--layout", "auto", "--out", str(tmp_path), "--name", "auto"], 2)
    check_all_ok(results)
    report = json.loads((tmp_path / "auto.json").read_text())
    ran = {degree: report["config"][degree] for degree, _ in first.degrees}
    assert ran == dict(first.degrees)
    assert report["exchange"]["mode"] == first.mode


def test_llm_plans_list_the_layouts_the_registry_accepts(capsys):
    from transformers import AutoConfig

    from paragen.parallel.llm.config import KVConfig
    from paragen.pipelines.llm.loading import model_root

    config = AutoConfig.from_pretrained(model_root("tiny-llama"))
    workload = registry.find("LlamaForCausalLM", KVConfig())
    accepted = set()
    for tp in (1, 2, 4):
        try:
            resolved = workload.resolve(ParallelConfig(seq=4 // tp, tp=tp), 4)
            workload.check(config, resolved, KVConfig())
        except ValueError:
            continue
        accepted.add(f"--seq={4 // tp} --tp={tp}")
    assert main(["plan", "llm", "--model", "tiny-llama", "--context", "8192", "--new-tokens", "8", "--gpus", "4",
                 "--device", "a100", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert {" ".join(p["arguments"]) for p in plans} == accepted
    times = [p["request_s"] for p in plans]
    assert times == sorted(times)
    for p in plans:  # a longer prompt costs more, and a token after the prompt less than the prompt
        assert p["prefill_s"] > p["decode_s_per_token"] > 0 and p["memory_bytes"] > 0


@pytest.mark.slow
def test_partial_bytes_of_a_wide_image_equal_the_run_report(tmp_path):
    """PCPP's neighbour rows on a non-square latent (its rows and columns taken apart by the request's aspect)."""
    results = run_ranks(["-m", "paragen", "image", "--model", "tiny-sd", "--height", "128", "--width", "192",
                         "--patch", "2", "--mode", "partial", "--warmup-steps", "1", "--steps", "4",
                         "--out", str(tmp_path), "--name", "wide"], 2)
    check_all_ok(results)
    counted = json.loads((tmp_path / "wide.json").read_text())["comm_per_rank"]
    request = ImageRequest(model="tiny-sd", height=128, width=192, steps=4)
    layout = Layout("patch", (("cfg", 1), ("patch", 2)), ExchangeConfig(mode="partial", warmup_steps=1))
    for rank in (0, 1):
        predicted = request_bytes(model_cost("tiny-sd", torch.float32), request, layout, 2, rank)
        assert predicted == {label: counted[str(rank)][label]["bytes_recv"] for label in predicted}, f"rank {rank}"
