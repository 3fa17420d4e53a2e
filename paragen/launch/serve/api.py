"""The HTTP shapes of `paragen serve`: each job's request body, what job requests it becomes, the server's limits,
and the response.

The OpenAI API's shape where one exists — `POST /v1/images/generations` (image) and `POST /v1/completions` (llm);
video follows the image shape at `POST /v1/videos/generations`. A body is derived from the job's request schema
(`paragen.pipelines.jobs.schema`): every field a client may set (`REQUEST` scope: prompt, steps, seed, …) with its
declared type and bounds, beside OpenAI's own fields (`size`, `n`, `max_tokens`, …), which stand in for the request
fields they replace. Fields OpenAI has and paragen does not serve are refused by name (`response_format: url`,
`stream`, `n > 1` for completions); unknown fields are refused; numbers must be finite and of the declared kind.
The optional `id` names the request's output files in `--out`.
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
    size: str | None = Field(None, pattern=SIZE_PATTERN, description="WIDTHxHEIGHT in pixels")
    response_format: Literal["b64_json"] = Field("b64_json", description="images come back inline (no URLs)")


class _VideoOpenAI(_Body):
    prompt: str | list[str] = Field(description="one prompt, or one per consecutive segment of the video")
    size: str | None = Field(None, pattern=SIZE_PATTERN, description="WIDTHxHEIGHT in pixels")
    response_format: Literal["b64_json"] = "b64_json"


class _CompletionOpenAI(_Body):
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate (the request's new_tokens)")
    temperature: float | None = Field(None, ge=0, description="0: greedy; omitted: the launch's choice")
    n: Literal[1] = 1
    stream: Literal[False] = False


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
    base = {**schema.given(body, BODY_FIELDS + ("n", "size", "response_format")), **_size(body)}
    if body.n == 1:
        return [base]
    first = base.pop("seed", 0)
    return [{**base, "seed": first + i} for i in range(body.n)]


def video_fields(body: Any) -> list[dict]:
    """The video job's request fields."""
    prompts = (body.prompt,) if isinstance(body.prompt, str) else tuple(body.prompt)
    given = schema.given(body, BODY_FIELDS + ("prompt", "size", "response_format"))
    return [{"prompts": prompts, **given, **_size(body)}]


def completion_fields(body: Any) -> list[dict]:
    """The llm job's request fields (temperature 0: greedy; above: sampling at that temperature)."""
    given = schema.given(body, BODY_FIELDS + ("max_tokens", "temperature", "n", "stream"))
    sampling = {} if body.temperature is None else (
        {"sample": False} if body.temperature == 0 else {"sample": True, "temperature": body.temperature})
    tokens = {} if body.max_tokens is None else {"new_tokens": body.max_tokens}
    return [{**given, **tokens, **sampling}]


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


def completion_response(request_id: str, model: str, reports: list[dict]) -> dict:
    """An OpenAI text completion: the text (a passkey model's answer digits), usage, and paragen's report."""
    report = reports[0]
    new = len(report["new_tokens"])
    text = report["text"] if "text" in report else report["answer"]
    finish = "length" if new >= report["request"]["new_tokens"] else "stop"
    return {"id": f"cmpl-{request_id}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": report["prompt_tokens"], "completion_tokens": new,
                      "total_tokens": report["prompt_tokens"] + new},
            "paragen": {"id": request_id, "reports": reports}}


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

    def body(self) -> type[_Body]:
        """The body's model: the OpenAI fields and the request's `REQUEST` fields (less `replaced`)."""
        return body_model(self)


@functools.cache
def body_model(endpoint: Endpoint) -> type[_Body]:
    request_class = getattr(importlib.import_module(JOBS[endpoint.job][0]), endpoint.request_class)
    return schema.fields_model(request_class, (REQUEST,), endpoint.openai, endpoint.replaced)


ENDPOINTS = {
    "image": Endpoint("image", "/v1/images/generations", "ImageRequest", _ImageOpenAI, (), image_fields,
                      image_response),
    "video": Endpoint("video", "/v1/videos/generations", "VideoRequest", _VideoOpenAI, ("prompts",), video_fields,
                      video_response),
    "llm": Endpoint("llm", "/v1/completions", "LLMRequest", _CompletionOpenAI, ("new_tokens", "sample", "temperature"),
                    completion_fields, completion_response),
}
