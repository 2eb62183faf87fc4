"""A bounded load test of the server: N streaming completions, C at a time, over loopback HTTP.

Reports requests/s, generated tokens/s, and the 50th/90th/99th percentiles of request latency and time to
first token. Every request asks for exactly `max_tokens` tokens (`ignore_eos`), so runs are comparable.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np

PROMPTS = (
    "Había una vez",
    "La ciudad de Madrid",
    "Mi abuela cocina",
    "El pingüino camina junto al río",
    "¿Quién lo sabe?",
    "Un músico escribe una canción",
    "La compañía trabaja",
    "El señor García estudia",
)


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1", startup_timeout_s: float = 60.0) -> Iterator[str]:
    """Runs `app` with uvicorn on a free port of `host` in a thread; yields its base URL, stops it after."""
    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"The server did not start on {host}:{port} within {startup_timeout_s} s.")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _one(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(latency, time to first token, completion tokens) of one streamed completion."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start, first, tokens = time.perf_counter(), None, 0
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode()[:200]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return end - start, (first or end) - start, tokens


def _percentiles(values: list[float], name: str) -> dict[str, float]:
    return {f"{name}_p{q}_s": float(np.percentile(values, q)) for q in (50, 90, 99)} if values else {}


def run(
    url: str | None = None,
    workdir: str | None = None,
    num_requests: int = 64,
    concurrency: int = 8,
    max_tokens: int = 32,
    max_batch_size: int = 8,
    api_key: str | None = None,
    request_timeout_s: float = 300.0,
) -> dict:
    """Load-tests the server at `url`, or (with `workdir`) one started here on 127.0.0.1 for the run.

    `max_batch_size` applies to a server started here. The first request is a warm-up and is not counted.
    """
    if (url is None) == (workdir is None):
        raise ValueError("Give exactly one of url (a running server) or workdir (serve that run here).")
    if num_requests < 1 or concurrency < 1 or max_tokens < 1:
        raise ValueError(
            f"num_requests, concurrency and max_tokens must be >= 1; got {num_requests}, {concurrency}, {max_tokens}."
        )
    if url is not None:
        return _load(url.rstrip("/"), num_requests, concurrency, max_tokens, api_key, request_timeout_s)
    import os

    from llm.runs import loading
    from llm.serve import api

    loaded = loading.load_run(workdir)
    settings = api.ServeSettings(
        os.path.basename(os.path.normpath(workdir)),
        max_batch_size=max_batch_size,
        max_tokens=max_tokens,
        max_concurrent_requests=max(64, concurrency),
        warmup=True,
    )
    with background_server(api.create_app(loaded.model, loaded.tokenizer, settings)) as local_url:
        return {
            "max_batch_size": max_batch_size,
            **_load(local_url, num_requests, concurrency, max_tokens, api_key, request_timeout_s),
        }


def _load(
    url: str, num_requests: int, concurrency: int, max_tokens: int, api_key: str | None, timeout_s: float
) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(
        headers=headers, timeout=timeout_s, limits=httpx.Limits(max_connections=concurrency + 1)
    ) as client:
        models = client.get(url + "/v1/models")
        models.raise_for_status()
        model = models.json()["data"][0]["id"]
        _one(client, url, model, PROMPTS[0], max_tokens)  # Warm-up: compiles whatever is not compiled yet.
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_requests)]
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            futures = [pool.submit(_one, client, url, model, p, max_tokens) for p in prompts]
            results, errors = [], []
            for future in futures:
                try:
                    results.append(future.result())
                except (RuntimeError, httpx.HTTPError) as error:
                    errors.append(str(error))
        wall = time.perf_counter() - start
    latencies, ttfts, tokens = ([r[i] for r in results] for i in range(3))
    return {
        "benchmark": "serve",
        "num_requests": num_requests,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "errors": len(errors),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "output_tokens_per_s": sum(tokens) / wall,
        **_percentiles(latencies, "latency"),
        **_percentiles(ttfts, "ttft"),
        **({"first_error": errors[0]} if errors else {}),
    }
