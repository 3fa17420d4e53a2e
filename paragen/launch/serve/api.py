"""The HTTP shapes of `paragen serve`: each job's request body, what job requests it becomes, the server's limits,
and the response.

The OpenAI API's shape where one exists — `POST /v1/images/generations` (image), `POST /v1/completions` and
`POST /v1/chat/completions` (llm; answers whole, or streamed as server-sent events of OpenAI's chunks); video
follows the image shape at `POST /v1/videos/generations`. A body is derived from the job's request schema
(`paragen.pipelines.jobs.schema`): every field a client may set (`REQUEST` scope: prompt, messages, steps, seed, …)
with its declared type and bounds, beside OpenAI's own fields (`size`, `n`, `max_tokens`, …), which stand in for
the request fields they replace. Fields OpenAI has and paragen does not serve are refused by name
(`response_format: url`, `n > 1` for completions, `stop`); unknown fields are refused; numbers must be finite and
of the declared kind. The optional `id` names the request's output files in `--out`.
"""
from __future__ import annotations

import base64
import functools
import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from paragen.pipelines.jobs import schema
from paragen.pipelines.jobs.schema import ID_PATTERN, REQUEST
from paragen.pipelines.registry import JOBS

MAX_IMAGES = 8  # `n` of one image request
SIZE_PATTERN = r"^[0-9]{1,5}x[0-9]{1,5}$"
BODY_FIELDS = ("model", "id", "user")  # every body's, none a request field


class _Body(schema.Strict):
    model: str | None = None  # must name the served model when given
    id: str | None = Field(None, pattern=ID_PATTERN, description="names the output files in --out")
    user: str | None = None  # OpenAI's end-user tag: accepted, not used


class _ImageOpenAI(_Body):
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="images, with seeds seed, seed+1, …")
    run_async: bool = Field(False, alias="async", description="answer 202 with a job to poll (GET /v1/images/{id})")
    size: str | None = Field(None, pattern=SIZE_PATTERN, description="WIDTHxHEIGHT in pixels")
    response_format: Literal["b64_json"] = Field("b64_json", description="images come back inline (no URLs)")


class _VideoOpenAI(_Body):
    prompt: str | list[str] = Field(description="one prompt, or one per consecutive segment of the video")
    size: str | None = Field(None, pattern=SIZE_PATTERN, description="WIDTHxHEIGHT in pixels")
    response_format: Literal["b64_json"] = "b64_json"


class _StreamOptions(schema.Strict):
    include_usage: bool = False


