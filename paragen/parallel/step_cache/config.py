"""`StepCacheConfig`: whether and how a request's denoiser skips work between nearby steps.

Three methods, named as the papers and diffusers' configs name them:
- `fbcache` (First-Block Cache): the first block runs every step; when the relative L1 change of its output
  residual against the last computed step's is below `threshold`, the rest of the denoiser is skipped and the
  residual it added at the last computed step is added instead;
- `teacache` (TeaCache's rule): the relative L1 changes of that probe between consecutive steps accumulate; the
  denoiser is skipped while the sum stays below `threshold`, and a computed step resets it;
- `taylorseer` (TaylorSeer): the rest of the denoiser is computed every `interval` steps and forecast in between by
  a Taylor expansion of order `order` in the step index, from finite differences of its computed outputs.
The first `start` steps are always computed (diffusers' `disable_cache_before_step`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METHODS = ("none", "fbcache", "teacache", "taylorseer")
PROBED = ("fbcache", "teacache")  # methods that decide from the first block's output, all-reduced over the ranks
LIMITS = {"threshold": (0.0, 10.0), "interval": (1, 1000), "order": (0, 4), "start": (1, 10_000)}  # inclusive
METHOD_HELP = {
    "none": "every step computes the whole denoiser",
    "fbcache": "First-Block Cache: skip the rest of the denoiser when the first block's residual changed less than "
               "--cache-threshold (relative L1, reduced over every rank) since the last computed step",
    "teacache": "TeaCache's rule: skip while the first block's relative changes, summed over the steps since the last "
                "computed one, stay below --cache-threshold",
    "taylorseer": "TaylorSeer: compute every --cache-interval steps, forecast the rest of the denoiser in between "
                  "(Taylor expansion of order --cache-order)",
}


@dataclass(frozen=True)
class StepCacheConfig:
    """`method` (`METHODS`), its `threshold` (fbcache, teacache), `interval` and `order` (taylorseer), and `start`:
    the steps always computed first."""

    method: str = "none"
    threshold: float = 0.1
    interval: int = 2
    order: int = 1
    start: int = 2

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"cache must be one of {', '.join(METHODS)}; got {self.method!r}")
        for name, (low, high) in LIMITS.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"cache {name} must be in [{low}, {high}], got {getattr(self, name)}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def probed(self) -> bool:
        """Its decisions come from the first block's output (one all-reduce per step), not from a schedule."""
        return self.method in PROBED


def check_step_cache(config: StepCacheConfig, options: Any) -> None:
    """Refuse a cache the workload (its `options`) cannot run with every rank deciding alike: a workload whose ranks
    make different denoiser calls says why in its options' `PROBE_REFUSAL`, and takes schedules only."""
    refusal = getattr(options, "PROBE_REFUSAL", None)
    if config.probed and refusal:
        raise ValueError(f"cache {config.method!r} decides from the first block's output of a call every rank makes; "
                         f"{refusal}, so only --cache taylorseer (a schedule) runs here")
