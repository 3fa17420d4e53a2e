"""The workload registry: a new workload is a package and a record; every record and job is complete."""
import importlib

import pytest
import torch

from paragen.parallel import ExchangeConfig, HiresConfig, ParallelConfig, TemporalAttention
from paragen.parallel.llm.config import KVConfig
from paragen.pipelines import registry
from paragen.pipelines.memory_estimate import TERMS
from tests.toy_workload import ToyModel, ToyOptions

TOY = registry.Workload("toy", ("ToyModel",), ToyOptions, ("clip",), "clip", "tests.toy_workload", "video", "toy",
                        "the toy splits by clip only", tag=("clip",))


def test_a_new_workload_is_a_package_and_a_record():
    workloads = registry.WORKLOADS + (TOY,)
    assert registry.find("ToyModel", None, workloads) is TOY
    assert registry.find("ToyModel", ToyOptions(), workloads) is TOY
    model = TOY.parallelize(ToyModel(), ParallelConfig(), ToyOptions(scale=3.0))
    config, options = model.paragen
    assert config == ParallelConfig(cfg=1, patch=1, ulysses=1, ring=1, clip=1, seq=1, tp=1)
    assert model(torch.ones(2)).tolist() == [6.0, 6.0]
    assert TOY.name_tag(config, options) == "clip1_toy3"
    with pytest.raises(ValueError, match="scale must be positive"):
        TOY.parallelize(ToyModel(), None, ToyOptions(scale=0.0))
    with pytest.raises(ValueError, match="patch=2: the toy splits by clip only"):
        TOY.resolve(ParallelConfig(patch=2), 2)
    with pytest.raises(TypeError, match=r"patch and dit support .*; got ToyModel \(with ExchangeConfig options\)"):
        registry.find("ToyModel", ExchangeConfig(), workloads)
    with pytest.raises(TypeError, match="ToyModel takes options of type ToyOptions; got int"):
        registry.find("ToyModel", 3, workloads)


def test_options_pick_the_workload_of_a_pipeline():
    assert registry.find("StableDiffusionPipeline").name == "patch"
    assert registry.find("StableDiffusionPipeline", HiresConfig()).name == "hires"
    assert registry.find("FluxPipeline", ExchangeConfig()).name == "dit"
    with pytest.raises(TypeError, match="hires supports StableDiffusionPipeline, StableDiffusionXLPipeline; got Flux"):
        registry.find("FluxPipeline", HiresConfig())
    with pytest.raises(TypeError, match="supports StableDiffusionPipeline"):
        registry.find("object")


@pytest.mark.parametrize("workload", registry.WORKLOADS, ids=lambda w: w.name)
def test_every_record_names_a_package_with_check_and_install_and_a_job(workload):
    package = importlib.import_module(workload.package)
    assert callable(package.check) and callable(package.install)
    assert workload.fill in workload.degrees and workload.job in registry.JOBS
    resolved = workload.resolve(ParallelConfig(), 4)
    assert getattr(resolved, workload.fill) == 4  # the ranks left over
    assert set(workload.degree_help) == set(workload.degrees)
    assert workload.name_tag(resolved, workload.options()).endswith(workload.options().tag)
    if workload.job in ("image", "video"):  # their requests are memory-checked before the process group
        assert workload.memory in TERMS


@pytest.mark.parametrize("job", registry.JOBS)
def test_every_job_has_the_lifecycle(job):
    module = importlib.import_module(registry.JOBS[job][0])
    assert all(callable(getattr(module, name)) for name in ("add_arguments", "prepare", "load", "generate"))


@pytest.mark.parametrize("job", registry.JOBS)
def test_a_job_takes_the_degrees_of_its_workloads_with_their_help(job):
    """--<degree> for every degree a workload of the job splits by, its help the workloads' own words; -1 (the ranks
    left over) for a degree some workload fills."""
    from paragen.launch.cli import build_parser

    parser = build_parser(job)
    sub = next(a for a in parser._actions if a.dest == "command").choices[job]
    options = {a.dest: a for a in sub._actions}
    for workload in registry.job_workloads(job):
        for degree in workload.degrees:
            assert workload.degree_help[degree] in options[degree].help
            assert options[degree].default == (-1 if any(w.fill == degree for w in registry.job_workloads(job)) else 1)
    args = parser.parse_args([job, *(f"--{d}={n}" for d, n in zip(registry.job_degrees(job), (1, 2, 1, 2)))])
    assert registry.degrees_of(args, job) == ParallelConfig(**dict(zip(registry.job_degrees(job), (1, 2, 1, 2))))


def test_help_leaves_with_status_0():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "paragen", "image", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "--ulysses" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize("workload, config, world, options, tag", [
    ("patch", ParallelConfig(cfg=2, patch=2), 4, ExchangeConfig(mode="displaced"), "patch2_cfg2_displaced"),
    ("dit", ParallelConfig(ulysses=2, ring=2), 4, ExchangeConfig(), "ulysses2_ring2_cfg1_sync"),
    ("dit", ParallelConfig(), 1, ExchangeConfig(), "cfg1_sync"),  # one rank: no band in a DiT's name
    ("hires", ParallelConfig(), 4, HiresConfig(), "hires4_async"),
    ("wan", ParallelConfig(clip=2, cfg=2), 4, TemporalAttention(), "clip2_cfg2_dual"),
    ("dit-video", ParallelConfig(clip=2), 4, TemporalAttention(), "clip2_ring2_dual"),
    ("video", ParallelConfig(), 4, TemporalAttention(scope="full"), "clip4_full"),
    ("llm", ParallelConfig(seq=2, tp=2), 4, KVConfig(mode="offload"), "seq2_tp2_offload"),
])
def test_file_names_carry_the_workloads_degrees_and_the_options_tag(workload, config, world, options, tag):
    record = next(w for w in registry.WORKLOADS if w.name == workload)
    assert record.name_tag(record.resolve(config, world), options) == tag
