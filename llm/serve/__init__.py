"""Serving: an OpenAI-compatible HTTP API over a continuous-batching engine, with a chat page."""
