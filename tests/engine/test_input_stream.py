"""Streaming input through AsyncEngine: prompts prefilled while they arrive, checked
against transformers on the one-shot prompt of the same text."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import hf_greedy, load_hf_model

from livelm import SamplingParams
from livelm.engine.async_engine import AsyncEngine
from livelm.engine.input_stream import StreamClosedError

TEXT = (
    "Streaming inputs arrive in chunks while the model keeps working on them. "
    "Le café coûte trois euros, très bien! 日本語のテキスト。 Emoji 🚀🔥 and 3.14159. "
    "def add(a, b):\n    return a + b  # done"
)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def hf(llama_dir):
    return load_hf_model(llama_dir)


@pytest.fixture(scope="module")
def engine(llama_dir):
    # A small token budget: streamed input, prompts and decodes share steps in chunks.
    eng = AsyncEngine(str(llama_dir), max_num_batched_tokens=48)
    yield eng
    asyncio.run(eng.shutdown())


def _one_shot(engine, hf, text_or_ids, max_tokens=10):
    ids = engine.encode(text_or_ids)
    return hf_greedy(hf, ids, max_tokens)


async def _reply(stream, params=GREEDY, **kw) -> list[int]:
    return [t async for out in stream.generate(params, **kw) for t in out.outputs[0].token_ids]


def _pieces(data, cuts):
    cuts = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# Boundaries anywhere in the UTF-8 bytes: inside words, inside multi-byte characters.
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(0, len(TEXT.encode())), max_size=12), as_bytes=st.booleans())
def test_random_chunkings_give_the_one_shot_tokens(engine, hf, cuts, as_bytes):
    data = TEXT.encode()
    pieces = _pieces(data, cuts)
    if not as_bytes:  # text pieces: move each cut back to a character boundary
        pieces = [p for p in _pieces(TEXT, [len(data[:c].decode(errors="ignore")) for c in cuts])]
    expected = _one_shot(engine, hf, TEXT)

    async def main():
        async with engine.open_stream() as stream:
            for piece in pieces:
                stream.append(piece)
                await asyncio.sleep(0)
            await stream.wait_prefilled(timeout=30)
            before_close = stream.state()
            stream.close_input()
            assert stream.state().input_closed
            return before_close, await _reply(stream)

    state, got = asyncio.run(main())
    assert got == expected
    # The input was prefilled while it arrived (all but the held-back tail).
    assert state.num_computed_tokens == state.num_input_tokens > 0


def test_async_iterable_prompt_matches_one_shot(engine, hf):
    async def chunks():
        for i in range(0, len(TEXT), 23):
            yield TEXT[i : i + 23]
            await asyncio.sleep(0.005)

    async def main():
        return [t async for out in engine.generate(chunks(), GREEDY) for t in out.outputs[0].token_ids]

    assert asyncio.run(main()) == _one_shot(engine, hf, TEXT)


def test_update_mode_recomputes_only_from_the_first_changed_token(engine, hf):
    rng = random.Random(1)
    ids = [rng.randrange(3, 300) for _ in range(100)]
    revised = ids[:37] + [rng.randrange(3, 300) for _ in range(20)]

    async def main():
        async with engine.open_stream() as stream:
            stream.append(ids)
            await stream.wait_prefilled(timeout=30)
            before = engine.stats().num_computed_tokens
            stream.replace(revised)
            await stream.wait_prefilled(timeout=30)
            recomputed = engine.stats().num_computed_tokens - before
            return recomputed, await _reply(stream)

    recomputed, got = asyncio.run(main())
    assert recomputed == 20  # positions 37..56, nothing before the first difference
    assert got == hf_greedy(hf, revised, 10)


def test_update_mode_with_text(engine, hf):
    first = "The meeting is on Monday at the office near the station. Bring the report."
    second = "The meeting is on Tuesday at the office near the station. Bring the report, please."

    async def main():
        async with engine.open_stream() as stream:
            stream.append(first)
            await stream.wait_prefilled(timeout=30)
            kept_ids = list(stream._ids)
            before = engine.stats().num_computed_tokens
            stream.replace(second)
            await stream.wait_prefilled(timeout=30)
            new_ids = list(stream._ids)
            recomputed = engine.stats().num_computed_tokens - before
            stream.close_input()
            return kept_ids, new_ids, recomputed, await _reply(stream)

    kept_ids, new_ids, recomputed, got = asyncio.run(main())
    common = next(i for i, (a, b) in enumerate(zip(kept_ids, new_ids, strict=False)) if a != b)
    assert recomputed == len(new_ids) - common
    assert got == _one_shot(engine, hf, second)


def test_speak_while_reading(engine, hf):
    cut = TEXT.index(" Emoji")
    part1, part2 = TEXT[:cut], TEXT[cut:]

    async def main():
        async with engine.open_stream() as stream:
            stream.append(part1)
            first = await _reply(stream)  # before the input is closed, nothing awaited
            # Reply again while more input keeps arriving.
            feeding = asyncio.ensure_future(_feed(stream, part2))
            mid = asyncio.ensure_future(_reply(stream))
            await feeding
            second = await _reply(stream)
            return first, await mid, second

    first, mid, second = asyncio.run(main())
    assert first == _one_shot(engine, hf, part1)
    assert second == _one_shot(engine, hf, TEXT)
    assert len(mid) == GREEDY.max_tokens  # replied to whatever had arrived by then


async def _feed(stream, text, size=7):
    for i in range(0, len(text), size):
        stream.append(text[i : i + size])
        await asyncio.sleep(0.002)


def test_reply_shares_the_streamed_kv(engine, hf):
    rng = random.Random(2)
    ids = [rng.randrange(3, 300) for _ in range(90)]

    async def main():
        async with engine.open_stream() as stream:
            stream.append(ids)
            stream.close_input()
            await stream.wait_prefilled(timeout=30)
            before = engine.stats().num_computed_tokens
            got = await _reply(stream, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            return engine.stats().num_computed_tokens - before, got

    computed, got = asyncio.run(main())
    # The reply shares the stream's 5 full blocks of 16 and computes only the last 10 tokens.
    assert computed == 90 - 80
    assert got == hf_greedy(hf, ids, 1)


def test_suffix_is_tokenized_with_the_input(engine, hf):
    async def main():
        async with engine.open_stream() as stream:
            stream.append(TEXT)
            return await _reply(stream, suffix=" Question: what is 2 + 2?")

    assert asyncio.run(main()) == _one_shot(engine, hf, TEXT + " Question: what is 2 + 2?")


def test_ordinary_requests_interleaved_with_streams_stay_correct(engine, hf):
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randrange(1, 120))] for _ in range(16)]
    texts = [TEXT[i * 10 :] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def ordinary(p):
        await asyncio.sleep(rng.random() * 0.05)
        return [t async for out in engine.generate(p, params) for t in out.outputs[0].token_ids]

    async def streamed(text):
        async with engine.open_stream() as stream:
            half = len(text) // 2
            await _feed(stream, text[:half], 11)
            early = await _reply(stream, params)
            await _feed(stream, text[half:], 11)
            stream.close_input()
            return early, await _reply(stream, params)

    async def main():
        return await asyncio.gather(*(ordinary(p) for p in prompts), *(streamed(t) for t in texts))

    results = asyncio.run(main())
    for p, got in zip(prompts, results[:16], strict=True):
        assert got == hf_greedy(hf, p, 12)
    for text, (early, final) in zip(texts, results[16:], strict=True):
        assert early == _one_shot(engine, hf, text[: len(text) // 2], 12)
        assert final == _one_shot(engine, hf, text, 12)


def test_streams_survive_preemption(llama_dir, hf):
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 300) for _ in range(60)] for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def main():
        eng = AsyncEngine(str(llama_dir), num_kv_blocks=14, max_num_batched_tokens=32)
        try:
            async def streamed():
                async with eng.open_stream() as stream:
                    for i in range(0, 60, 10):
                        stream.append(prompts[0][i : i + 10])
                        await asyncio.sleep(0.001)
                    stream.close_input()
                    return await _reply(stream, params)

            async def ordinary(p):
                return [t async for out in eng.generate(p, params) for t in out.outputs[0].token_ids]

            results = await asyncio.gather(streamed(), *(ordinary(p) for p in prompts[1:]))
            return results, eng.stats().num_preemptions
        finally:
            await eng.shutdown()

    results, preemptions = asyncio.run(main())
    assert preemptions > 0
    for p, got in zip(prompts, results, strict=True):
        assert got == hf_greedy(hf, p, 40)


def test_closing_a_stream_aborts_its_replies(engine):
    async def main():
        stream = engine.open_stream()
        stream.append(TEXT)
        reasons = []

        async def consume():
            async for out in stream.generate(SamplingParams(max_tokens=400, ignore_eos=True)):
                reasons.extend(c.finish_reason for c in out.outputs)
                if len(reasons) == 3:
                    await stream.close()

        await asyncio.wait_for(consume(), 30)
        assert reasons[-1] == "abort"
        with pytest.raises(StreamClosedError, match="closed by its owner"):
            stream.append("more")

    asyncio.run(main())


def test_input_errors(engine):
    async def main():
        async with engine.open_stream() as stream:
            with pytest.raises(ValueError, match="no input yet"):
                await _reply(stream)
            stream.append("some text")
            with pytest.raises(ValueError, match="takes text"):
                stream.append([1, 2, 3])
            with pytest.raises(ValueError, match="list of token ids"):
                stream.append(3.5)
            stream.close_input()
            with pytest.raises(ValueError, match="input is closed"):
                stream.append("more")
            with pytest.raises(ValueError, match="input is closed"):
                stream.replace("other")
        async with engine.open_stream() as stream:
            stream.append([5, 6])
            with pytest.raises(ValueError, match="takes token ids"):
                stream.append("text")
            with pytest.raises(ValueError, match="outside the vocabulary"):
                stream.append([10**9])
            with pytest.raises(ValueError, match="exceeds"):
                stream.append([5] * engine.max_model_len)
            assert stream.state().num_input_tokens == 2  # refused chunks changed nothing
        with pytest.raises(ValueError, match="already in use"):
            async with engine.open_stream("same"):
                engine.open_stream("same")

    asyncio.run(main())


def test_stream_limits(llama_dir):
    async def main():
        eng = AsyncEngine(
            str(llama_dir), max_input_streams=2, max_stream_pending_tokens=40, stream_idle_timeout_s=0.3
        )
        try:
            a, b = eng.open_stream(), eng.open_stream()
            with pytest.raises(ValueError, match="max_input_streams"):
                eng.open_stream()
            await b.close()
            c = eng.open_stream()  # a closed stream frees its slot
            with pytest.raises(ValueError, match="max_stream_pending_tokens"):
                a.append(list(range(3, 50)))
            assert a.state().num_input_tokens == 0
            a.append(list(range(3, 30)))
            await a.wait_prefilled(timeout=30)
            a.append(list(range(3, 30)))  # fine once the first piece has KV
            # Idle streams are closed and their KV freed; a stream with a reply in flight is not.
            await asyncio.sleep(0.8)
            assert a.closed and c.closed and "idle" in a.closed_reason
            with pytest.raises(StreamClosedError, match="idle"):
                a.append([5])
            assert eng.num_input_streams == 0
            for _ in range(200):  # the engine thread refreshes its stats right after
                stats = eng.stats()
                if stats.num_free_blocks == stats.num_total_blocks:
                    break
                await asyncio.sleep(0.01)
            assert stats.num_free_blocks == stats.num_total_blocks and stats.num_input_streams == 0
        finally:
            await eng.shutdown()

    asyncio.run(main())


def test_a_reply_to_closed_input_takes_over_the_remaining_prefill(engine, hf):
    rng = random.Random(5)
    ids = [rng.randrange(3, 300) for _ in range(300)]

    async def main():
        async with engine.open_stream() as stream:
            before = engine.stats().num_computed_tokens
            stream.append(ids)
            stream.close_input()
            got = await _reply(stream, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            state = await stream.wait_prefilled(timeout=30)  # returns: nothing left to do
            return engine.stats().num_computed_tokens - before, got, state

    computed, got, state = asyncio.run(main())
    assert got == hf_greedy(hf, ids, 1)
    # The piece, the close and the reply reach the engine together: the reply computes
    # every input token, once; the stream computes none.
    assert computed == 300
    assert state.status == "input_closed"


def test_the_last_piece_sent_with_the_reply_is_computed_once_by_the_reply(engine, hf):
    rng = random.Random(6)
    ids = [rng.randrange(3, 300) for _ in range(300)]
    block = engine.config.block_size

    async def main():
        async with engine.open_stream() as stream:
            stream.append(ids[:100])
            await stream.wait_prefilled(timeout=30)
            before = engine.stats().num_computed_tokens
            stream.append(ids[100:])  # the last piece, then at once the reply to it
            stream.close_input()
            got = await _reply(stream, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            return engine.stats().num_computed_tokens - before, got

    computed, got = asyncio.run(main())
    assert got == hf_greedy(hf, ids, 1)
    # The reply shares the stream's full blocks and computes the rest in its own steps;
    # only the head of the stream's partial block is computed twice.
    assert computed == 300 - 100 // block * block
    assert 100 % block  # (the case above needs a partial block)


def test_a_reply_takes_its_prompt_when_generate_is_called(engine, hf):
    async def main():
        async with engine.open_stream() as stream:
            stream.append(TEXT[:40])
            replies = stream.generate(GREEDY)
            stream.append(TEXT[40:])  # after the call, before the iteration starts
            return [t async for out in replies for t in out.outputs[0].token_ids]

    assert asyncio.run(main()) == _one_shot(engine, hf, TEXT[:40])
