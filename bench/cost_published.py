"""The cost model against published multi-GPU timings, and its projections past them.

    python bench/cost_published.py      # writes bench/results/cost_model_published.json

Each check reproduces a published setup's shapes (model config from `bench/published/configs/`, resolution, frames,
steps, guidance, dtype, GPU, layout) and predicts its time with the shipped GPU profile, which was not fitted to
any of these figures (`paragen/pipelines/cost/devices.py`). What a figure includes is in
`bench/published/tables.json`; text encoding is left out of every prediction (it is milliseconds for these
prompts). The projections rank every legal layout of larger requests on 8, 64 and 256 H100s (8 per node): SDXL
at 8192², FLUX.1-dev at 4096², Wan2.1-14B for 1,025 frames, and Llama-3.1 8B and 70B with a 1M-token prompt.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from paragen.parallel.clip import TemporalAttention  # noqa: E402
from paragen.parallel.config import ExchangeConfig  # noqa: E402
from paragen.pipelines.cost.devices import GPUS  # noqa: E402
from paragen.pipelines.cost.llm import rank_llm_plans  # noqa: E402
from paragen.pipelines.cost.model import Placement  # noqa: E402
from paragen.pipelines.cost.plan import Layout, ModelCost, model_cost, predict, rank_plans  # noqa: E402
from paragen.pipelines.jobs.image import ImageRequest  # noqa: E402
from paragen.pipelines.jobs.video import VideoRequest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "bench/published/configs"
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Check:
    """One published figure: what ran, and what was measured (seconds, or a speed-up over `baseline`)."""

    name: str
    source: str
    model: str
    request: Any
    gpu: str
    workload: str
    degrees: dict[str, int]
    options: Any
    published: float
    decode: bool  # the figure includes the VAE decode
    baseline: dict[str, int] | None = None  # a speed-up: the 1-GPU layout it is over
    text: int | None = None  # prompt tokens, where the setup sets them (xDiT's FLUX example: 256)


def _image(model: str, side: int, steps: int, guidance: float | None = None) -> ImageRequest:
    return ImageRequest(model=str(CONFIGS / model), height=side, width=side, steps=steps, guidance_scale=guidance)


def _distrifusion(side: int, gpus: int, speedup: float) -> Check:
    # DistriFusion splits the CFG batch first (2 GPUs: cfg only), then patches; 4 warm-up steps = paragen's 5.
    patch = max(1, gpus // 2)
    return Check(f"DistriFusion SDXL {side}² {gpus}×A100 speed-up", "distrifusion_sdxl_speedups", "sdxl",
                 _image("sdxl", side, 50, 5.0), "a100", "patch", {"cfg": 2, "patch": patch},
                 ExchangeConfig(mode="displaced", warmup_steps=5), speedup, False, {"cfg": 1, "patch": 1})


def _xdit_flux(gpus: int, runtime: str, seconds: float) -> Check:
    # xDiT's FLUX example: 256 prompt tokens, one transformer pass per step (guidance-distilled), Ulysses over GPUs
    layout = f", Ulysses {gpus}" if gpus > 1 else ""
    return Check(f"xDiT FLUX.1-dev 1024² 28 steps {gpus}×H100{layout}, {runtime} (s)", "xdit_flux_dev_4xH100",
                 "flux-dev", _image("flux-dev", 1024, 28), "h100", "dit", {"ulysses": gpus, "ring": 1},
                 ExchangeConfig(), seconds, True, text=256)


def _xdit_hunyuan(gpus: int, seconds: float) -> Check:
    layout = f", Ulysses {gpus}" if gpus > 1 else ""
    return Check(f"xDiT HunyuanVideo 1280×720 129 frames 50 steps {gpus}×H100{layout} (s)", "xdit_hunyuanvideo_ulysses",
                 "hunyuanvideo", VideoRequest(model=str(CONFIGS / "hunyuanvideo"), height=720, width=1280,
                                              frames=129, steps=50), "h100", "dit-video",
                 {"ulysses": gpus, "ring": 1, "clip": 1}, TemporalAttention(), seconds, True)


CHECKS = [
    _distrifusion(3840, 2, 1.8), _distrifusion(3840, 4, 3.4), _distrifusion(3840, 8, 6.1),
    Check("DistriFusion SDXL 3840² 1×A100 (s)", "distrifusion_sdxl_speedups", "sdxl", _image("sdxl", 3840, 50, 5.0),
          "a100", "patch", {"cfg": 1, "patch": 1}, ExchangeConfig(), 140.0, False),
    _xdit_flux(1, "torch.compile", 4.30), _xdit_flux(4, "torch.compile", 1.63), _xdit_flux(1, "PyTorch", 6.71),
    _xdit_flux(4, "PyTorch", 4.24),
    _xdit_hunyuan(1, 1904.08), _xdit_hunyuan(8, 337.58),
]
LLMS = ("llama-3.1-8b", "llama-3.1-70b")
LLM_CONTEXT, LLM_NEW_TOKENS = 1 << 20, 256
PROJECTIONS = [
    ("SDXL 8192² (50 steps)", "image", _image("sdxl", 8192, 50, 5.0)),
    ("FLUX.1-dev 4096² (28 steps)", "image", _image("flux-dev", 4096, 28, 3.5)),
    ("Wan2.1-14B 1025 frames 480×832 (50 steps)", "video",
     VideoRequest(model=str(CONFIGS / "wan2.1-14b"), height=480, width=832, frames=1025, steps=50)),
]


def predicted(check: Check) -> tuple[float, dict]:
    """The check's predicted figure, and the plan behind it."""
    cost = model_cost(check.request.model, DTYPE)
    if check.text is not None:
        cost = ModelCost(check.request.model, DTYPE)
        cost.text = check.text
    gpus = 1
    for value in check.degrees.values():
        gpus *= value
    device = GPUS[check.gpu]
    layout = Layout(check.workload, tuple(check.degrees.items()), check.options)
    plan = predict(cost, check.request, layout, Placement(gpus, 8), device)
    seconds = plan.request_s if check.decode else plan.steps * plan.step_s
    if check.baseline is None:
        return seconds, plan.as_dict()
    one = predict(cost, check.request, Layout(check.workload, tuple(check.baseline.items()), ExchangeConfig()),
                  Placement(1, 8), device)
    return (one.steps * one.step_s) / seconds, plan.as_dict()


