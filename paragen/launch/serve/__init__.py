"""`paragen serve image|video|llm`: every rank keeps the job's model loaded and parallelised; the output rank
answers HTTP and hands each request to all ranks.

    torchrun --nproc-per-node 2 -m paragen serve image --model /models/sdxl --cfg 2 --port 8000
    curl -s localhost:8000/v1/images/generations -d '{"prompt": "a lighthouse", "size": "1024x1024"}'

The job's options are those of `paragen image|video|llm` (the defaults of every request); the serving options
are below. The output rank listens on 127.0.0.1 unless `--host` says otherwise; with `PARAGEN_API_KEY` (or the
variable `--api-key-env` names) set, the job's endpoint wants that bearer token. Each request is held to the
server's limits (`--max-body-bytes`, `--max-steps`, `--max-pixels`, `--max-frames`, `--max-new-tokens`). Requests
wait in a queue and are made by all ranks together, image requests that differ only in prompt and seed in batches
of up to `--max-batch` (waiting `--batch-wait-ms` for company); each request's outputs are written to `--out` as the
job writes them (named by the request's id) and come back inline, or, for an asynchronous job (`POST /v1/videos`,
`"async": true`), are fetched by its id (`jobs.py`). A client that goes away has its request dropped from the
queue, or stopped at the ranks' next step. SIGTERM or SIGINT on any rank: the server is stopping at once
(`/health` and new requests 503), the batch in flight finishes, those waiting get 503, every rank exits 0. A dead
or stuck rank: 503 for everything waiting, then a non-zero exit.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import signal
import socket
import threading
import time
from typing import Any

from paragen.comms import all_gather_objects, is_output_rank, world_comm
from paragen.launch.env import discover
from paragen.launch.process_group import init
from paragen.launch.runner import JobRunner
from paragen.launch.serve.api import Limits
from paragen.launch.serve.front import BROKEN, STOPPING, Front
from paragen.launch.serve.loop import serve_ranks
from paragen.log import get_logger
from paragen.parallel.step_cache.config import PROBED
from paragen.pipelines.jobs.agree import attempt
from paragen.pipelines.jobs.batch import agree_prepared
from paragen.pipelines.sources import display_name

HEARTBEAT_S = 2.0  # at most this long between the ranks' rounds while idle
GRACE_S = 30.0  # how long responses in flight may take to go out at shutdown


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The serving options (beside the job's own)."""
    g = p.add_argument_group("serving")
    g.add_argument("--host", default="127.0.0.1", help="address the output rank listens on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port; the log names it)")
    g.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 429")
    g.add_argument("--max-batch", type=int, default=1,
                   help="image job: make up to this many waiting requests that differ only in prompt and seed in one "
                        "pipeline call (each the bytes it would be alone in this server; 1: one at a time)")
    g.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="with --max-batch: how long a request may wait for others to join its batch (0: batch only "
                        "what is already waiting)")
    g.add_argument("--api-key-env", default="PARAGEN_API_KEY",
                   help="environment variable holding the bearer token clients must send (unset or empty: none)")
    limits = Limits()
    g.add_argument("--max-body-bytes", type=int, default=limits.body_bytes, help="largest request body (413 beyond)")
    g.add_argument("--max-steps", type=int, default=limits.steps, help="most denoising steps a request may ask for")
    g.add_argument("--max-pixels", type=int, default=limits.pixels,
                   help="most pixels (height × width) an image or a video frame may have; the model's own default "
                        "size is always allowed")
    g.add_argument("--max-frames", type=int, default=limits.frames, help="most frames a video may have")
    g.add_argument("--max-new-tokens", type=int, default=limits.new_tokens,
                   help="most tokens a completion may generate")


