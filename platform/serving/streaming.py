"""Server-sent events and fan-in of per-prompt token streams.

OpenAI streams are SSE: one `data: <json>` event per chunk, then
`data: [DONE]`. A request with several prompts streams their choices
interleaved as they are produced (each chunk names its choice index), so the
per-prompt streams are merged as they arrive rather than one after another.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Sequence, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive

T = TypeVar("T")

DONE = "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """An SSE response that ends quietly when its client goes away.

    Starlette streams while it listens for the client's `http.disconnect`.
    Behind Ray Serve, a dropped connection instead makes `receive()` raise
    (the proxy cancels the call relaying the client's messages); left alone,
    that error ends the request task after Serve stopped waiting for it, and
    asyncio logs "Future exception was never retrieved" in the replica log. It
    means the same thing: stop streaming, which cancels the generation.
    """

    media_type = "text/event-stream"

    async def listen_for_disconnect(self, receive: Receive) -> None:
        try:
            await super().listen_for_disconnect(receive)
        except Exception:   # noqa: BLE001 - any failure to hear the client means it is gone
            return


def sse(payload: Any) -> str:
    """One SSE event carrying `payload` (a pydantic model or plain JSON data)."""
    if hasattr(payload, "model_dump_json"):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def merge(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(stream index, item) from all `streams`, in the order items arrive."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    finished = object()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except BaseException as exc:   # hand the failure to the consumer
            await queue.put((i, exc))
            return
        await queue.put((i, finished))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is finished:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
