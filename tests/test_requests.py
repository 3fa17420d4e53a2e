"""Request files (`--requests`): reading and checking lines against the request schema; the journal; and, end to
end on 2 ranks, a file of mixed requests equals one launch per request, a killed run resumes without making
anything twice and remakes a changed line (ranks that disagree: tests/test_agree.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from paragen.comms import world_comm
from paragen.pipelines.jobs.batch import Line, Plan, RequestFile, checked, read_requests, run_batch
from paragen.pipelines.jobs.image import ImageRequest
from paragen.pipelines.jobs.journal import journal_path, read_journal, record, request_digest
from tests.multiproc import check_all_ok, run_ranks, start_ranks

LINES = [
    '{"id": "fox", "prompt": "a fox", "seed": 1}',
    '{"prompt": "a cat", "seed": 2, "height": 64, "width": 128}',
    "",
    "not json",
    '{"id": "coarse", "seed": 3, "steps": 3}',
    '{"id": "bad-size", "height": 100}',
    '{"id": "wide", "width": 192, "guidance_scale": 3.0, "seed": 4}',
    '{"id": "x", "model": "tiny-sdxl"}',
    '{"id": "neg", "negative_prompt": "blurry", "seed": 5}',
    '{"id": "fox", "seed": 9}',
    '{"id": "last", "prompt": "a boat", "seed": 6, "steps": 1}',
]


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _read(path: Path, base=None, strict: bool = False, share: tuple[int, int] = (0, 1)):
    return read_requests(RequestFile(str(path), strict, share), base or ImageRequest(), {"layout": 1})


def test_lines_become_requests_or_refusals_with_their_line_number(tmp_path):
    path = _write(tmp_path, LINES)
    lines, refused = _read(path, ImageRequest(height=128, width=128, out_dir="o"))
    assert [(line.number, line.id) for line in lines] == [(1, "fox"), (2, "line-2"), (5, "coarse"), (6, "bad-size"),
                                                          (7, "wide"), (9, "neg"), (11, "last")]
    fox, cat = lines[0].request, lines[1].request
    assert (fox.prompt, fox.seed, fox.height, fox.name, fox.out_dir) == ("a fox", 1, 128, "fox", "o")
    assert (cat.height, cat.width, cat.name) == (64, 128, "line-2")
    assert [message.split(": ", 1)[0] for message in refused] == [f"{path}:4", f"{path}:8", f"{path}:10"]
    assert "not valid JSON" in refused[0] and "model is not a field" in refused[1] and "earlier line (1)" in refused[2]
    with pytest.raises(ValueError, match=":4: not valid JSON"):
        _read(path, strict=True)


@pytest.mark.parametrize("line,words", [
    ('{"steps": 0}', "steps must be positive"),
    ('{"steps": 1.5}', "steps must be a whole number, got 1.5"),  # once crashed the whole run inside diffusers
    ('{"seed": "3"}', "seed must be a whole number"),
    ('{"guidance_scale": NaN}', "guidance_scale must be a finite number"),
    ('{"id": "../etc", "seed": 1}', "names the outputs"),
    ('{"id": "manifest"}', "reserved"),
    ('{"id": "journal"}', "reserved"),
    ('{"prompt": ""}', "prompt must not be empty"),
])
def test_a_line_the_schema_refuses_is_a_refused_line_and_the_next_is_made(tmp_path, line, words):
    lines, refused = _read(_write(tmp_path, [line, '{"seed": 2}']))
    assert [one.id for one in lines] == ["line-2"] and len(refused) == 1 and words in refused[0], refused


def test_array_tasks_take_every_nth_line_and_ids_are_unique_over_the_whole_file(tmp_path):
    path = _write(tmp_path, [json.dumps({"seed": i}) for i in range(7)] + ['{"id": "line-1"}'])
    shares = [_read(path, share=(task, 3)) for task in range(3)]
    assert [[line.request.seed for line in share[0]] for share in shares] == [[0, 3, 6], [1, 4], [2, 5]]
    assert "used by an earlier line (1)" in shares[1][1][0]  # line 8 falls to task 1; line 1 to task 0
    assert journal_path(str(tmp_path), (1, 3)) == tmp_path / "journal-1-of-3.jsonl"
    assert journal_path(str(tmp_path), (0, 1)) == tmp_path / "journal.jsonl"


def test_a_digest_changes_with_what_makes_the_outputs_only():
    layout = {"patch": 2}
    base = request_digest(ImageRequest(), layout)
    assert request_digest(ImageRequest(out_dir="elsewhere", name="x"), layout) == base
    assert request_digest(ImageRequest(prompt="a cat"), layout) != base
    assert request_digest(ImageRequest(), {"patch": 1}) != base


def test_the_journal_appends_whole_lines_and_ignores_a_torn_last_one(tmp_path):
    path = tmp_path / "journal.jsonl"
    assert read_journal(path) == {}
    record(path, "a", 1, "d1", ["a.png"])
    record(path, "b", 2, "d2", ["b.png"])
    record(path, "a", 1, "d3", ["a.png"])  # made again: the latest line counts
    with path.open("a") as file:
        file.write('{"id": "c", "line": 3, "dig')  # the node died mid-append
    assert read_journal(path) == {"a": {"line": 1, "digest": "d3", "outputs": ["a.png"]},
                                  "b": {"line": 2, "digest": "d2", "outputs": ["b.png"]}}
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="not a paragen journal entry"):
        read_journal(path)


def test_a_rerun_skips_what_the_journal_records_and_remakes_a_changed_line(tmp_path):
    journal = tmp_path / "journal.jsonl"
    record(journal, "same", 1, "d-same", [])
    record(journal, "changed", 2, "d-old", [])
    lines = [Line(1, "same", "r1", "d-same"), Line(2, "changed", "r2", "d-new"), Line(3, "new", "r3", "d3"),
             Line(4, "refused", "r4", "d4")]

    def check(request):
        if request == "r4":
            raise ValueError("too big for this rank")
        return request

    made, comm, job = [], world_comm(), SimpleNamespace(check=check, content=None)
    run_batch(Plan(lines, [], journal, read_journal(journal)), lambda request: checked(comm, job, request),
              lambda item: made.append(item) or {}, False, comm)
    assert made == ["r2", "r3"]
    assert {key: entry["digest"] for key, entry in read_journal(journal).items()} == {
        "same": "d-same", "changed": "d-new", "new": "d3"}


IMAGE = ["-m", "paragen", "image", "--height", "64", "--width", "64", "--steps", "2", "--timeout", "60"]
MIXED = [
    {"id": "fox", "prompt": "a fox", "seed": 1},
    {"id": "cat", "prompt": "a cat", "seed": 2, "height": 128},
    {"id": "bad", "height": 100},  # refused at the call, on both ranks: the batch goes on
    {"id": "coarse", "seed": 3, "steps": 3, "guidance_scale": 3.0},
    {"id": "wide", "width": 128, "seed": 4},
    {"id": "neg", "negative_prompt": "blurry", "seed": 5},
    {"id": "boat", "prompt": "a boat", "seed": 6, "steps": 1},
]
MADE = [request["id"] for request in MIXED if request["id"] != "bad"]


def _one_launch_args(request: dict) -> list[str]:
    flags = []
    for key, value in request.items():
        if key != "id":
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return [*flags, "--name", request["id"]]


@pytest.mark.slow
def test_a_request_file_equals_one_launch_per_request_resumes_after_a_kill_and_remakes_a_changed_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(request) for request in MIXED) + "\n{broken\n")
    single = tmp_path / "single"
    for request in MIXED:
        if request["id"] != "bad":
            check_all_ok(run_ranks([*IMAGE, *_one_launch_args(request), "--out", str(single)], 2))

    out = tmp_path / "batch"
    journal = out / "journal.jsonl"
    procs = start_ranks([*IMAGE, "--requests", str(path), "--out", str(out)], 2)
    deadline = time.monotonic() + 300
    while len(read_journal(journal)) < 2:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no request finished"
        time.sleep(0.05)
    procs[-1].kill()
    for proc in procs:
        proc.communicate(timeout=120)
    before = set(read_journal(journal))
    assert 2 <= len(before) < len(MADE)

    results = run_ranks([*IMAGE, "--requests", str(path), "--out", str(out)], 2)
    check_all_ok(results)
    log = results[0].stderr
    assert f"requests: {len(MADE) - len(before)} made, {len(before)} done before, 2 refused" in log
    assert "line 3 (bad): height 100 is not a multiple of the VAE factor" in log and f"{path}:8: not valid JSON" in log
    assert list(read_journal(journal)) == MADE
    for name in MADE:
        assert (out / f"{name}.png").read_bytes() == (single / f"{name}.png").read_bytes(), name

    # the same id with another prompt is made again (once found silently skipped); the others are not
    changed = [{**request, "prompt": "a wolf"} if request["id"] == "fox" else request for request in MIXED]
    path.write_text("\n".join(json.dumps(request) for request in changed) + "\n")
    results = run_ranks([*IMAGE, "--requests", str(path), "--out", str(out)], 2)
    check_all_ok(results)
    assert f"requests: 1 made, {len(MADE) - 1} done before, 1 refused" in results[0].stderr
    assert "line 1 (fox): its request changed since it was made; making it again" in results[0].stderr
    assert (out / "fox.png").read_bytes() != (single / "fox.png").read_bytes()
