"""What paragen runs, generated from the registry and the plans: `paragen models` and the README's model table.

One row per supported pipeline or model class: its workload and job, the degrees it splits by, its modes, its
denoiser class and where that class's sharding plan comes from (diffusers' `_cp_plan` or paragen's own), and the
embedded models built on it. `NOT_RUN` lists the families users ask for that paragen does not run yet, with why.
"""
from __future__ import annotations

import inspect
import json
import typing
from dataclasses import asdict, dataclass

from paragen.pipelines.llm.loading import EMBEDDED_LLMS
from paragen.pipelines.loading import CONFIG_DIR, EMBEDDED_MODELS, read_index
from paragen.pipelines.registry import WORKLOADS

# Families that users bring and paragen does not run yet: pipeline or transformer -> why.
NOT_RUN = {
    "Cosmos3OmniPipeline": "no context-parallel plan; its text tokens attend causally among themselves and its CFG "
                           "calls differ in text length",
    "MiniMaxH3ModularPipeline": "a modular-only pipeline (no component constructor) with a Qwen3-VL encoder and audio",
    "ChromaPipeline": "its attention mask is built in every block as the outer product of a per-token mask over "
                      "[text, image] (a float one, added to the scores), so a shard's mask rows for other shards' keys "
                      "exist nowhere; the seam would need the whole mask",
    "ChronoEditPipeline": "image editing: it needs an input image (not a text-to-image or text-to-video pipeline)",
}


@dataclass(frozen=True)
class Row:
    """One supported class."""

    pipeline: str
    workload: str
    job: str
    degrees: tuple[str, ...]
    modes: tuple[str, ...]
    denoiser: str | None  # the transformer or UNet class the pipeline takes
    plan: str | None  # "diffusers" (its `_cp_plan`), "paragen" (`dit/plans.py`), or None (not a sequence plan)
    models: tuple[str, ...]  # embedded models of this class


def _denoiser(pipeline: str) -> type | None:
    import diffusers

    cls = getattr(diffusers, pipeline, None)
    if cls is None or not inspect.isclass(cls):
        return None
    params = inspect.signature(cls.__init__).parameters
    for name in ("transformer", "unet"):
        if name in params:
            annotation = params[name].annotation
            options = typing.get_args(annotation) or (annotation,)
            return next((a for a in options if inspect.isclass(a)), None)
    return None


def rows() -> list[Row]:
    """Every supported class, in the registry's order."""
    from paragen.pipelines.dit.plans import plan_source, takes_clips

    embedded: dict[str, list[str]] = {}
    for model in EMBEDDED_MODELS:
        embedded.setdefault(read_index(CONFIG_DIR / model)["_class_name"], []).append(model)
    for model in EMBEDDED_LLMS:
        config = json.loads((CONFIG_DIR / model / "config.json").read_text(encoding="utf-8"))
        embedded.setdefault(config["architectures"][0], []).append(model)
    out = []
    for workload in WORKLOADS:
        for name in workload.accepts:
            denoiser = _denoiser(name) if workload.job != "llm" else None
            plan = plan_source(denoiser) if denoiser is not None and workload.sharding_plans else None
            degrees, modes = workload.degrees, workload.modes
            if plan is not None and "clip" in degrees and not takes_clips(denoiser):
                degrees = tuple(d for d in degrees if d != "clip")
                modes = tuple(m for m in modes if not m.startswith("clips"))
            out.append(Row(name, workload.name, workload.job, degrees, modes,
                           denoiser.__name__ if denoiser else None, plan, tuple(embedded.get(name, ()))))
    return out


def as_json() -> str:
    """The catalogue as JSON: the supported rows and the families not run, with why."""
    return json.dumps({"supported": [asdict(r) for r in rows()], "not_run": NOT_RUN}, indent=2)


def as_text() -> str:
    """The catalogue as an aligned text table."""
    head = ("pipeline / model", "workload", "job", "degrees", "plan", "embedded")
    lines = [head] + [(r.pipeline, r.workload, r.job, ",".join(r.degrees), r.plan or "-", ",".join(r.models) or "-")
                      for r in rows()]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text += ["", "not run yet:"] + [f"  {name}: {why}" for name, why in NOT_RUN.items()]
    return "\n".join(text)


def as_markdown() -> str:
    """The README's model table."""
    lines = ["| pipeline / model | workload (job) | degrees | modes | denoiser | sharding plan | embedded models |",
             "|---|---|---|---|---|---|---|"]
    for r in rows():
        lines.append(f"| {r.pipeline} | {r.workload} ({r.job}) | {', '.join(r.degrees)} | {', '.join(r.modes)} | "
                     f"{r.denoiser or '-'} | {r.plan or '-'} | {', '.join(f'`{m}`' for m in r.models) or '-'} |")
    lines += ["", "Not run yet:", ""] + [f"- **{name}**: {why}." for name, why in NOT_RUN.items()]
    return "\n".join(lines)
