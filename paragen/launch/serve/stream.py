"""An LLM's answer streamed as server-sent events in OpenAI's chunk format, while the ranks decode it.

The ranks' loop hands the output rank's new token ids to `TokenFeed.put` (from its thread; every token, or a
speculative round's accepted tokens together); `events` turns them into text as they come (`TextStream`) and sends a
chunk for each piece, then a last chunk saying why the answer ended, the usage when asked
(`stream_options.include_usage`), and `data: [DONE]`. A request that fails after the stream began ends with an error
event in OpenAI's error shape. A client that goes away (seen while waiting, or when a chunk cannot be sent) has its
request stopped by the ranks at their next token.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable

from paragen.launch.serve.api import TextShape
from paragen.launch.serve.front import Outcome
from paragen.pipelines.jobs.llm_text import TextStream

WATCH_S = 0.25  # how often the connection is checked while no token comes


class TokenFeed:
    """Token ids from the ranks' thread to the event loop of the request's connection."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[list[int]] = asyncio.Queue()

    def put(self, ids: list[int]) -> None:
        """Called on the ranks' thread as tokens are decided."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ids)


def event(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def events(shape: TextShape, request_id: str, model: str, feed: TokenFeed, done: asyncio.Future,
                 text: TextStream, include_usage: bool, gone: Callable[[], Any], cancel: Callable[[], None],
                 error: Callable[[Outcome], dict]) -> AsyncIterator[str]:
    """The events of one streamed answer: `done` resolves to the report (or an Outcome); `gone()` says whether the
    client has left; `cancel()` stops the request; `error` shapes a failure."""
    try:
        if shape.chat:
            yield event(shape.chunk(request_id, model, None))
        while not done.done():
            getter = asyncio.ensure_future(feed.queue.get())
            finished, _ = await asyncio.wait({getter, done}, timeout=WATCH_S, return_when=asyncio.FIRST_COMPLETED)
            if getter in finished:
                piece = text.add(getter.result())
                if piece:
                    yield event(shape.chunk(request_id, model, piece))
                continue
            getter.cancel()
            if not finished and await gone():
                return
        try:
            report = done.result()
        except Outcome as failure:
            yield event(error(failure))
            yield event("[DONE]")
            return
        rest = text.rest(report["text"])
        if rest:
            yield event(shape.chunk(request_id, model, rest))
        yield event(shape.chunk(request_id, model, "", report["finish_reason"]))
        if include_usage:
            yield event(shape.usage_chunk(request_id, model, report))
        yield event("[DONE]")
    finally:
        if not done.done():
            cancel()


__all__ = ["TokenFeed", "event", "events"]