class _CompletionOpenAI(_Body):
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate (the request's new_tokens)")
    temperature: float | None = Field(None, ge=0, description="0: greedy; omitted: the launch's choice")
    n: Literal[1] = 1
    stream: bool = Field(False, description="server-sent events as the ranks decide the tokens")
    stream_options: _StreamOptions | None = None


class _ChatOpenAI(_CompletionOpenAI):
    max_completion_tokens: int | None = Field(None, ge=1, description="tokens to generate (OpenAI's newer name)")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (`--max-*`), checked on the request as the client gave it, before
    anything is queued or allocated; the model's own default size is always allowed."""

    body_bytes: int = 16 << 20
    steps: int = 200
    pixels: int = 4096 * 4096
    frames: int = 2048
    new_tokens: int = 4096

    def check(self, request: Any) -> None:
        """ValueError naming the flag when `request` asks for more than a limit."""
        height, width = getattr(request, "height", None), getattr(request, "width", None)
        asked = [("steps", getattr(request, "steps", None), self.steps, "--max-steps"),
                 ("height × width", height * width if height and width else None, self.pixels, "--max-pixels"),
                 ("frames", getattr(request, "frames", None), self.frames, "--max-frames"),
                 ("new tokens", getattr(request, "new_tokens", None), self.new_tokens, "--max-new-tokens")]
        for what, value, most, flag in asked:
            if value is not None and value > most:
                raise ValueError(f"{what} {value} is more than this server allows ({flag} {most})")


def _size(body: Any) -> dict:
    """`size` as the request's width and height; refused beside them."""
    if body.size is None:
        return {}
    if {"height", "width"} & body.model_fields_set:
        raise ValueError("give size, or height and width, not both")
    width, height = (int(side) for side in body.size.split("x"))
    return {"width": width, "height": height}


def image_fields(body: Any) -> list[dict]:
    """The image job's request fields for each of the body's `n` images."""
    if body.run_async and body.n > 1:
        raise ValueError("an asynchronous job makes one image: send n = 1 (one job per image)")
    base = {**schema.given(body, BODY_FIELDS + ("n", "size", "response_format", "run_async")), **_size(body)}
    if body.n == 1:
        return [base]
    first = base.pop("seed", 0)
    return [{**base, "seed": first + i} for i in range(body.n)]


def video_fields(body: Any) -> list[dict]:
    """The video job's request fields."""
    prompts = (body.prompt,) if isinstance(body.prompt, str) else tuple(body.prompt)
    given = schema.given(body, BODY_FIELDS + ("prompt", "size", "response_format"))
    return [{"prompts": prompts, **given, **_size(body)}]


TEXT_FIELDS = BODY_FIELDS + ("max_tokens", "max_completion_tokens", "temperature", "n", "stream", "stream_options")


def completion_fields(body: Any) -> list[dict]:
    """The llm job's request fields (temperature 0: greedy; above: sampling at that temperature)."""
    if body.stream_options is not None and not body.stream:
        raise ValueError("stream_options applies to a streamed answer: add stream: true")
    given = schema.given(body, TEXT_FIELDS)
    sampling = {} if body.temperature is None else (
        {"sample": False} if body.temperature == 0 else {"sample": True, "temperature": body.temperature})
    most = [value for value in (body.max_tokens, getattr(body, "max_completion_tokens", None)) if value is not None]
    if len(most) > 1:
        raise ValueError("give max_tokens or max_completion_tokens, not both")
    return [{**given, **({"new_tokens": most[0]} if most else {}), **sampling}]


def chat_fields(body: Any) -> list[dict]:
    """The llm job's request fields of a chat body (its messages through the tokenizer's chat template)."""
    if body.messages is None:
        raise ValueError("messages is required")
    return completion_fields(body)


def _b64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def image_response(request_id: str, model: str, reports: list[dict]) -> dict:
    """`{created, data: [{b64_json}], paragen: {...}}`, the PNGs read back from the files the job wrote."""
    return {"created": int(time.time()), "data": [{"b64_json": _b64(report["image"])} for report in reports],
            "paragen": {"id": request_id, "model": model, "reports": reports}}


def video_response(request_id: str, model: str, reports: list[dict]) -> dict:
    """Like the image response, with each video's MIME type (MP4, or GIF)."""
    data = [{"b64_json": _b64(report["video"]),
             "mime_type": "video/mp4" if report["video"].endswith(".mp4") else "image/gif"} for report in reports]
    return {"created": int(time.time()), "data": data, "paragen": {"id": request_id, "model": model, "reports": reports}}


@dataclass(frozen=True)
class TextShape:
    """How a text endpoint answers, whole or streamed: OpenAI's completions (`text`) or chat completions
    (`message` whole, `delta` streamed)."""

    prefix: str  # of the answer's id
    object: str
    chunk_object: str
    chat: bool

    def response(self, request_id: str, model: str, reports: list[dict]) -> dict:
        """The whole answer: its text, why it ended, usage, and paragen's report."""
        report = reports[0]
        choice = ({"message": {"role": "assistant", "content": report["text"]}} if self.chat
                  else {"text": report["text"]})
        return {**self._head(request_id, model, self.object),
                "choices": [{"index": 0, **choice, "finish_reason": report["finish_reason"], "logprobs": None}],
                "usage": usage(report), "paragen": {"id": request_id, "reports": reports}}

    def chunk(self, request_id: str, model: str, text: str | None, finish: str | None = None) -> dict:
        """One streamed piece: `text` (None: the chat's first chunk, which names the role), or the last, empty
        one with `finish`."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            choice = {"delta": delta}
        else:
            choice = {"text": text or ""}
        return {**self._head(request_id, model, self.chunk_object),
                "choices": [{"index": 0, **choice, "finish_reason": finish, "logprobs": None}]}

    def usage_chunk(self, request_id: str, model: str, report: dict) -> dict:
        """The chunk after the last, with no choice and the usage (`stream_options.include_usage`)."""
        return {**self._head(request_id, model, self.chunk_object), "choices": [], "usage": usage(report)}

    def _head(self, request_id: str, model: str, kind: str) -> dict:
        return {"id": f"{self.prefix}-{request_id}", "object": kind, "created": int(time.time()), "model": model}


def usage(report: dict) -> dict:
    """OpenAI's token counts of a finished completion."""
    new = len(report["new_tokens"])
    return {"prompt_tokens": report["prompt_tokens"], "completion_tokens": new,
            "total_tokens": report["prompt_tokens"] + new}


COMPLETIONS = TextShape("cmpl", "text_completion", "text_completion", chat=False)
CHAT = TextShape("chatcmpl", "chat.completion", "chat.completion.chunk", chat=True)


@dataclass(frozen=True)
class Endpoint:
    """One job's route: its path, its request class and OpenAI fields (whose schema make the body), the request
    fields those OpenAI fields replace, how a body becomes job requests, and how their reports become a response."""

    job: str
    path: str
    request_class: str  # in the job's module
    openai: type[_Body]
    replaced: tuple[str, ...]  # request fields a body sets through OpenAI's instead
    fields: Callable[[Any], list[dict]]
    response: Callable[[str, str, list[dict]], dict]
    text: TextShape | None = None  # a text endpoint: its answers can be streamed
    jobs: str | None = None  # where its asynchronous jobs live (`POST` there: always a job; a job's `/{id}` routes)
    output: str | None = None  # the report's key of the file a job's content is

    def body(self) -> type[_Body]:
        """The body's model: the OpenAI fields and the request's `REQUEST` fields (less `replaced`)."""
        return body_model(self)


@functools.cache
def body_model(endpoint: Endpoint) -> type[_Body]:
    request_class = getattr(importlib.import_module(JOBS[endpoint.job][0]), endpoint.request_class)
    return schema.fields_model(request_class, (REQUEST,), endpoint.openai, endpoint.replaced)


_NOT_TEXT = ("new_tokens", "sample", "temperature")  # set through max_tokens and temperature
ENDPOINTS = {  # every job's endpoints, its main one first
    "image": (Endpoint("image", "/v1/images/generations", "ImageRequest", _ImageOpenAI, (), image_fields,
                       image_response, jobs="/v1/images", output="image"),),
    "video": (Endpoint("video", "/v1/videos/generations", "VideoRequest", _VideoOpenAI, ("prompts",), video_fields,
                       video_response, jobs="/v1/videos", output="video"),),
    "llm": (Endpoint("llm", "/v1/completions", "LLMRequest", _CompletionOpenAI, (*_NOT_TEXT, "messages"),
                     completion_fields, COMPLETIONS.response, COMPLETIONS),
            Endpoint("llm", "/v1/chat/completions", "LLMRequest", _ChatOpenAI,
                     (*_NOT_TEXT, "prompt", "context", "depth"), chat_fields, CHAT.response, CHAT)),
}
