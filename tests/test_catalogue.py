"""`paragen models`: the catalogue generated from the registry and the plans, and the README's table made from it."""
import json
import re
from pathlib import Path

from paragen.launch.cli import main
from paragen.pipelines import catalogue
from paragen.pipelines.registry import WORKLOADS

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_table_is_the_generated_one():
    table = re.search(r"<!-- models:begin -->\n(.*)\n<!-- models:end -->", README.read_text(encoding="utf-8"), re.S)
    assert table is not None, "README.md lost its models:begin/end markers"
    assert table.group(1) == catalogue.as_markdown(), "regenerate it: paragen models --markdown"


def test_models_json_lists_every_class_with_its_plan_source(capsys):
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    rows = {(r["pipeline"], r["workload"]): r for r in listed["supported"]}
    assert set(rows) == {(name, w.name) for w in WORKLOADS for name in w.accepts}
    # written separately from the code: which classes diffusers plans and which paragen plans (diffusers 0.42)
    expected = {"FluxPipeline": "diffusers", "Flux2KleinPipeline": "diffusers", "QwenImagePipeline": "diffusers",
                "WanPipeline": "diffusers", "LTXPipeline": "diffusers", "HeliosPipeline": "paragen", "PixArtSigmaPipeline": "paragen",
                "StableDiffusion3Pipeline": "paragen", "ZImagePipeline": "paragen", "CogVideoXPipeline": "paragen",
                "HunyuanVideoPipeline": "paragen", "MochiPipeline": "paragen", "HunyuanDiTPipeline": "paragen",
                "AuraFlowPipeline": "paragen", "Lumina2Pipeline": "paragen", "AllegroPipeline": "paragen",
                "SanaPipeline": "paragen", "LTX2Pipeline": "paragen"}
    assert {r["pipeline"]: r["plan"] for r in rows.values() if r["plan"]} == {**expected, "PixArtAlphaPipeline": "paragen",
                                                                              "Flux2Pipeline": "diffusers"}
    assert rows["LTXPipeline", "dit-video"]["models"] == ["tiny-ltx"]
    assert rows["LlamaForCausalLM", "llm"]["models"][0] == "tiny-llama"
    assert "ChromaPipeline" in listed["not_run"] and "SanaPipeline" not in listed["not_run"]


def test_every_class_a_plan_workload_takes_has_a_plan():
    for row in catalogue.rows():
        workload = next(w for w in WORKLOADS if w.name == row.workload)
        if workload.sharding_plans:
            assert row.plan is not None, f"{row.pipeline} ({row.denoiser}) is registered without a sharding plan"
