"""`paragen serve` under traffic: batches of requests that differ only in prompt and seed, each the bytes it is alone
(every exact image mode on 2 and 4 real ranks); the two queues and their fairness; asynchronous jobs polled, streamed
clip by clip and cancelled; a burst beyond the queue answered 429; SIGTERM with jobs in flight."""
from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from paragen.launch.env import discover
from paragen.launch.serve.front import CLIENT_GONE, FAIR_TURNS, Front, Ticket
from paragen.parallel.batch_invariant import make_batch_invariant, requests_in_call
from tests.multiproc import ROOT, expect_bad_input, run_spec_worker, start_ranks
from tests.serve_client import Server, call, delete, fetch
from tests.workers.batch_worker import PROMPTS


# ---- the front: batches, queues, jobs ----------------------------------------------------------------
def _front(**options) -> tuple[Front, threading.Event]:
    front = Front(max_queue=options.pop("max_queue", 16), **options)
    front.open()
    return front, threading.Event()


def test_a_batch_is_the_first_request_and_those_behind_it_with_its_key_in_order():
    front, stopping = _front(max_batch=3)
    a, b, c, d, e, alone = (Ticket("a", 0, key="k"), Ticket("b", 0, key="other"), Ticket("c", 0, key="k"),
                            Ticket("d", 0, key="k"), Ticket("e", 0, key="k"), Ticket("f", 0))
    for ticket in (a, b, c, d, e, alone):
        front.submit([ticket])
    assert front.next(1.0, stopping) == [a, c, d]  # at most max_batch
    assert front.next(1.0, stopping) == [b]
    assert front.next(1.0, stopping) == [e]
    assert front.next(1.0, stopping) == [alone]  # no key: made alone
    assert "paragen_batches_total 4" in front.metrics() and "paragen_batched_requests_total 6" in front.metrics()


def test_a_batch_waits_for_more_until_its_first_request_has_waited_the_batch_wait():
    front, stopping = _front(max_batch=4, batch_wait_s=0.6)
    first, second = Ticket("a", 0, key="k"), Ticket("b", 0, key="k")
    front.submit([first])
    threading.Timer(0.2, front.submit, ([second],)).start()
    started = time.monotonic()
    assert front.next(5.0, stopping) == [first, second]
    assert 0.5 < time.monotonic() - started < 3.0
    full, stopping = _front(max_batch=2, batch_wait_s=30.0)
    pair = [Ticket("a", 0, key="k"), Ticket("b", 0, key="k")]
    full.submit(pair)
    started = time.monotonic()
    assert full.next(5.0, stopping) == pair and time.monotonic() - started < 1.0  # full: no wait


def test_interactive_requests_go_first_and_a_job_waits_for_at_most_fair_turns_batches():
    front, stopping = _front()
    job = Ticket("job", 0, background=True)
    front.submit([job])
    quick = [Ticket(f"q{i}", 0) for i in range(FAIR_TURNS + 2)]
    for ticket in quick:
        front.submit([ticket])
    order = [front.next(1.0, stopping)[0].id for _ in range(len(quick) + 1)]
    assert order == [*(t.id for t in quick[:FAIR_TURNS]), "job", *(t.id for t in quick[FAIR_TURNS:])]


def test_a_job_is_remembered_its_id_kept_and_a_cancel_says_why():
    front, stopping = _front()
    job = Ticket("job", 0, background=True)
    front.submit([job])
    assert front.job("job") is job and front.job("other") is None
    assert _status(lambda: front.submit([Ticket("job", 1)])) == 409
    front.cancel([job], "cancelled by DELETE")
    failure = job.future.exception(timeout=1)
    assert failure.status == CLIENT_GONE and "cancelled by DELETE" in failure.message and job.state == "cancelled"
    assert 'paragen_jobs{state="cancelled"} 1' in front.metrics()
    assert front.next(0.05, stopping) is None  # never reaches the ranks


def _status(submit) -> int:
    try:
        submit()
    except Exception as error:  # an Outcome
        return error.status
    return 200


