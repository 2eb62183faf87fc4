"""A bounded load test of the server: N streaming completions, C at a time, over loopback HTTP.

Reports requests/s, generated tokens/s, and the 50th/90th/99th percentiles of request latency and time to
first token. Every request asks for exactly `max_tokens` tokens (`ignore_eos`), so runs are comparable.
With a `mix` (llm/serve/load_mix.py) the N requests mix good ones with malformed and abandoned ones.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np

from llm.serve import load_mix

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


class HTTPStatusError(RuntimeError):
    """A request answered with another status than 200."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


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
            raise HTTPStatusError(response.status_code, response.read().decode()[:200])
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
    mix: dict[str, float] | None = None,
    seed: int = 0,
) -> dict:
    """Load-tests the server at `url`, or (with `workdir`) one started here on 127.0.0.1 for the run.

    `max_batch_size` applies to a server started here. The first request is a warm-up and is not counted.
    `mix` (see `load_mix.parse_mix`) mixes malformed and abandoned requests among the good ones, in an order
    shuffled with `seed`; the result then also counts the statuses each kind got back.
    """
    if (url is None) == (workdir is None):
        raise ValueError("Give exactly one of url (a running server) or workdir (serve that run here).")
    if num_requests < 1 or concurrency < 1 or max_tokens < 1:
        raise ValueError(
            f"num_requests, concurrency and max_tokens must be >= 1; got {num_requests}, {concurrency}, {max_tokens}."
        )
    if url is not None:
        return _load(url.rstrip("/"), num_requests, concurrency, max_tokens, api_key, request_timeout_s, mix, seed)
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
            **_load(local_url, num_requests, concurrency, max_tokens, api_key, request_timeout_s, mix, seed),
        }


def _load(
    url: str,
    num_requests: int,
    concurrency: int,
    max_tokens: int,
    api_key: str | None,
    timeout_s: float,
    mix: dict[str, float] | None,
    seed: int,
) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(
        headers=headers, timeout=timeout_s, limits=httpx.Limits(max_connections=concurrency + 1)
    ) as client:
        models = client.get(url + "/v1/models")
        models.raise_for_status()
        card = models.json()["data"][0]
        model = card["id"]
        _one(client, url, model, PROMPTS[0], max_tokens)  # Warm-up: compiles whatever is not compiled yet.
        if mix is not None:
            return _load_mixed(client, url, card, num_requests, concurrency, max_tokens, mix, seed)
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


def _mixed_request(
    client: httpx.Client, url: str, card: dict, kind: str, variant: str, prompt: str, max_tokens: int
) -> tuple[str, float | None, int]:
    """(status, time to first token or None, completion tokens) of one request of a mixed load.

    A malformed or abandoned request comes from a client of its own, on a connection of its own, so that
    whatever the server does to that connection hits that client only, as it would in real use."""
    model = card["id"]
    if kind != "good":
        with httpx.Client(headers=client.headers, timeout=client.timeout) as own:
            if kind == "malformed":
                return load_mix.send_malformed(own, url, variant, model, card.get("max_model_len", 4096)), None, 0
            return load_mix.abandon(own, url, variant, model, prompt, max_tokens), None, 0
    if variant == "whole":
        status, tokens = load_mix.good_whole(client, url, model, prompt, max_tokens)
        return status, None, tokens
    try:
        _, ttft, tokens = _one(client, url, model, prompt, max_tokens)
    except HTTPStatusError as error:
        return str(error.status), None, 0
    except RuntimeError:
        return "stream_error", None, 0
    except httpx.HTTPError:
        return "closed", None, 0
    return "200", ttft, tokens


def _load_mixed(
    client: httpx.Client,
    url: str,
    card: dict,
    num_requests: int,
    concurrency: int,
    max_tokens: int,
    mix: dict[str, float],
    seed: int,
) -> dict:
    """The mixed load: throughput of the good requests, TTFT of the streamed ones, statuses by kind and by
    malformed variant, and what /health says once the load is over."""
    plan = load_mix.schedule(num_requests, mix, seed)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = [
            pool.submit(_mixed_request, client, url, card, kind, variant, PROMPTS[i % len(PROMPTS)], max_tokens)
            for i, (kind, variant) in enumerate(plan)
        ]
        outcomes = [future.result() for future in futures]
        wall = time.perf_counter() - start
    statuses: dict[str, collections.Counter] = {kind: collections.Counter() for kind in mix}
    malformed: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (kind, variant), (status, _, _) in zip(plan, outcomes):
        statuses[kind][status] += 1
        if kind == "malformed":
            malformed[variant][status] += 1
    good = [outcome for (kind, _), outcome in zip(plan, outcomes) if kind == "good" and outcome[0] == "200"]
    return {
        "benchmark": "serve_mixed",
        "num_requests": num_requests,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "mix": mix,
        "wall_s": wall,
        "requests_per_s": num_requests / wall,
        "good_requests_per_s": len(good) / wall,
        "output_tokens_per_s": sum(tokens for _, _, tokens in good) / wall,
        **_percentiles([ttft for _, ttft, _ in good if ttft is not None], "ttft"),
        "statuses": {kind: dict(counts) for kind, counts in statuses.items()},
        "malformed_statuses": {variant: dict(counts) for variant, counts in sorted(malformed.items())},
        "after": _settled_health(client, url),
    }


def _settled_health(client: httpx.Client, url: str, wait_s: float = 5.0) -> dict:
    """/health once the server has let go of every request (or after `wait_s`): a server that still holds
    slots or in-flight requests after the load leaked them."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            response = client.get(url + "/health")
        except httpx.HTTPError as error:
            return {"health_status": "closed", "error": str(error)}
        health = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        held = health.get("in_flight_requests", 0) + health.get("active_slots", 0) + health.get("queue_depth", 0)
        if held == 0 or time.monotonic() > deadline:
            keys = ("in_flight_requests", "active_slots", "queue_depth")
            return {"health_status": response.status_code, **{key: health[key] for key in keys if key in health}}
        time.sleep(0.05)
