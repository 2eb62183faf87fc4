"""The OpenAI-compatible server end to end: a real uvicorn on 127.0.0.1 serving the trained test run."""

import concurrent.futures
import contextlib
import json
import socket
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest

from llm.infer import generate, loading
from llm.serve import api
from tests.conftest import forward

MODEL = "tiny-test"
CACHE_LEN = 128  # The trained run's context.


@contextlib.contextmanager
def serving(run, **settings):
    """A uvicorn server on a free loopback port in a thread; yields (base URL, app)."""
    import uvicorn

    app = api.create_app(run.model, run.tokenizer, api.ServeSettings(MODEL, max_batch_size=4, **settings))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def run(trained_run):
    return loading.load_run(trained_run)


@pytest.fixture(scope="module")
def server(run):
    with serving(run, max_tokens=64) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_completions_match_generate_text(client, run):
    prompts = ["La niña canta", "El pingüino"]
    expected = generate.generate_text(run, prompts, max_new_tokens=12)
    for prompt, want in zip(prompts, expected):
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert response.choices[0].text == want
        assert response.usage.prompt_tokens == len(run.tokenizer.encode(prompt, add_bos=True))