def main() -> None:
    rows = []
    for check in CHECKS:
        value, plan = predicted(check)
        rows.append({"check": check.name, "source": check.source, "published": check.published, "predicted": value,
                     "error": value / check.published - 1, "plan": plan})
        print(f"{check.name}: published {check.published:g}, predicted {value:.3g} "
              f"({100 * (value / check.published - 1):+.0f} %)", file=sys.stderr)
    projections = []
    for name, job, request in PROJECTIONS:
        for gpus in (8, 64, 256):
            plans, _ = rank_plans(request, job, Placement(gpus, 8), GPUS["h100"], DTYPE)
            best = plans[0].as_dict() if plans else None
            projections.append({"request": name, "gpus": gpus, "nodes": gpus // 8, "device": "h100", "best": best,
                                "layouts": len(plans)})
            if best:
                print(f"{name} on {gpus} H100: {best['layout']}, {best['request_s']:.4g} s, "
                      f"{best['memory_bytes'] / 2**30:.1f} GiB/rank{'' if best['fits'] else ' (does not fit)'}",
                      file=sys.stderr)
    for model in LLMS:
        for gpus in (8, 64, 256):
            plans, refused = rank_llm_plans(str(CONFIGS / model), LLM_CONTEXT, LLM_NEW_TOKENS, Placement(gpus, 8),
                                            GPUS["h100"], DTYPE)
            best = plans[0].as_dict() if plans else None
            projections.append({"request": f"{model} {LLM_CONTEXT}-token prompt, {LLM_NEW_TOKENS} new tokens",
                                "gpus": gpus, "nodes": gpus // 8, "device": "h100", "best": best,
                                "layouts": len(plans), "refused": refused})
            if best:
                print(f"{model} 1M context on {gpus} H100: {best['layout']}, prefill {best['prefill_s']:.4g} s, "
                      f"decode {best['decode_s_per_token'] * 1e3:.3g} ms/token, "
                      f"{best['memory_bytes'] / 2**30:.1f} GiB/rank{'' if best['fits'] else ' (does not fit)'}",
                      file=sys.stderr)
    result = {"checks": rows, "within_25_percent": sum(abs(r["error"]) <= 0.25 for r in rows), "count": len(rows),
              "projections": projections}
    Path(ROOT, "bench/results/cost_model_published.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
