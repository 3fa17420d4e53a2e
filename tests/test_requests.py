"""Request files (`--requests`): reading and checking lines; and, end to end on 2 ranks, a file of mixed
requests equals one launch per request, and a killed run resumes without making anything twice."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from paragen.pipelines.jobs.batch import manifest, manifest_path, open_batch, read_requests
from paragen.pipelines.jobs.image import ImageRequest
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


def _keep(request):
    return request


def test_lines_become_requests_or_refusals_with_their_line_number(tmp_path):
    path = _write(tmp_path, LINES)
    lines, refused = read_requests(str(path), ImageRequest(height=128, width=128, out_dir="o"), _keep, strict=False)
    assert [(line.number, line.id) for line in lines] == [(1, "fox"), (2, "line-2"), (5, "coarse"), (6, "bad-size"),
                                                          (7, "wide"), (9, "neg"), (11, "last")]
    fox, cat = lines[0].request, lines[1].request
    assert (fox.prompt, fox.seed, fox.height, fox.name, fox.out_dir) == ("a fox", 1, 128, "fox", "o")
    assert (cat.height, cat.width, cat.name) == (64, 128, "line-2")
    assert [message.split(": ", 1)[0] for message in refused] == [f"{path}:4", f"{path}:8", f"{path}:10"]
    assert "not JSON" in refused[0] and "launch-wide fields model" in refused[1] and "earlier line" in refused[2]
    with pytest.raises(ValueError, match=":4: not JSON"):
        read_requests(str(path), ImageRequest(), _keep, strict=True)


def test_a_request_that_its_dataclass_refuses_is_a_refused_line(tmp_path):
    path = _write(tmp_path, ['{"steps": 0}', '{"id": "../etc", "seed": 1}', '{"seed": 2}'])
    lines, refused = read_requests(str(path), ImageRequest(), _keep, strict=False)
    assert [line.id for line in lines] == ["line-3"]
    assert "steps must be positive" in refused[0] and "names the outputs" in refused[1]


def test_array_tasks_take_every_nth_line_and_keep_their_own_manifest(tmp_path):
    path = _write(tmp_path, [json.dumps({"seed": i}) for i in range(7)])
    shares = [read_requests(str(path), ImageRequest(), _keep, False, (task, 3))[0] for task in range(3)]
    assert [[line.request.seed for line in share] for share in shares] == [[0, 3, 6], [1, 4], [2, 5]]
    args = SimpleNamespace(requests=str(path), strict=False)
    batch = open_batch(args, SimpleNamespace(array_task=1, array_tasks=3), ImageRequest(out_dir=str(tmp_path)), _keep)
    assert batch.manifest == tmp_path / "manifest-1-of-3.json" and [line.id for line in batch.lines] == ["line-2", "line-5"]
    assert manifest_path(str(tmp_path), (0, 1)) == tmp_path / "manifest.json" and manifest(batch.manifest) == {}
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a paragen request manifest"):
        manifest(tmp_path / "manifest.json")


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
def test_a_request_file_equals_one_launch_per_request_and_resumes_after_a_kill(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(request) for request in MIXED) + "\n{broken\n")
    single = tmp_path / "single"
    for request in MIXED:
        if request["id"] != "bad":
            check_all_ok(run_ranks([*IMAGE, *_one_launch_args(request), "--out", str(single)], 2))

    out = tmp_path / "batch"
    procs = start_ranks([*IMAGE, "--requests", str(path), "--out", str(out)], 2)
    deadline = time.monotonic() + 300
    while len(manifest(out / "manifest.json") if (out / "manifest.json").exists() else {}) < 2:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no request finished"
        time.sleep(0.05)
    procs[-1].kill()
    for proc in procs:
        proc.communicate(timeout=120)
    before = set(manifest(out / "manifest.json"))
    assert 2 <= len(before) < len(MADE)

    results = run_ranks([*IMAGE, "--requests", str(path), "--out", str(out)], 2)
    check_all_ok(results)
    log = results[0].stderr
    assert f"requests: {len(MADE) - len(before)} made, {len(before)} done before, 2 refused" in log
    assert "line 3 (bad): height 100 is not a multiple of the VAE factor" in log and f"{path}:8: not JSON" in log
    assert list(manifest(out / "manifest.json")) == MADE
    for name in MADE:
        assert (out / f"{name}.png").read_bytes() == (single / f"{name}.png").read_bytes(), name


@pytest.mark.slow
def test_an_llm_request_file_answers_each_passkey(tmp_path):
    path = tmp_path / "keys.jsonl"
    path.write_text('{"id": "short", "context": 256, "seed": 1}\n{"id": "deep", "context": 512, "depth": 0.2, "seed": 2}\n'
                    '{"id": "tiny", "context": 3}\n')
    results = run_ranks(["-m", "paragen", "llm", "--requests", str(path), "--new-tokens", "6", "--timeout", "60",
                         "--out", str(tmp_path / "out")], 2)
    check_all_ok(results)
    assert "requests: 2 made, 0 done before, 1 refused" in results[0].stderr
    for name, context in (("short", 256), ("deep", 512)):
        report = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert report["correct"] is True and report["prompt_tokens"] == context and report["request"]["name"] == name


def test_a_job_runner_keeps_the_model_and_takes_requests(tmp_path):
    import paragen

    runner = paragen.JobRunner("image", height=64, width=64, steps=2, out=str(tmp_path))
    first = runner(prompt="a fox", seed=1, name="a")
    again = runner(prompt="a fox", seed=1, name="b")
    other = runner(prompt="a fox", seed=2, height=128, name="c")
    assert Path(first["image"]).read_bytes() == Path(again["image"]).read_bytes()
    assert other["request"]["height"] == 128 and Path(other["image"]).read_bytes() != Path(first["image"]).read_bytes()
    with pytest.raises(TypeError, match="model: launch-wide"):
        runner(model="tiny-sdxl")
    with pytest.raises(ValueError, match="not a multiple of the VAE factor"):
        runner(height=100)
    with pytest.raises(TypeError, match="unknown options colour"):
        paragen.JobRunner("image", colour="red")
