"""`paragen serve`: request bodies to job requests, the queue between HTTP and the ranks, and, on 2 real ranks,
concurrent clients answered in full and equal to one-request launches, bad input refused with the server still
up, a failure on one rank answered 500, SIGTERM a clean exit, a dead rank a 503 and a non-zero exit."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from paragen.launch.serve.api import ENDPOINTS, Limits, completion_fields, image_fields, video_fields
from paragen.launch.serve.front import BROKEN, CLIENT_GONE, STOPPING, Front, Outcome, Ticket
from paragen.pipelines.jobs import schema
from paragen.pipelines.jobs.image import ImageRequest
from paragen.pipelines.jobs.llm import LLMRequest
from tests.multiproc import ROOT, check_all_ok, run_ranks
from tests.serve_client import Server, call, call_declaring, open_request, wait_for

ImageBody, VideoBody, CompletionBody = (ENDPOINTS[job][0].body() for job in ("image", "video", "llm"))
ChatBody = ENDPOINTS["llm"][1].body()


# ---- bodies ------------------------------------------------------------------------------------------
def test_a_body_is_the_request_schema_beside_openais_fields():
    assert set(ImageBody.model_fields) == {"model", "id", "user", "n", "size", "response_format", "run_async", "prompt",
                                           "negative_prompt", "height", "width", "steps", "guidance_scale", "seed"}
    assert "prompt_file" not in CompletionBody.model_fields  # a path on the ranks' machines: not for clients
    assert not {"new_tokens", "sample", "temperature"} - set(LLMRequest.__pydantic_fields__)  # replaced by OpenAI's
    assert ImageBody.model_fields["steps"].metadata == ImageRequest.__pydantic_fields__["steps"].metadata


@pytest.mark.parametrize("raw,words", [
    (b'{"prompt": "a fox", "guidance_scale": NaN}', "guidance_scale must be a finite number"),
    (b'{"prompt": "a fox", "guidance_scale": 1e999}', "guidance_scale must be a finite number"),
    (b'{"prompt": "a fox", "steps": 1.5}', "steps must be a whole number"),
    (b'{"prompt": "a fox", "steps": true}', "steps must be a whole number"),
    (b'{"prompt": "a fox", "seed": -1}', "seed must be at least 0"),
    (b'{"prompt": "a fox", "steps": 0}', "steps must be positive"),
    (b'{"prompt": 7}', "prompt must be a string"),
    (b'[1, 2]', "the request must be an object"),
    (b'{not json', "not valid JSON"),
])
def test_image_bodies_are_parsed_strictly(raw, words):
    with pytest.raises(ValueError, match=words):
        schema.parse_fields(ImageBody, raw)


def test_an_image_body_becomes_one_request_per_image_with_consecutive_seeds():
    assert image_fields(ImageBody(prompt="a fox")) == [{"prompt": "a fox"}]
    many = image_fields(ImageBody(prompt="a fox", n=3, seed=7, size="256x128", steps=4))
    assert [(one["seed"], one["width"], one["height"], one["steps"]) for one in many] == [(7, 256, 128, 4),
                                                                                        (8, 256, 128, 4),
                                                                                        (9, 256, 128, 4)]
    assert [one["seed"] for one in image_fields(ImageBody(prompt="a fox", n=2))] == [0, 1]


@pytest.mark.parametrize("body", [
    {"prompt": "a fox", "colour": "red"},  # unknown field
    {"prompt": ""},
    {"prompt": "a fox", "size": "64"},
    {"prompt": "a fox", "response_format": "url"},
    {"prompt": "a fox", "n": 9},
    {"prompt": "a fox", "id": "../etc/passwd"},
])
def test_image_bodies_that_cannot_be_served_are_refused_by_name(body):
    with pytest.raises(ValidationError):
        ImageBody(**body)


def test_video_and_completion_bodies():
    fields = video_fields(VideoBody(prompt=["a fox", "a forest"], segment_frames=[8, 8], frames=16, format="gif"))
    assert fields == [{"prompts": ("a fox", "a forest"), "segment_frames": (8, 8), "frames": 16, "format": "gif"}]
    assert video_fields(VideoBody(prompt="a fox"))[0]["prompts"] == ("a fox",)
    assert completion_fields(CompletionBody(context=256, max_tokens=6)) == [{"new_tokens": 6, "context": 256}]
    assert completion_fields(CompletionBody(temperature=0))[0]["sample"] is False
    assert completion_fields(CompletionBody(temperature=0.7))[0] == {"sample": True, "temperature": 0.7}
    streamed = completion_fields(CompletionBody(prompt="hi", stream=True, max_tokens=3))
    assert streamed == [{"prompt": "hi", "new_tokens": 3}]  # streaming is how it answers, not a request field
    for bad in ({"n": 2}, {"temperature": -1}, {"stop": ["\n"]}, {"context": 2e8}, {"context": 10**12},
                {"prompt_file": "/etc/passwd"}, {"messages": [{"role": "user", "content": "hi"}]}):
        with pytest.raises(ValidationError):
            CompletionBody(**bad)
    chat = ChatBody(messages=[{"role": "user", "content": "hi"}], max_completion_tokens=5, temperature=0)
    assert completion_fields(chat)[0]["new_tokens"] == 5 and "prompt" not in ChatBody.model_fields
    with pytest.raises(ValueError, match="not both"):
        completion_fields(ChatBody(messages=[{"role": "user", "content": "hi"}], max_tokens=2, max_completion_tokens=3))
    with pytest.raises(ValueError, match="give size, or height and width, not both"):
        image_fields(ImageBody(prompt="a fox", size="64x64", height=64))


def test_the_limits_name_their_flag_and_allow_the_models_own_size():
    limits = Limits(steps=50, pixels=128 * 128, frames=16, new_tokens=8)
    limits.check(ImageRequest(steps=50, height=128, width=128))
    limits.check(ImageRequest())  # the model's default size: the operator chose the model
    for request, flag in ((ImageRequest(steps=51), "--max-steps 50"), (ImageRequest(height=256, width=128), "--max-pixels"),
                          (LLMRequest(new_tokens=9), "--max-new-tokens 8")):
        with pytest.raises(ValueError, match=flag):
            limits.check(request)


# ---- the queue ---------------------------------------------------------------------------------------
def _status(call_) -> int:
    with pytest.raises(Outcome) as caught:
        call_()
    return caught.value.status


def test_the_front_queues_in_order_refuses_when_full_or_closed_and_counts():
    front, stopping = Front(max_queue=2), threading.Event()
    assert _status(lambda: front.submit([Ticket("a", 1)])) == 503 and front.health()[0] == 503  # still loading
    front.open()
    first, second = front.submit([Ticket("a", 1)]), front.submit([Ticket("b", 2)])
    assert _status(lambda: front.submit([Ticket("c", 3)])) == 429  # full: nothing of the refused batch is queued
    (ticket,) = front.next(1.0, stopping)
    assert (ticket.id, ticket.request) == ("a", 1) and front.health()[1]["in_flight"]
    assert _status(lambda: front.submit([Ticket("a", 5)])) == 409  # its id is being made
    assert _status(lambda: front.submit([Ticket("c", 3), Ticket("d", 4)])) == 429
    front.finish(ticket, {"done": 1}, generate_s=0.5)
    assert first[0].result(timeout=1) == {"done": 1}
    front.close(STOPPING, "shutting down")
    assert second[0].exception(timeout=1).status == 503 and front.health() [0] == 503
    assert front.next(0.05, stopping) is None
    metrics = front.metrics()
    assert 'paragen_requests_total{outcome="ok"} 1' in metrics and 'paragen_requests_total{outcome="unavailable"} 1' in metrics
    assert "paragen_generate_seconds_sum 0.500000" in metrics and "paragen_up 0" in metrics


def test_a_stop_signal_ends_the_wait_for_a_request_at_once():
    front, stopping = Front(max_queue=2), threading.Event()
    front.open()
    threading.Timer(0.1, stopping.set).start()
    started = time.monotonic()
    assert front.next(30.0, stopping) is None and time.monotonic() - started < 5


def test_the_front_drops_a_gone_clients_queued_request_and_marks_one_in_flight():
    front, stopping = Front(max_queue=4), threading.Event()
    front.open()
    running, waiting = Ticket("a", 1), Ticket("b", 2)
    futures = front.submit([running]) + front.submit([waiting])
    assert front.next(1.0, stopping) == [running]
    front.cancel([waiting], "the client went away")
    front.cancel([running], "the client went away")
    assert futures[1].exception(timeout=1).status == CLIENT_GONE and front.health()[1]["queue"] == 0
    assert running.cancelled and not futures[0].done()  # the ranks stop it at their next step
    assert front.next(0.05, stopping) is None  # the dropped one never reaches the ranks
    assert _status(lambda: front.submit([Ticket(str(i), i) for i in range(5)])) == 400  # can never fit: not 429


def test_a_stop_signal_makes_the_server_stopping_at_once():
    stopping = threading.Event()
    front = Front(max_queue=2, stopping=stopping)
    front.open()
    assert front.health()[0] == 200
    stopping.set()  # what the SIGTERM handler does, before the ranks' next round
    assert front.health() == (503, {"status": STOPPING, "queue": 0, "in_flight": False,
                                    "reason": "a stop signal arrived"})
    assert _status(lambda: front.submit([Ticket("a", 1)])) == 503


def test_a_closed_front_says_why():
    front = Front(1)
    front.open()
    front.submit([Ticket("x", 0)])
    front.close(BROKEN, "rank 1 died")
    assert front.health() == (503, {"status": "broken", "queue": 0, "in_flight": False, "reason": "rank 1 died"})


# ---- end to end on 2 ranks -------------------------------------------------------------------------
IMAGE = ["image", "--height", "64", "--width", "64", "--steps", "2", "--timeout", "60"]
TOKEN = "s3cret-token"
REQUESTS = [{"id": f"r{i}", "prompt": prompt, "seed": i, **extra} for i, (prompt, extra) in enumerate([
    ("a fox", {}), ("a cat", {"size": "128x64"}), ("a boat", {"steps": 3}), ("a fox", {}),
    ("a tree", {"guidance_scale": 3.0}), ("a house", {"negative_prompt": "blurry"}), ("a fox", {"size": "64x128"}),
    ("a bird", {}), ("a lake", {"steps": 1}), ("a moon", {})])]


def _png(b64: str) -> bytes:
    return base64.b64decode(b64)


@pytest.mark.slow
def test_a_server_on_two_ranks_serves_concurrent_clients_refuses_bad_input_and_stops_cleanly(tmp_path, monkeypatch):
    out = tmp_path / "served"
    monkeypatch.setenv("PARAGEN_API_KEY", TOKEN)
    with Server([*IMAGE, "--out", str(out), "--max-steps", "100"]) as server:
        url = server.url
        assert call(url, "/health").status == 200
        assert call(url, "/v1/images/generations", {"prompt": "a fox"}).status == 401
        assert call(url, "/v1/images/generations", {"prompt": "a fox"}, token="wrong").status == 401
        # a 300 MiB body: without a token 401 before a byte of it is read, with one 413 from its declared length
        huge = 300 << 20
        assert call_declaring(url, "/v1/images/generations", huge).status == 401
        too_big = call_declaring(url, "/v1/images/generations", huge, TOKEN)
        assert too_big.status == 413 and "--max-body-bytes" in too_big.body["error"]["message"], too_big

        # 10 requests from 5 clients at once
        with ThreadPoolExecutor(5) as clients:
            replies = list(clients.map(lambda body: call(url, "/v1/images/generations", body, TOKEN), REQUESTS))
        assert [reply.status for reply in replies] == [200] * len(REQUESTS), [r.body for r in replies]
        pngs = {body["id"]: _png(reply.body["data"][0]["b64_json"]) for body, reply in zip(REQUESTS, replies)}
        for body, reply in zip(REQUESTS, replies):
            width, height = map(int, body.get("size", "64x64").split("x"))
            assert Image.open(io.BytesIO(pngs[body["id"]])).size == (width, height)
            assert pngs[body["id"]] == (out / f"{body['id']}.png").read_bytes()
            assert reply.body["paragen"]["reports"][0]["request"]["seed"] == body["seed"]
        assert pngs["r0"] != pngs["r3"]  # same prompt, other seed

        # bad input: 4xx with a message, the server still serving
        bad = [(b"{not json", 400, "not valid JSON"), ({"prompt": "a fox", "colour": "red"}, 400, "colour"),
               ({"prompt": "a fox", "size": "0x64"}, 400, "width must be positive"),
               ({"prompt": "a fox", "size": "100x64"}, 400, "not a multiple of the VAE factor"),  # by the job's checks
               ({"prompt": "a fox", "model": "tiny-sdxl"}, 404, "not served here"),
               ({"prompt": "a fox", "id": "r1"}, 409, "already names outputs"),
               ({"prompt": "a fox", "guidance_scale": float("nan")}, 400, "finite number"),  # once written, then a 500
               ({"prompt": "a fox", "steps": 1000}, 400, "(--max-steps 100)"),  # once an IndexError 500
               ({"prompt": "a fox", "steps": 2.5}, 400, "steps must be a whole number"),
               ({"prompt": "a fox", "id": "manifest"}, 400, "reserved")]
        for body, status, words in bad:
            reply = call(url, "/v1/images/generations", body, TOKEN)
            assert reply.status == status and words in reply.body["error"]["message"], (body, reply)
        reply = call(url, "/v1/completions", {"prompt": "hi"}, TOKEN)
        assert reply.status == 404 and "runs the image job" in reply.body["error"]["message"]

        # a client that goes away: its queued request is never made, its request in flight stops at the next step
        slow = {"prompt": "a slow one", "size": "128x128", "steps": 30}
        with ThreadPoolExecutor(1) as client:
            kept = client.submit(call, url, "/v1/images/generations", {**slow, "id": "kept"}, TOKEN)
            wait_for(url, "paragen_in_flight 1")
            leaving = open_request(url, "/v1/images/generations", {"prompt": "never", "id": "gone-queued"}, TOKEN)
            wait_for(url, "paragen_queue_length 1")
            leaving.close()
            wait_for(url, 'paragen_requests_total{outcome="cancelled"} 1')
            assert "paragen_queue_length 0" in call(url, "/metrics").body
            assert kept.result(timeout=180).status == 200
        leaving = open_request(url, "/v1/images/generations", {**slow, "id": "gone-in-flight"}, TOKEN)
        wait_for(url, "paragen_in_flight 1")
        leaving.close()
        wait_for(url, 'paragen_requests_total{outcome="cancelled"} 2')
        stopped = re.search(r"request gone-in-flight: 499 .* cancelled after (\d+) denoising steps", server.log(0))
        assert stopped and int(stopped.group(1)) < 30, server.log(0)[-3000:]
        assert "request gone-queued" not in server.log(0)  # the ranks never saw it
        assert not list(out.glob("gone-*"))

        # a request that fails on the output rank only (its PNG's path is a folder): 500, then the server goes on
        (out / "clash.png").mkdir()
        reply = call(url, "/v1/images/generations", {"prompt": "a fox", "id": "clash"}, TOKEN)
        assert reply.status == 500 and reply.body["error"]["message"].startswith("rank 0: IsADirectoryError")
        again = call(url, "/v1/images/generations", {"prompt": "a fox", "seed": 0, "id": "after"}, TOKEN)
        assert again.status == 200 and _png(again.body["data"][0]["b64_json"]) == pngs["r0"]

        metrics = call(url, "/metrics").body
        assert f'paragen_requests_total{{outcome="ok"}} {len(REQUESTS) + 2}' in metrics
        # the size the ranks used to refuse is refused by the job's checks now, before it is queued
        assert 'paragen_requests_total{outcome="refused"} 0' in metrics
        assert 'paragen_requests_total{outcome="failed"} 1' in metrics

        # SIGTERM with a request in flight: it is answered in full or refused, every rank exits 0, no partial file
        slow = {"prompt": "a slow one", "size": "128x128", "steps": 30, "id": "last"}
        with ThreadPoolExecutor(1) as client:
            pending = client.submit(call, url, "/v1/images/generations", slow, TOKEN)
            wait_for(url, "paragen_in_flight 1")
            server.signal(signal.SIGTERM)
            health = call(url, "/health")  # stopping at once, while the request in flight goes on
            for _ in range(40):
                if health.status == 503:
                    break
                time.sleep(0.05)
                health = call(url, "/health")
            assert health.status == 503 and health.body["status"] == "stopping" and health.body["in_flight"], health
            refused = call(url, "/v1/images/generations", {"prompt": "too late"}, TOKEN)
            assert refused.status == 503 and refused.body["error"]["type"] == "unavailable", refused
            last = pending.result(timeout=120)
        assert server.wait() == [0, 0], server.log(0)[-2000:] + server.log(1)[-2000:]
        assert last.status in (200, 503), last
        if last.status == 200:
            assert _png(last.body["data"][0]["b64_json"]) == (out / "last.png").read_bytes()
        assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))
        for png in out.glob("*.png"):
            if png.is_file():
                Image.open(png).verify()

    # the server's images equal one-request launches of the same requests
    single = tmp_path / "single"
    for body in (REQUESTS[1], REQUESTS[4]):
        width, height = map(int, body.get("size", "64x64").split("x"))
        flags = ["--prompt", body["prompt"], "--seed", str(body["seed"]), "--width", str(width), "--height", str(height),
                 *(["--guidance-scale", str(body["guidance_scale"])] if "guidance_scale" in body else [])]
        check_all_ok(run_ranks(["-m", "paragen", *IMAGE, *flags, "--name", body["id"], "--out", str(single)], 2))
        assert (single / f"{body['id']}.png").read_bytes() == pngs[body["id"]], body


@pytest.mark.slow
def test_a_dead_rank_makes_the_server_answer_503_and_exit_non_zero():
    with Server([*IMAGE, "--timeout", "20"]) as server:
        slow = {"prompt": "a slow one", "size": "128x128", "steps": 50}
        with ThreadPoolExecutor(1) as client:
            pending = client.submit(call, server.url, "/v1/images/generations", slow)
            while 'paragen_in_flight 1' not in call(server.url, "/metrics").body:
                time.sleep(0.05)
            server.signal(signal.SIGKILL, ranks=(1,))
            started = time.monotonic()
            reply = pending.result(timeout=90)
        assert reply.status == 503 and "a rank failed" in reply.body["error"]["message"], reply
        statuses = server.wait(timeout=90)
        assert statuses[0] not in (0, None) and time.monotonic() - started < 60, statuses
        assert "communication failed" in server.log(0), server.log(0)[-2000:]


@pytest.mark.slow
def test_a_video_server_returns_each_video_inline(tmp_path):
    args = ["video", "--frames", "16", "--height", "64", "--width", "64", "--steps", "2", "--timeout", "60"]
    with Server([*args, "--out", str(tmp_path)]) as server:
        body = {"prompt": ["a fox", "a forest"], "segment_frames": [8, 8], "format": "gif", "id": "clip", "seed": 3}
        reply = call(server.url, "/v1/videos/generations", body)
        assert reply.status == 200, reply.body
        assert reply.body["data"][0]["mime_type"] == "image/gif"
        assert _png(reply.body["data"][0]["b64_json"]) == (tmp_path / "clip.gif").read_bytes()
        assert Image.open(tmp_path / "clip.gif").n_frames == 16
        assert call(server.url, "/v1/videos/generations", {"prompt": "a fox", "frames": 0}).status == 400


HIDDEN_EXTRA = """
import importlib.util, sys
found = importlib.util.find_spec
importlib.util.find_spec = lambda name, *rest: None if name in ("fastapi", "uvicorn") else found(name, *rest)
from paragen.launch.cli import main
sys.exit(main(["serve", "image", "--port", "0"]))
"""


def test_serve_without_its_extra_says_what_to_install_before_anything_starts():
    """It once printed nothing for 100 s (the process group and the model first, then the import)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HIDDEN_EXTRA], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "pip install 'paragen[serve]'" in done.stderr, done.stderr[-2000:]
    assert "process group up" not in done.stderr and time.monotonic() - started < 60