def _check(args: argparse.Namespace, module: Any) -> tuple[str | None, Limits]:
    """Refuse options that do not apply to a server, and a server without its optional packages (before the
    process group, on every rank alike); the API key, if one is set, and the limits."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"paragen serve needs {' and '.join(missing)}, which this environment lacks: "
                         "pip install 'paragen[serve]'")
    given = [flag for flag, value in (("--requests", args.requests), ("--name", args.name),
                                      ("--checkpoint", getattr(args, "checkpoint", None)),
                                      ("--resume", getattr(args, "resume", None))) if value]
    if given:
        raise ValueError(f"{', '.join(given)}: not for a server (requests come over HTTP, each named by its id)")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch > 1 and not hasattr(module, "batch_key"):
        raise ValueError(f"--max-batch: the {args.serve_job} job makes one request at a time ({module.MADE_ALONE})")
    if args.max_batch > 1 and getattr(args, "cache", "none") in PROBED:
        raise ValueError(f"--max-batch with --cache {args.cache}: its decision reads the change of the whole batch, "
                         "so a request's output would depend on the requests batched with it; use --cache taylorseer "
                         "(a schedule of the step) or --max-batch 1")
    if not 0 <= args.batch_wait_ms <= 60_000:
        raise ValueError(f"--batch-wait-ms must be in 0..60000, got {args.batch_wait_ms}")
    bounds = {"--max-queue": args.max_queue, "--max-batch": args.max_batch, "--max-body-bytes": args.max_body_bytes,
              "--max-steps": args.max_steps, "--max-pixels": args.max_pixels, "--max-frames": args.max_frames,
              "--max-new-tokens": args.max_new_tokens}
    for flag, value in bounds.items():
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    limits = Limits(body_bytes=args.max_body_bytes, steps=args.max_steps, pixels=args.max_pixels,
                    frames=args.max_frames, new_tokens=args.max_new_tokens)
    return os.environ.get(args.api_key_env) or None, limits


def _listen(host: str, port: int) -> tuple[socket.socket | None, str | None]:
    """A listening socket on host:port, or why there is none."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family), None
    except OSError as error:
        return None, f"cannot listen on {host}:{port}: {error.strerror or error}"


class _Http:
    """uvicorn serving `app` on `sock` in a thread of this process."""

    def __init__(self, app: Any, sock: socket.socket) -> None:
        import uvicorn

        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=GRACE_S)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="paragen-http",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the HTTP server stopped while starting (see the lines above)")
            time.sleep(0.02)

    def stop(self) -> None:
        """Close the socket and let the responses in flight go out."""
        self.server.should_exit = True
        self.thread.join(timeout=GRACE_S + 5)


def serve(args: argparse.Namespace, module: Any) -> int:
    """The lifecycle of `paragen serve <job>`: check, init, listen, load, serve until a signal; the exit status."""
    api_key, limits = _check(args, module)
    job, verdict = attempt(lambda _: dataclasses.replace(module.prepare(args, discover()),
                                                         batch_invariant=args.max_batch > 1), None)
    init(device=args.device, init_timeout_s=args.init_timeout, timeout_s=args.timeout, threads=args.threads,
         verbose=args.verbose)
    comm, log = world_comm(), get_logger()
    agree_prepared(comm, job, verdict)
    sock, problem = _listen(args.host, args.port) if is_output_rank() else (None, None)
    problem = all_gather_objects(comm, problem)[0]
    if problem:
        raise ValueError(problem)
    stopping = threading.Event()
    previous = {number: signal.signal(number, lambda *_: stopping.set()) for number in (signal.SIGTERM, signal.SIGINT)}
    runner = JobRunner.prepared(args.serve_job, module, job)
    front = Front(args.max_queue, stopping, args.max_batch, args.batch_wait_ms / 1000) if is_output_rank() else None
    http = None
    try:
        if front is not None:
            from paragen.launch.serve.app import build_app

            model = display_name(args.model)
            app = build_app(args.serve_job, model, runner, front, args.out, threading.Lock(), api_key, limits)
            http = _Http(app, sock)
            http.start()
            host, port = sock.getsockname()[:2]
            log.info("listening on http://%s:%d (loading %s)", host, port, model)
        runner.load()
        if front is not None:
            front.open()
            log.info("serving %s on http://%s:%d%s", args.serve_job, host, port, " (API key required)" if api_key else "")
        serve_ranks(runner, front, stopping, min(HEARTBEAT_S, args.timeout / 4))
        log.info("stopping: a rank was asked to (SIGTERM/SIGINT)")
        if front is not None:
            front.close(STOPPING, "shutting down")
        return 0
    except BaseException as error:
        if front is not None:
            front.close(BROKEN, f"{type(error).__name__}: {error}")
        raise
    finally:
        if http is not None:
            http.stop()
        for number, handler in previous.items():
            signal.signal(number, handler)
