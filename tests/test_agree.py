"""Ranks agree by construction: verdicts gathered over the ranks make one agreed outcome (unit, the gather stood
in for); and on 2 real ranks, a request that one rank alone refuses, and ranks that read different journals,
stop every rank with the same error before anything is made or recorded."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from paragen.pipelines.jobs import agree
from paragen.pipelines.jobs.journal import journal_path, record
from tests.multiproc import ROOT, free_port, rank_env

IMAGE = ["-m", "paragen", "image", "--model", "tiny-shapes", "--steps", "2", "--timeout", "60"]


def _settled(monkeypatch, verdicts: list) -> Exception | None:
    """What `agree.settle` raises when the ranks' verdicts are `verdicts`."""
    monkeypatch.setattr(agree, "all_gather_objects", lambda comm, verdict: verdicts)
    try:
        agree.settle(None, verdicts[0])
    except Exception as error:  # noqa: BLE001 — the outcome under test
        return error
    return None


def test_verdicts_agree_a_refusal_when_every_failing_rank_refused_else_a_failure_naming_the_ranks(monkeypatch):
    assert _settled(monkeypatch, [None, None]) is None
    same = _settled(monkeypatch, [(agree.REFUSED, "height 100")] * 2)
    assert isinstance(same, agree.RequestRefused) and str(same) == "height 100"
    one = _settled(monkeypatch, [None, (agree.REFUSED, "needs 3 GiB, this rank has 2 GiB")])
    assert isinstance(one, agree.RequestRefused) and "disagree" in str(one) and "rank 1: needs 3 GiB" in str(one)
    assert "rank 0 accepted it" in str(one)
    failed = _settled(monkeypatch, [(agree.FAILED, "OSError: disk full"), (agree.REFUSED, "x")])
    assert isinstance(failed, agree.RequestFailed) and str(failed).startswith("rank 0: OSError: disk full; rank 1:")
    cancelled = _settled(monkeypatch, [(agree.CANCELLED, "cancelled after 3 denoising steps")] * 2)
    assert type(cancelled).__name__ == "RequestCancelled"


def test_the_ranks_compare_what_they_read(monkeypatch):
    monkeypatch.setattr(agree, "all_gather_objects", lambda comm, seen: ["2 done", "0 done"])
    with pytest.raises(agree.RequestRefused, match=r"the ranks see different journals \(rank 0: 2 done; rank 1: 0 done\)"):
        agree.same_everywhere(None, "journals", "2 done")


def _run_per_rank(args: list[list[str]]) -> list[tuple[int, str]]:
    """`python <args[r]>` as rank r of len(args) (each rank its own command line: node-local paths)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *rank_args], env=rank_env(rank, len(args), port), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, rank_args in enumerate(args)]
    return [(proc.wait(timeout=120), proc.communicate()[1]) for proc in procs]


def _files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_a_request_one_rank_refuses_stops_every_rank_with_its_reason(tmp_path):
    """A check of a rank's own state (here its output folder; its free memory alike) that fails on one rank only:
    that rank once died alone while the other waited in a collective."""
    (tmp_path / "node1").write_text("a file where rank 1's folder should be")
    outs = [tmp_path / "node0", tmp_path / "node1"]
    for rank, (status, err) in enumerate(_run_per_rank([[*IMAGE, "--out", str(out)] for out in outs])):
        assert status == 2, f"rank {rank}:\n{err[-2000:]}"
        assert "the ranks disagree about this request: rank 1: --out" in err and "rank 0 accepted it" in err, err
    assert _files(tmp_path) == ["node1"]


def test_ranks_that_see_different_journals_stop_before_making_anything(tmp_path):
    """Node-local --out after a requeue: each rank reads its own folder's journal. The ranks compare what they
    read and stop with the same error before any request; nothing is written or recorded."""
    path = tmp_path / "requests.jsonl"
    path.write_text('{"id": "fox", "seed": 1}\n{"id": "cat", "seed": 2}\n')
    outs = [tmp_path / "node0", tmp_path / "node1"]
    record(journal_path(str(outs[0]), (0, 1)), "fox", 1, "made-before-the-requeue", ["fox.png"])
    before = _files(tmp_path)
    results = _run_per_rank([[*IMAGE, "--requests", str(path), "--out", str(out)] for out in outs])
    for rank, (status, err) in enumerate(results):
        assert status == 2 and "the ranks see different journals" in err, f"rank {rank}:\n{err[-2000:]}"
        assert "--out must be one folder that every rank sees alike" in err
    assert _files(tmp_path) == before
