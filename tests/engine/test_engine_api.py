"""The Python APIs end to end on a tiny model: sampling options, errors, async streaming."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from oracle import hf_logprobs, load_hf_model

from livelm import SamplingParams
from livelm.engine.async_engine import AsyncEngine
from livelm.engine.llm import LLM


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir))


def _random_prompts(count: int, seed: int, lo: int = 4, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 400) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def test_seeded_sampling_same_alone_and_in_a_batch(llm):
    prompt = _random_prompts(1, 7)[0]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = _random_prompts(32, 8)
    rng = random.Random(3)
    other_params = [
        SamplingParams(temperature=rng.choice([0.0, 0.7, 1.3]), top_k=rng.choice([0, 5]),
                       seed=rng.choice([None, rng.randrange(10**6)]), max_tokens=rng.randint(1, 30),
                       ignore_eos=True)
        for _ in others
    ]
    batch = others[:16] + [prompt] + others[16:]
    params = other_params[:16] + [seeded] + other_params[16:]
    outs = llm.generate(batch, params, use_tqdm=False)
    assert outs[16].outputs[0].token_ids == alone
    # And a different seed gives a different continuation (the seed is really used).
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=24, ignore_eos=True)
    assert llm.generate([prompt], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_outputs_in_input_order_with_mixed_params(llm):
    prompts = _random_prompts(6, 1)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 5, 2, 9, 3, 4)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 5, 2, 9, 3, 4]
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


def test_stop_token_ids_min_tokens_and_eos(llm):
    prompt = _random_prompts(1, 11)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    tokens = free[0].outputs[0].token_ids
    stop_tok = tokens[5]
    first = tokens.index(stop_tok)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tok],
                                                ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == tokens[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    # min_tokens forbids stopping early: the stop token is suppressed until then.
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, min_tokens=first + 3,
                                                stop_token_ids=[stop_tok], ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= first + 3


def test_stop_strings_are_cut_from_the_text(llm):
    prompt = _random_prompts(1, 12)[0]
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    text = full[0].outputs[0].text
    assert len(text) > 6
    stop = text[3:6]
    cut = text.index(stop)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True,
                                                include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert out.text == text[: cut + len(stop)]


def test_top_logprobs_and_prompt_logprobs_match_transformers(llm, llama_dir):
    hf = load_hf_model(llama_dir)
    prompt = _random_prompts(1, 13, 20, 20)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, logprobs=5, prompt_logprobs=3,
                                                ignore_eos=True), use_tqdm=False)[0]
    completion = out.outputs[0]
    ref = hf_logprobs(hf, prompt + completion.token_ids)
    for j, (tok, pos) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        row = ref[len(prompt) - 1 + j]
        top = row.topk(5)
        assert pos[tok].rank == 1  # greedy picks the argmax
        assert set(pos) == set(top.indices.tolist())
        for tid, lp in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            assert abs(pos[tid].logprob - lp) < 1e-3
    assert out.prompt_logprobs[0] is None
    for i in range(1, len(prompt)):
        pos = out.prompt_logprobs[i]
        assert abs(pos[prompt[i]].logprob - float(ref[i - 1, prompt[i]])) < 1e-3
        assert pos[prompt[i]].rank == int((ref[i - 1] > ref[i - 1, prompt[i]]).sum()) + 1
    assert abs(completion.cumulative_logprob - sum(p[t].logprob for t, p in
                                                   zip(completion.token_ids, completion.logprobs, strict=True))) < 1e-5


def test_prompt_logprobs_survive_chunked_prefill(llama_dir):
    llm = LLM(str(llama_dir), max_num_batched_tokens=8)
    prompt = _random_prompts(1, 14, 30, 30)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0), use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None
    assert all(out.prompt_logprobs[i] is not None for i in range(1, len(prompt)))


def test_n_sampled_sequences_are_distinct_and_seeded(llm):
    prompt = _random_prompts(1, 15)[0]
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=16, ignore_eos=True)
    a = llm.generate([prompt], params, use_tqdm=False)[0]
    b = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_chat_uses_the_template(llm):
    conv = [{"role": "user", "content": "Paris is the capital of"}]
    out = llm.chat(conv, SamplingParams(temperature=0, max_tokens=4))[0]
    expected = llm.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert llm.tokenizer.decode(out.prompt_token_ids) == expected


def test_streamed_text_never_holds_broken_utf8(llm):
    # Random continuations of a tokenizer trained on accents, CJK and emoji split characters.
    prompts = [llm.tokenizer("日本語 🚀 café").input_ids] * 3
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n must"),
        ({"logprobs": 50}, "logprobs"),
    ],
)
def test_bad_sampling_params_raise_valueerror(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_requests_raise_valueerror_and_leak_nothing(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"exceeds the context length of 1024"):
        llm.generate([[5] * 1000], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[10**6]], SamplingParams(max_tokens=2))
    # A bad prompt in the middle of a batch releases the requests queued before it.
    with pytest.raises(ValueError):
        llm.generate([[5, 6], [], [7]], SamplingParams(max_tokens=2))
    stats = llm.engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0


def test_unknown_model_and_architecture(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        LLM(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    (bad / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported architecture"):
        LLM(str(bad))


def test_unknown_engine_option(llama_dir):
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM(str(llama_dir), max_batch=3)


def test_async_engine_streams_deltas_and_aborts(llama_dir, llm):
    prompts = _random_prompts(8, 21)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0] for o in llm.generate(prompts, greedy, use_tqdm=False)]

    async def main():
        engine = AsyncEngine(str(llama_dir))

        async def one(p):
            tokens, text, finishes = [], "", []
            async for out in engine.generate(p, greedy):
                for c in out.outputs:
                    tokens += c.token_ids
                    text += c.text
                    finishes.append(c.finish_reason)
            return tokens, text, finishes

        results = await asyncio.gather(*(one(p) for p in prompts))
        for (tokens, text, finishes), want in zip(results, expected, strict=True):
            assert tokens == want.token_ids and text == want.text
            assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])

        # Leaving the stream early aborts the request and frees its blocks.
        long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        seen = 0
        async for _ in engine.generate(prompts[0], long):
            seen += 1
            if seen == 3:
                break
        for _ in range(200):
            stats = engine.stats()
            if stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks:
                break
            await asyncio.sleep(0.01)
        assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks

        # Explicit abort by id ends the stream with finish_reason "abort".
        # (Aborted as soon as its first output arrives: a fixed sleep let the tiny model
        # finish all 500 tokens first once decode got fast enough.)
        reasons = []
        started = asyncio.Event()

        async def consume():
            async for out in engine.generate(prompts[1], long, request_id="to-abort"):
                reasons.extend(c.finish_reason for c in out.outputs)
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 10)
        engine.abort("to-abort")
        await asyncio.wait_for(task, 10)
        assert reasons[-1] == "abort"

        with pytest.raises(ValueError, match="empty"):
            async for _ in engine.generate([], greedy):
                pass

        # A second request under a running request's id is refused; the first one keeps
        # its outputs (the queues are keyed by id) and finishes as it would alone.
        first = engine.generate(prompts[2], greedy, request_id="dup")
        first_out = await first.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            async for _ in engine.generate(prompts[3], greedy, request_id="dup"):
                pass
        tokens = list(first_out.outputs[0].token_ids)
        async for out in first:
            tokens += out.outputs[0].token_ids
        assert tokens == expected[2].token_ids
        await engine.shutdown()

    asyncio.run(main())


def test_async_engine_builds_and_steps_its_engine_on_one_thread(llama_dir, monkeypatch, tmp_path):
    """All of the engine's torch work runs on the engine thread (one OpenMP pool: a second
    pool made by loading on the caller's thread doubled decode step times), and an error
    building the engine still raises from the constructor, on the caller's side."""
    import threading

    import livelm.engine.async_engine as async_engine_module

    seen: dict[str, str] = {}

    class RecordingEngine(async_engine_module.Engine):
        def __init__(self, *args, **kwargs):
            seen["built_on"] = threading.current_thread().name
            super().__init__(*args, **kwargs)

        def step(self):
            seen["stepped_on"] = threading.current_thread().name
            return super().step()

    monkeypatch.setattr(async_engine_module, "Engine", RecordingEngine)

    async def main():
        engine = AsyncEngine(str(llama_dir))
        try:
            async for _ in engine.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)):
                pass
        finally:
            await engine.shutdown()

    asyncio.run(main())
    assert seen == {"built_on": "livelm-engine", "stepped_on": "livelm-engine"}
    assert threading.current_thread().name != "livelm-engine"
    with pytest.raises(ValueError, match="max_num_seqs"):
        AsyncEngine(str(llama_dir), max_num_seqs=0)
    with pytest.raises((ValueError, FileNotFoundError, OSError)):
        AsyncEngine(str(tmp_path / "no-such-model"))
