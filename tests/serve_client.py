"""A `paragen serve` job on real ranks, and a plain HTTP client for it (the standard library's, so the test
exercises the server, not a client library)."""
from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from tests.multiproc import start_ranks

READY = re.compile(r"serving \w+ on (http://\S+)")


@dataclass
class Reply:
    status: int
    body: dict | str | bytes


def call(url: str, path: str, body: dict | bytes | None = None, token: str | None = None,
         timeout: float = 300) -> Reply:
    """POST `body` (JSON, or raw bytes) to `url + path`, or GET without a body; the status and decoded body."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url + path, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, kind = response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as error:
        status, raw, kind = error.code, error.read(), error.headers.get("content-type", "")
    return Reply(status, json.loads(raw) if kind.startswith("application/json") else raw.decode())


def fetch(url: str, path: str, timeout: float = 60) -> Reply:
    """GET `url + path`; the status and the raw bytes of the body (a file), or the decoded JSON of an error."""
    try:
        with urllib.request.urlopen(url + path, timeout=timeout) as response:
            return Reply(response.status, response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, json.loads(error.read()))


def delete(url: str, path: str, timeout: float = 60) -> Reply:
    """DELETE `url + path`; the status and decoded body."""
    request = urllib.request.Request(url + path, method="DELETE")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, json.loads(response.read()))
    except urllib.error.HTTPError as error:
        return Reply(error.code, json.loads(error.read()))


def _connection(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=60)


def call_declaring(url: str, path: str, length: int, token: str | None = None, send: int = 65536) -> Reply:
    """POST with a declared Content-Length of `length` bytes of which only the first `send` are sent: the server must
    answer from the headers (or the bytes it has) without waiting for the rest."""
    connection = _connection(url)
    connection.putrequest("POST", path)
    for name, value in {"Content-Type": "application/json", "Content-Length": str(length),
                        **({"Authorization": f"Bearer {token}"} if token else {})}.items():
        connection.putheader(name, value)
    connection.endheaders()
    try:
        connection.send(b" " * min(send, length))
    except OSError:
        pass  # the server may close the connection once it has answered
    response = connection.getresponse()
    raw, kind = response.read(), response.getheader("content-type", "")
    connection.close()
    return Reply(response.status, json.loads(raw) if kind.startswith("application/json") else raw.decode())


def open_request(url: str, path: str, body: dict, token: str | None = None) -> http.client.HTTPConnection:
    """POST `body` without reading the answer; `.close()` the connection to be a client that went away."""
    connection = _connection(url)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    connection.request("POST", path, body=json.dumps(body).encode(), headers=headers)
    return connection


def wait_for(url: str, text: str, timeout: float = 120) -> str:
    """Poll `/metrics` until it holds `text`; the metrics then."""
    deadline = time.monotonic() + timeout
    while text not in (metrics := call(url, "/metrics").body):
        if time.monotonic() > deadline:
            raise AssertionError(f"/metrics never said {text!r}:\n{metrics}")
        time.sleep(0.05)
    return metrics


@dataclass
class Server:
    """`python -m paragen serve <args>` on `ranks` ranks, each rank's stderr collected as it comes."""

    args: list[str]
    ranks: int = 2
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[list[str]] = field(default_factory=list)
    url: str = ""

    def start(self, wait_s: float = 240) -> "Server":
        self.procs = start_ranks(["-m", "paragen", "serve", *self.args, "--port", "0"], self.ranks)
        self.logs = [[] for _ in self.procs]
        for proc, lines in zip(self.procs, self.logs):
            threading.Thread(target=lambda p=proc, out=lines: out.extend(p.stderr), daemon=True).start()
        deadline = time.monotonic() + wait_s
        while not self.url:
            found = READY.search(self.log(0))
            if found:
                self.url = found.group(1)
            elif time.monotonic() > deadline or any(proc.poll() is not None for proc in self.procs):
                self.stop()
                raise AssertionError(f"the server did not come up:\n{self.log(0)[-4000:]}")
            time.sleep(0.05)
        return self

    def log(self, rank: int) -> str:
        return "".join(self.logs[rank])

    def signal(self, number: int = signal.SIGTERM, ranks: tuple[int, ...] | None = None) -> None:
        for rank in range(self.ranks) if ranks is None else ranks:
            self.procs[rank].send_signal(number)

    def wait(self, timeout: float = 120) -> list[int]:
        """Every rank's exit status (AssertionError naming the ranks still running after `timeout`)."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stop()
                raise AssertionError(f"rank(s) still running after {timeout} s:\n{self.log(0)[-3000:]}") from None
        return [proc.returncode for proc in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()
