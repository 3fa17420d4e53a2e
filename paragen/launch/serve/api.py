"""The HTTP shapes of `paragen serve`: each job's request body, what job requests it becomes, and the response.

The OpenAI API's shape where one exists — `POST /v1/images/generations` (image) and `POST /v1/completions` (llm);
video follows the image shape at `POST /v1/videos/generations`. Fields OpenAI has and paragen does not serve are
refused by name (`response_format: url`, `stream`, `n > 1` for completions); paragen's own request fields (seed,
steps, guidance scale, frames, …) sit beside OpenAI's. Unknown fields are refused. Ranges are the job's own
request checks, not repeated here. The optional `id` names the request's output files in `--out`.
"""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from paragen.pipelines.jobs.batch import ID_PATTERN

MAX_IMAGES = 8  # `n` of one image request
SIZE_PATTERN = r"^[0-9]{1,5}x[0-9]{1,5}$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # must name the served model when given
    id: str | None = Field(None, pattern=ID_PATTERN, description="names the output files in --out")
    user: str | None = None  # OpenAI's end-user tag: accepted, not used


class ImageBody(_Body):
    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="images, with seeds seed, seed+1, …")
    size: str | None = Field(None, pattern=SIZE_PATTERN, description="WIDTHxHEIGHT in pixels")
    response_format: Literal["b64_json"] = Field("b64_json", description="images come back inline (no URLs)")
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None


class VideoBody(_Body):
    prompt: str | list[str] = Field(description="one prompt, or one per consecutive segment of the video")
    segment_frames: list[int] | None = None
    negative_prompt: str | None = None
    frames: int | None = None
    size: str | None = Field(None, pattern=SIZE_PATTERN, description="WIDTHxHEIGHT in pixels")
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    fps: int | None = None
    format: Literal["mp4", "gif"] | None = None
    response_format: Literal["b64_json"] = "b64_json"


class CompletionBody(_Body):
    prompt: str | None = Field(None, description="text (local checkpoints); embedded passkey models take context/depth")
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, description="0: greedy; omitted: the launch's choice")
    top_k: int | None = None
    seed: int | None = None
    n: Literal[1] = 1
    stream: Literal[False] = False
    context: int | None = None  # embedded passkey models: tokens of the passkey prompt ...
    depth: float | None = None  # ... and where the key sits


def _size(size: str | None) -> dict:
    if size is None:
        return {}
    width, height = (int(side) for side in size.split("x"))
    return {"width": width, "height": height}


def _given(**fields: Any) -> dict:
    return {key: value for key, value in fields.items() if value is not None}


def image_fields(body: ImageBody) -> list[dict]:
    """The image job's request fields for each of the body's `n` images."""
    base = _given(prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps,
                  guidance_scale=body.guidance_scale, **_size(body.size))
    if body.n == 1:
        return [_given(**base, seed=body.seed)]
    first = 0 if body.seed is None else body.seed
    return [{**base, "seed": first + i} for i in range(body.n)]


def video_fields(body: VideoBody) -> list[dict]:
    """The video job's request fields."""
    prompts = (body.prompt,) if isinstance(body.prompt, str) else tuple(body.prompt)
    segments = None if body.segment_frames is None else tuple(body.segment_frames)
    return [_given(prompts=prompts, segment_frames=segments, negative_prompt=body.negative_prompt, frames=body.frames,
                   steps=body.steps, guidance_scale=body.guidance_scale, seed=body.seed, fps=body.fps,
                   format=body.format, **_size(body.size))]


def completion_fields(body: CompletionBody) -> list[dict]:
    """The llm job's request fields (temperature 0: greedy; above: sampling at that temperature)."""
    sampling = {} if body.temperature is None else (
        {"sample": False} if body.temperature == 0 else {"sample": True, "temperature": body.temperature})
    return [_given(prompt=body.prompt, new_tokens=body.max_tokens, top_k=body.top_k, seed=body.seed,
                   context=body.context, depth=body.depth, **sampling)]


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
    """One job's route: its path, body, how a body becomes job requests, and how their reports become a response."""

    path: str
    body: type[_Body]
    fields: Callable[[Any], list[dict]]
    response: Callable[[str, str, list[dict]], dict]


ENDPOINTS = {
    "image": Endpoint("/v1/images/generations", ImageBody, image_fields, image_response),
    "video": Endpoint("/v1/videos/generations", VideoBody, video_fields, video_response),
    "llm": Endpoint("/v1/completions", CompletionBody, completion_fields, completion_response),
}
