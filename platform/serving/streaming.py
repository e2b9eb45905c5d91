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

T = TypeVar("T")

DONE = "data: [DONE]\n\n"


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
