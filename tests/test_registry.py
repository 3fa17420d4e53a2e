"""The workload registry: a new workload is a package and a record; every record and job is complete."""
import importlib

import pytest
import torch

from paragen.parallel import ExchangeConfig, HiresConfig, ParallelConfig
from paragen.pipelines import registry
from tests.toy_workload import ToyModel, ToyOptions

TOY = registry.Workload("toy", ("ToyModel",), ToyOptions, ("clip",), "clip", "tests.toy_workload", "video", "toy",
                        "the toy splits by clip only")


def test_a_new_workload_is_a_package_and_a_record():
    workloads = registry.WORKLOADS + (TOY,)
    assert registry.find("ToyModel", None, workloads) is TOY
    assert registry.find("ToyModel", ToyOptions(), workloads) is TOY
    model = TOY.parallelize(ToyModel(), ParallelConfig(), ToyOptions(scale=3.0))
    config, options = model.paragen
    assert config == ParallelConfig(cfg=1, patch=1, ulysses=1, ring=1, clip=1, seq=1, tp=1)
    assert model(torch.ones(2)).tolist() == [6.0, 6.0]
    assert options.layout_tag(config) == "toy1x3"
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


@pytest.mark.parametrize("job", registry.JOBS)
def test_every_job_has_the_lifecycle(job):
    module = importlib.import_module(registry.JOBS[job][0])
    assert all(callable(getattr(module, name)) for name in ("add_arguments", "prepare", "load", "generate"))
