"""Make three image requests one at a time and then as one batch, in a job prepared batch-invariant (as `paragen
serve --max-batch` prepares it); rank 0 saves each way's PNG bytes and the batch's reports.

usage: batch_worker.py SPEC.json OUT.pt   (SPEC: a list of {"name", "flags": the `paragen image` options, "out"})
"""
import argparse
import dataclasses
from pathlib import Path

from paragen.launch.env import discover
from paragen.launch.runner import JobRunner
from paragen.pipelines.jobs import image
from tests.workers.specs import serve_specs

PROMPTS = (("a red fox", 3), ("a blue lighthouse at night", 11), ("a red fox", 4))  # the third: the first, another seed


def run(spec: dict) -> dict:
    parser = argparse.ArgumentParser()
    image.add_arguments(parser)
    args = parser.parse_args([*spec["flags"], "--out", spec["out"]])
    args.device = "cpu"
    job = dataclasses.replace(image.prepare(args, discover()), batch_invariant=True)
    runner = JobRunner.prepared("image", image, job)
    runner.load()
    items = {way: [runner.checked(runner.request(prompt=prompt, seed=seed, name=f"{spec['name']}-{way}-{i}"))
                   for i, (prompt, seed) in enumerate(PROMPTS)] for way in ("alone", "batched")}
    alone = [runner.generate_batch([item]) for item in items["alone"]]
    batched = runner.generate_batch(items["batched"])
    if batched is None:
        return {}
    return {"alone": [Path(reports[0]["image"]).read_bytes() for reports in alone],
            "batched": [Path(report["image"]).read_bytes() for report in batched],
            "batch": [report.get("batch") for report in batched],
            "seeds": [report["request"]["seed"] for report in batched]}


if __name__ == "__main__":
    serve_specs(run)