# ---- batch-invariant layers --------------------------------------------------------------------------
class _Denoiser(torch.nn.Module):
    """The kinds of layer whose kernels change with the batch: small linear products and convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.conv = torch.nn.Linear(96, 384), torch.nn.Conv2d(4, 8, 3, padding=1)
        self.tokens = torch.nn.Linear(8, 32)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv(x) * self.embed(t)[:, :8, None, None]
        return self.tokens(h.flatten(2).transpose(1, 2))


def test_batch_invariant_layers_give_each_sample_the_bytes_it_gets_alone():
    torch.manual_seed(0)
    pipe = SimpleNamespace(unet=_Denoiser())
    x, t = torch.randn(7, 4, 6, 6), torch.randn(7, 96)
    with torch.no_grad():
        plain = pipe.unet(x, t)
        assert make_batch_invariant(pipe) == 3
        alone = [pipe.unet(x[i:i + 1], t[i:i + 1]) for i in range(7)]
        for size in (2, 3, 5, 7):
            with requests_in_call(size):  # requests of one sample each
                together = pipe.unet(x[:size], t[:size])
            for i in range(size):
                assert torch.equal(together[i:i + 1], alone[i]), (size, i)
    assert (torch.cat(alone) - plain).abs().max() < 1e-5  # the same function, padded


# ---- in this process (CPU here; CUDA in `make gpu-check`) --------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_a_batch_in_one_process_gives_each_request_the_bytes_it_gets_alone(device, tmp_path):
    """On CUDA this is what a GPU run has to show: cuBLAS and cuDNN pick kernels by shape by other rules."""
    from paragen.launch.runner import JobRunner
    from paragen.pipelines.jobs import image

    parser = argparse.ArgumentParser()
    image.add_arguments(parser)
    for model in ("tiny-sd", "tiny-pixart"):
        args = parser.parse_args(["--model", model, "--steps", "2", *SIZE_AT[2], "--out", str(tmp_path)])
        args.device = device
        runner = JobRunner.prepared("image", image, dataclasses.replace(image.prepare(args, discover()),
                                                                        batch_invariant=True))
        runner.load()
        items = [runner.checked(runner.request(prompt=prompt, seed=seed, name=f"{model}-{way}-{i}"))
                 for way in ("alone", "batched") for i, (prompt, seed) in enumerate(PROMPTS)]
        alone = [runner.generate_batch([item])[0]["image"] for item in items[:3]]
        batched = [report["image"] for report in runner.generate_batch(items[3:])]
        assert [open(path, "rb").read() for path in batched] == [open(path, "rb").read() for path in alone], model


# ---- on real ranks ---------------------------------------------------------------------------------------
# 4 ranks at 128×128: at 64×64 the UNet's middle gives each of 4 ranks a band of one latent row, where a group norm's
# statistics and a two-token attention are summed in another order with 3 samples than with 1 (measured): the
# library's reductions change their vectorisation with the batch on tensors that small
SIZE_AT = {2: ["--height", "64", "--width", "64"], 4: ["--height", "128", "--width", "128"]}
IMAGE_FLAGS = ["--steps", "2", *SIZE_AT[2]]
LAYOUTS = {2: {"sd-sync": ["--model", "tiny-sd"], "sd-displaced": ["--model", "tiny-sd", "--mode", "displaced",
                                                                   "--warmup-steps", "1"],
               "sd-partial": ["--model", "tiny-sd", "--mode", "partial", "--warmup-steps", "1"],
               "sd-cfg": ["--model", "tiny-sd", "--cfg", "2"],
               "pixart-ulysses": ["--model", "tiny-pixart", "--ulysses", "2"],
               "pixart-ring": ["--model", "tiny-pixart", "--ring", "2"]},
           4: {"sd-cfg-patch": ["--model", "tiny-sd", "--cfg", "2", "--patch", "2"],
               "pixart-ulysses-ring": ["--model", "tiny-pixart", "--ulysses", "2", "--ring", "2"]}}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_a_batch_of_requests_gives_each_the_bytes_it_gets_alone_in_every_mode(world, tmp_path):
    specs = [{"name": name, "flags": [*flags, "--steps", "2", *SIZE_AT[world]], "out": str(tmp_path / "out")}
             for name, flags in LAYOUTS[world].items()]
    results = run_spec_worker(str(ROOT / "tests" / "workers" / "batch_worker.py"), specs, world, tmp_path, 900)
    for name, made in results.items():
        assert made["batched"] == made["alone"], f"{world} ranks {name}: a batched PNG differs from it alone"
        assert made["batch"] == [{"size": 3, "index": i} for i in range(3)] and made["seeds"] == [3, 11, 4], name
        assert len(set(made["batched"])) == 3, name  # own prompts and seeds: the first and third differ in seed only


def _png(reply) -> bytes:
    return base64.b64decode(reply.body["data"][0]["b64_json"])


@pytest.mark.slow
def test_a_server_batches_concurrent_requests_refuses_a_burst_and_stops_with_jobs_in_flight(tmp_path):
    out = tmp_path / "served"
    args = ["image", *IMAGE_FLAGS, "--timeout", "60", "--out", str(out), "--max-batch", "4", "--batch-wait-ms", "1500",
            "--max-queue", "8"]
    with Server(args) as server:
        url = server.url
        bodies = [{"prompt": prompt, "seed": seed, "id": f"b{i}"} for i, (prompt, seed) in
                  enumerate([("a fox", 1), ("a cat", 2), ("a boat", 3), ("a fox", 4)])]
        with ThreadPoolExecutor(4) as clients:
            together = list(clients.map(lambda body: call(url, "/v1/images/generations", body), bodies))
        assert [reply.status for reply in together] == [200] * 4, [reply.body for reply in together]
        sizes = [reply.body["paragen"]["reports"][0]["batch"]["size"] for reply in together]
        assert sizes == [4] * 4, sizes
        for body, reply in zip(bodies, together):  # the same request alone, in the same server
            alone = call(url, "/v1/images/generations", {**body, "id": body["id"] + "-alone"})
            assert alone.status == 200 and "batch" not in alone.body["paragen"]["reports"][0]
            assert _png(alone) == _png(reply) == (out / f"{body['id']}.png").read_bytes(), body
        assert len({_png(reply) for reply in together}) == 4  # each its own prompt and seed

        # a burst of 16 with room for 8 waiting: 429 for the rest, no crash
        with ThreadPoolExecutor(16) as clients:
            burst = list(clients.map(lambda i: call(url, "/v1/images/generations", {"prompt": f"burst {i}", "seed": i}),
                                     range(16)))
        statuses = sorted(reply.status for reply in burst)
        assert set(statuses) == {200, 429} and statuses.count(200) >= 8, statuses
        assert all("queue" in reply.body["error"]["message"] for reply in burst if reply.status == 429)
        assert call(url, "/health").status == 200

        # SIGTERM with asynchronous jobs in flight and waiting: every rank exits 0, no partial file
        slow = {"prompt": "a slow one", "size": "128x128", "steps": 40, "async": True}
        for i in range(3):
            assert call(url, "/v1/images/generations", {**slow, "id": f"job{i}", "seed": i}).status == 202
        while 'paragen_jobs{state="in_progress"} 0' in call(url, "/metrics").body:
            time.sleep(0.02)
        server.signal(signal.SIGTERM)
        assert server.wait() == [0, 0], server.log(0)[-2000:]
    for i in range(3):
        made = {path.suffix for path in out.glob(f"job{i}.*")}
        assert made in (set(), {".png", ".json"}), (i, made)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


WAN = ["video", "--model", "tiny-wan", "--clip", "2", "--local", "1", "--global-frames", "2", "--frames", "33",
       "--height", "48", "--width", "80", "--steps", "3", "--timeout", "60"]


@pytest.mark.slow
def test_an_async_video_job_is_polled_streams_its_clips_before_the_end_and_is_cancelled(tmp_path):
    with Server([*WAN, "--out", str(tmp_path)]) as server:
        url = server.url
        created = call(url, "/v1/videos", {"prompt": "a fox", "id": "long", "format": "gif"})
        assert created.status == 202 and created.body["status"] in ("queued", "in_progress"), created.body
        steps_seen, early = set(), None
        while (job := call(url, "/v1/videos/long").body)["status"] not in ("completed", "failed", "cancelled"):
            steps_seen.add(job["paragen"]["step"])
            if early is None and job["paragen"]["clips_ready"]:
                early = fetch(url, f"/v1/videos/long/clips/{job['paragen']['clips_ready'][0]}")
                early_status = call(url, "/v1/videos/long").body["status"]
            time.sleep(0.01)
        assert job["status"] == "completed" and job["progress"] == 100, job
        assert {0, 1, 2} <= steps_seen, steps_seen  # progress, step by step
        assert early is not None and early.status == 200 and early_status == "in_progress", "no clip before the end"
        clips = [Image.open(io.BytesIO(fetch(url, f"/v1/videos/long/clips/{k}").body)) for k in range(2)]
        whole = Image.open(io.BytesIO(fetch(url, "/v1/videos/long/content").body))
        # 9 latent frames in chunks of 4 and 5 (the longer last): 1 + 3·4 frames, then 5·4
        assert [clip.n_frames for clip in clips] == [13, 20] and whole.n_frames == 33
        assert early.body == (tmp_path / "long.clip0.gif").read_bytes()
        assert call(url, "/v1/videos/long/clips/2").status == 404
        assert [job["id"] for job in call(url, "/v1/videos").body["data"]] == ["long"]

        # cancelled between steps: no file presented as a result
        call(url, "/v1/videos", {"prompt": "a fox", "id": "dropped", "format": "gif", "steps": 60})
        while (call(url, "/v1/videos/dropped").body["paragen"]["step"] or 0) < 1:
            time.sleep(0.02)
        assert delete(url, "/v1/videos/dropped").status == 200
        while (job := call(url, "/v1/videos/dropped").body)["status"] == "in_progress":
            time.sleep(0.02)
        assert job["status"] == "cancelled" and "cancelled by DELETE" in job["error"]["message"], job
        assert job["paragen"]["step"] < 59
        assert call(url, "/v1/videos/dropped/content").status == 409
        assert not list(tmp_path.glob("dropped*"))

        # a finished job deleted: its files go; an unknown one is 404
        assert delete(url, "/v1/videos/long").status == 200 and not list(tmp_path.glob("long*"))
        assert call(url, "/v1/videos/long").status == 404 and call(url, "/v1/videos/nothing").status == 404
        metrics = call(url, "/metrics").body
        assert 'paragen_jobs{state="cancelled"} 1' in metrics


@pytest.mark.parametrize("job", ["video", "llm"])
def test_a_job_that_makes_one_request_at_a_time_refuses_max_batch_by_saying_why(job):
    procs = start_ranks(["-m", "paragen", "serve", job, "--max-batch", "4", "--port", "0"], 1)
    expect_bad_input(procs, "makes one request at a time", timeout=60)


def test_a_batching_server_refuses_a_cache_that_decides_on_the_whole_batch():
    procs = start_ranks(["-m", "paragen", "serve", "image", "--max-batch", "4", "--cache", "fbcache", "--port", "0"], 1)
    expect_bad_input(procs, "would depend on the requests batched with it", timeout=60)
