"""The bridge from the engine's decode thread to one HTTP request's coroutine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from llm.serve import completions, errors
from llm.serve.engine import Engine, Event, Finished
from llm.serve.errors import APIError

_GONE = (-1, None)  # Put on the queue when the client disconnects.


class Job:
    """The engine requests of one HTTP request; their events arrive on an asyncio queue as (choice, event)."""

    def __init__(self, engine: Engine, plan: completions.Plan):
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        # The engine calls `emit` on its own thread; asyncio queues are not thread-safe, so hop to the loop.
        emit = lambda index: lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        self.tickets = []
        self._watcher: asyncio.Task | None = None
        try:
            for index, request in enumerate(plan.requests):
                self.tickets.append(engine.submit(request, emit(index)))
        except ValueError as error:
            self.cancel()
            raise APIError(400, str(error)) from None

    def cancel(self) -> None:
        """Frees the engine slots before the next decode step (and stops watching the client)."""
        for ticket in self.tickets:
            ticket.cancel()
        if self._watcher is not None:
            self._watcher.cancel()

    def watch(self, receive: Callable[[], Awaitable[dict]]) -> None:
        """Cancels the job the moment the client disconnects: `receive` is the request's ASGI receive channel,
        whose body has been read, so its next message is the disconnect. Tokens keep arriving meanwhile, so
        waiting for a quiet moment to ask would never notice a client that left mid-generation."""

        async def wait_for_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            for ticket in self.tickets:
                ticket.cancel()
            self.queue.put_nowait(_GONE)

        self._watcher = asyncio.create_task(wait_for_disconnect())

    async def events(self, deadline: float) -> AsyncIterator[tuple[int, Event]]:
        """Every choice's events until all have finished; 504 past `deadline` (time.monotonic), 499 when a
        watched client disconnects."""
        remaining = len(self.tickets)
        while remaining:
            try:
                index, event = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise APIError(
                    504, "The request timed out before the model finished.", "timeout", code="timeout"
                ) from None
            if (index, event) == _GONE:
                raise errors.client_disconnected()
            if isinstance(event, Finished):
                remaining -= 1
                if event.reason == "error":
                    raise APIError(500, f"Generation failed: {event.error}", "server_error")
                if event.reason == "cancelled":
                    raise APIError(503, "The server is shutting down.", "server_error")
            yield index, event
