"""The bridge from the engine's decode thread to one HTTP request's coroutine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from llm.serve import completions
from llm.serve.engine import Engine, Event, Finished
from llm.serve.errors import APIError

_POLL_S = 1.0  # How often a waiting non-streaming request checks whether its client has gone.


class Job:
    """The engine requests of one HTTP request; their events arrive on an asyncio queue as (choice, event)."""

    def __init__(self, engine: Engine, plan: completions.Plan):
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        # The engine calls `emit` on its own thread; asyncio queues are not thread-safe, so hop to the loop.
        emit = lambda index: lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        self.tickets = []
        try:
            for index, request in enumerate(plan.requests):
                self.tickets.append(engine.submit(request, emit(index)))
        except ValueError as error:
            self.cancel()
            raise APIError(400, str(error)) from None

    def cancel(self) -> None:
        for ticket in self.tickets:
            ticket.cancel()

    async def events(
        self, deadline: float, disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[tuple[int, Event]]:
        """Every choice's events until all have finished; 504 past `deadline` (time.monotonic)."""
        remaining = len(self.tickets)
        while remaining:
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise APIError(504, "The request timed out before the model finished.", "timeout", code="timeout")
            try:
                index, event = await asyncio.wait_for(self.queue.get(), min(wait, _POLL_S))
            except TimeoutError:
                if disconnected is not None and await disconnected():
                    # 499 (nginx's "client closed request"): nobody reads it, but /metrics counts it.
                    raise APIError(499, "The client disconnected.", code="client_disconnected") from None
                continue
            if isinstance(event, Finished):
                remaining -= 1
                if event.reason == "error":
                    raise APIError(500, f"Generation failed: {event.error}", "server_error")
                if event.reason == "cancelled":
                    raise APIError(503, "The server is shutting down.", "server_error")
            yield index, event
