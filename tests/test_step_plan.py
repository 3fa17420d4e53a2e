"""What `warmup_steps` means: the first N steps of a request are exact, the rest read stale data.

DistriFusion's `warmup_steps=k` runs k + 1 exact steps (its layers compare a 0-based counter with `<= k`);
paragen's `warmup_steps=N` runs N. The expectations below are written out by hand.
"""
from __future__ import annotations

import pytest

from paragen.parallel.config import ExchangeConfig
from paragen.parallel.steps import StepPlan


class _OneRank:
    rank, size = 0, 1


def _walk(mode: str, warmup: int, steps: int) -> tuple[list[bool], list[bool]]:
    plan = StepPlan(_OneRank(), mode=mode, warmup_steps=warmup)
    plan.begin_request(steps)
    stale, publish = [], []
    for _ in range(steps):
        plan.begin_step()
        stale.append(plan.stale)
        publish.append(plan.publish)
    plan.end_request()
    return stale, publish


@pytest.mark.parametrize("mode", ["displaced", "partial"])
def test_warmup_steps_counts_the_exact_steps(mode):
    stale, publish = _walk(mode, warmup=5, steps=8)
    assert stale == [False] * 5 + [True] * 3
    # the last exact step and every stale step but the last leave data for the next step
    assert publish == [False] * 4 + [True] * 3 + [False]


def test_sync_mode_and_zero_warmup():
    assert _walk("sync", warmup=0, steps=3) == ([False] * 3, [False] * 3)
    assert _walk("displaced", warmup=0, steps=3) == ([True] * 3, [True, True, False])  # the plan alone: see below


@pytest.mark.parametrize("mode", ["displaced", "partial"])
def test_a_stale_mode_needs_one_exact_step_first(mode):
    """Zero warm-up steps once crashed at the first GroupNorm (no earlier step's statistics to read)."""
    with pytest.raises(ValueError, match=f"at least 1 in {mode} mode"):
        ExchangeConfig(mode=mode, warmup_steps=0)
    assert ExchangeConfig(mode="sync", warmup_steps=0).warmup_steps == 0


def test_a_request_of_unknown_length_is_exact():
    plan = StepPlan(_OneRank(), mode="displaced", warmup_steps=1)
    plan.begin_request(None)
    for _ in range(3):
        plan.begin_step()
        assert not plan.stale and not plan.publish
