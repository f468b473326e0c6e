"""The server under load and at its edges: 64 concurrent streaming clients with correct
outputs, a client that disconnects mid-stream freeing its KV blocks (seen through
/metrics). Shutdown on SIGTERM/SIGINT is tested in test_shutdown.py."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from server_utils import scrape, serve, start_engine, stop_engine, wait_until

from livelm import SamplingParams
from livelm.engine.llm import LLM

WORDS = ["quick", "brown", "fox", "Paris", "capital", "numbers", "coffee", "rocket", "math", "streaming"]
# 64 distinct prompts of different lengths.
PROMPTS = [f"{WORDS[i % 10]} {WORDS[(i // 10) % 10]} " * (1 + i % 3) + str(i) for i in range(64)]
MAX_TOKENS = 8
LONG = 1000  # a request that runs long enough to be interrupted


@pytest.fixture(scope="module")
def engine(llama_dir):
    engine = start_engine(llama_dir, max_model_len=1024, max_num_seqs=64)
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="module")
def server(engine):
    with serve(engine, max_running=64) as srv:
        yield srv


def test_64_concurrent_streaming_clients(server, engine, llama_dir):
    expected = LLM(str(llama_dir), max_model_len=256, kv_cache_gib=0.25).generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    before = scrape(server.url)

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str, int]:
        text, reason, chunks = "", None, 0
        stream = await client.completions.create(model=engine.model_name, prompt=PROMPTS[i], max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True)
        async for chunk in stream:
            chunks += 1
            for choice in chunk.choices:
                text += choice.text
                reason = choice.finish_reason or reason
        return text, reason, chunks

    async def all_clients() -> list[tuple[str, str, int]]:
        # One client (and connection) per user, as 64 separate programs would have. Plain
        # http needs no certificates; loading them 64 times would dominate the test.
        clients = [openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0,
                                      http_client=httpx.AsyncClient(verify=False, timeout=60))
                   for _ in PROMPTS]
        try:
            return await asyncio.gather(*(one(c, i) for i, c in enumerate(clients)))
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    results = asyncio.run(all_clients())
    for (text, reason, chunks), ref in zip(results, expected, strict=True):
        assert text == ref.outputs[0].text
        assert reason == ref.outputs[0].finish_reason
        assert chunks >= 1
    after = scrape(server.url)
    done = sum(after.get(f'livelm_requests_total{{finish_reason="{r}"}}', 0)
               - before.get(f'livelm_requests_total{{finish_reason="{r}"}}', 0) for r in ("stop", "length"))
    assert done == 64
    assert after["livelm_server_sequences_in_flight"] == 0
    assert after["livelm_time_to_first_token_seconds_count"] - before.get(
        "livelm_time_to_first_token_seconds_count", 0) == 64
    assert after["livelm_generation_tokens_total"] - before.get("livelm_generation_tokens_total", 0) == sum(
        len(ref.outputs[0].token_ids) for ref in expected)
    # The committed part of the KV cache: blocks ever written, at most the pool, and at
    # least what 64 requests held at once; one block's bytes as the model's shape gives them.
    touched = after["livelm_kv_cache_touched_blocks"]
    assert 0 < touched <= after["livelm_kv_cache_total_blocks"]
    cfg = engine._engine.model_config
    assert after["livelm_kv_cache_block_bytes"] == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 16 * 4


def _abort_count(url: str) -> float:
    return scrape(url).get('livelm_requests_total{finish_reason="abort"}', 0.0)


def _idle(url: str) -> bool:
    m = scrape(url)
    return (m["livelm_num_requests_running"] == 0 and m["livelm_kv_cache_usage_ratio"] == 0
            and m["livelm_kv_cache_free_blocks"] == m["livelm_kv_cache_total_blocks"]
            and m["livelm_server_sequences_in_flight"] == 0)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_disconnect_mid_stream_frees_blocks(server, engine, route):
    assert _idle(server.url)
    aborted = _abort_count(server.url)
    body = {"model": engine.model_name, "ignore_eos": True, "stream": True, "temperature": 0}
    if "chat" in route:  # no max_tokens: chat runs to the end of the context
        body["messages"] = [{"role": "user", "content": "Tell me a long story"}]
    else:
        body.update(prompt="The quick brown fox", max_tokens=LONG)
    with httpx.stream("POST", f"{server.url}{route}", json=body, timeout=30) as r:
        lines = r.iter_lines()
        received = [line for line, _ in zip(lines, range(8), strict=False) if line]
        assert len(received) >= 3
        busy = scrape(server.url)
        assert busy["livelm_num_requests_running"] == 1
        assert busy["livelm_kv_cache_usage_ratio"] > 0
    # The connection is closed: the engine request is aborted and its blocks come back.
    assert wait_until(lambda: _idle(server.url), timeout=10)
    assert _abort_count(server.url) == aborted + 1


def test_disconnect_while_waiting_for_whole_response(server, engine):
    """A non-streamed request whose client gives up is aborted too."""
    aborted = _abort_count(server.url)
    body = {"model": engine.model_name, "prompt": "Hello", "max_tokens": LONG, "ignore_eos": True}

    async def give_up_once_running() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            request = asyncio.create_task(http.post("/v1/completions", json=body))
            while (await http.get("/metrics")).text.find("livelm_num_requests_running 1.0") < 0:
                assert not request.done(), "finished before the client could give up"
                await asyncio.sleep(0.005)
            request.cancel()  # what a client timeout does: drop the connection
            with pytest.raises(asyncio.CancelledError):
                await request

    asyncio.run(give_up_once_running())
    assert wait_until(lambda: _idle(server.url), timeout=10)
    assert _abort_count(server.url) == aborted + 1
