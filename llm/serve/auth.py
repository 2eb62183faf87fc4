"""API keys (`Authorization: Bearer KEY`) and per-client rate limiting with token buckets."""

from __future__ import annotations

import hmac
import os
import threading
import time
from collections.abc import Callable

API_KEYS_ENV = "LLM_API_KEYS"  # Comma-separated keys, added to those of --api_keys_file.


def load_api_keys(path: str | None = None, env: str = API_KEYS_ENV) -> frozenset[str]:
    """Keys from a file (one per line; blank lines and lines starting with '#' are skipped) and from the
    environment variable `env`. An empty result means the server is open (no key needed)."""
    keys = {key.strip() for key in os.environ.get(env, "").split(",") if key.strip()}
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"API keys file {path!r} does not exist.")
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if any(c.isspace() for c in line):
                    raise ValueError(f"{path}:{number}: an API key must not contain whitespace.")
                keys.add(line)
    return frozenset(keys)


def check_key(keys: frozenset[str], authorization: str | None) -> str | None:
    """The key presented in an `Authorization: Bearer KEY` header if it is one of `keys`, else None.

    Every key is compared in constant time, so response timing does not leak how much of a key matched."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":  # Auth schemes are case-insensitive (RFC 7235 section 2.1).
        return None
    presented = credentials.strip().encode()
    matches = [key for key in keys if hmac.compare_digest(presented, key.encode())]
    return matches[0] if matches else None


class RateLimiter:
    """A token bucket per client: `rate` requests per minute on average, bursts of up to `burst`.

    `acquire(client)` returns 0 when the request may go ahead, else the seconds until it could (the
    Retry-After header of a 429 response).
    """

    MAX_CLIENTS = 10_000  # Full buckets are forgotten past this, so unknown clients cannot exhaust memory.

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError(f"Rate limit needs rate > 0 per minute and burst >= 1, got {rate} and {burst}.")
        self.per_second, self.burst, self.clock = rate / 60.0, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, time of last update)
        self._lock = threading.Lock()

    def acquire(self, client: str) -> float:
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.per_second)
            if tokens < 1:
                self._buckets[client] = (tokens, now)
                return (1 - tokens) / self.per_second
            self._buckets[client] = (tokens - 1, now)
            if len(self._buckets) > self.MAX_CLIENTS:
                self._forget_full(now)
            return 0.0

    def _forget_full(self, now: float) -> None:
        for client, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.per_second >= self.burst:
                del self._buckets[client]
