"""Fit a CPU device profile to measured step times: the step time of a traced call is linear in the inverse rates
(`model.kernels_time`): matmul, conv and attention FLOPs, memory-bound bytes and kernel launches. A non-negative
least-squares fit over every subset of those five (the best subset wins) makes it deterministic given the
measurements; each sample is weighted by its measured time (relative error)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy

from paragen.pipelines.cost.devices import DeviceProfile, Link
from paragen.pipelines.cost.trace import Trace

FEATURES = ("matmul", "conv", "attention", "memory", "launches")


@dataclass(frozen=True)
class Sample:
    """One measured configuration: the features of its step (FLOPs per class, memory-bound bytes, launches, for
    one thread) and its measured seconds."""

    name: str
    features: tuple[float, ...]
    seconds: float


def features(trace: Trace, calls: int = 1, threads: int = 1) -> tuple[float, ...]:
    """A traced call's features (`FEATURES`), `calls` times per step, on `threads` threads (which share the work, not
    the launches: `model.kernels_time`)."""
    return (calls * trace.flops("matmul") / threads, calls * trace.flops("conv") / threads,
            calls * trace.flops("attention") / threads, calls * trace.bytes("memory") / threads,
            float(calls * len(trace.kernels)))


def relative_fit(x: numpy.ndarray, y: numpy.ndarray) -> tuple[numpy.ndarray, float]:
    """(Non-negative coefficients c minimising the squared relative errors of x @ c against y, the worst relative
    error): the best least-squares fit over every subset of the columns whose coefficients are all non-negative."""
    rows = x / y[:, None]
    columns = x.shape[1]
    best, best_error = numpy.zeros(columns), float("inf")
    for size in range(1, columns + 1):
        for chosen in itertools.combinations(range(columns), size):
            coef, *_ = numpy.linalg.lstsq(rows[:, chosen], numpy.ones(len(y)), rcond=None)
            if (coef < 0).any():
                continue
            full = numpy.zeros(columns)
            full[list(chosen)] = coef
            error = float(((rows @ full - 1.0) ** 2).sum())
            if error < best_error - 1e-12:
                best, best_error = full, error
    return best, float(numpy.abs(x @ best / y - 1.0).max())


def fit(samples: list[Sample]) -> tuple[numpy.ndarray, float]:
    """(Seconds per unit of each feature, the worst relative error over the samples)."""
    return relative_fit(numpy.array([s.features for s in samples], dtype=float),
                        numpy.array([s.seconds for s in samples], dtype=float))


def cpu_profile(samples: list[Sample], link: Link, cores: int, memory_bytes: int, source: str,
                contention: float = 1.0) -> DeviceProfile:
    """The CPU profile the samples give (one thread's rates), with the measured loopback `link` and `contention`."""
    coef, worst = fit(samples)
    never = 1e30  # a feature the fit left at zero costs nothing measurable
    rate = lambda c: 1.0 / c if c > 0 else never  # noqa: E731
    return DeviceProfile("cpu", {"matmul": rate(coef[0]), "conv": rate(coef[1]), "attention": rate(coef[2])},
                         rate(coef[3]), float(coef[4]), memory_bytes, cores, link, link, cores=cores,
                         contention=contention, source=source,
                         fit={"samples": {s.name: s.seconds for s in samples}, "worst_relative_error": worst})


@dataclass(frozen=True)
class RankedSample:
    """One measured multi-rank step whose collectives all block: its compute as one rank alone would take it, its
    collectives (calls) and bytes, and its measured seconds."""

    name: str
    compute_s: float
    calls: int
    bytes: int
    seconds: float


def fit_ranks(samples: list[RankedSample], name: str) -> tuple[float, Link, float]:
    """(Contention, the link, the worst relative error): seconds = contention × compute + calls × latency + bytes /
    bandwidth, fitted as `relative_fit` does."""
    x = numpy.array([[s.compute_s, float(s.calls), float(s.bytes)] for s in samples])
    (contention, latency, per_byte), worst = relative_fit(x, numpy.array([s.seconds for s in samples], dtype=float))
    return max(float(contention), 1.0), Link(name, 1.0 / per_byte if per_byte > 0 else 1e30, float(latency)), worst
