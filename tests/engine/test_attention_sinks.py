"""kv_policy "sinks" through the engine: the plain-torch StreamingLLM reference
(tests/sinks_reference.py) matches the engine's logprobs on sequences several windows
long, in batches mixing policies, under every scheduler setting (chunked prefill, a tiny
budget, preemption, the torch path); a window larger than the sequence is token-identical
to transformers; input streams and sessions run past the context in flat memory."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from oracle import SCHEDULER_SETTINGS, hf_greedy, load_hf_model
from sinks_reference import sinks_logits

from livelm import SamplingParams
from livelm.core.kv_policy import KVPolicy
from livelm.engine.async_engine import AsyncEngine
from livelm.engine.llm import LLM

ARCHS = ["llama", "qwen2", "qwen3"]
SINKS, WINDOW = 4, 32


@pytest.fixture(scope="module")
def hf_models(tiny_model_dirs):
    return {arch: load_hf_model(tiny_model_dirs[arch]) for arch in ARCHS}


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 400) for _ in range(n)]


def _sinks(max_tokens: int, window: int = WINDOW, sinks: int = SINKS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0,
                          extra={"kv_policy": "sinks", "kv_window": window, "num_sink_tokens": sinks}, **kw)


def _check_against_reference(hf, prompt, out, sinks=SINKS, window=WINDOW, prompt_lps=False) -> None:
    toks = out.outputs[0].token_ids
    ref = sinks_logits(hf, prompt + toks, sinks, window)
    for j, (tok, lp) in enumerate(zip(toks, out.outputs[0].logprobs, strict=True)):
        row = ref[len(prompt) - 1 + j]
        assert int(row.argmax()) == tok, f"token {j} of the output is not the reference's greedy pick"
        assert abs(lp[tok].logprob - float(row[tok])) < 1e-3
    if prompt_lps:
        for i in range(1, len(prompt)):
            assert abs(out.prompt_logprobs[i][prompt[i]].logprob - float(ref[i - 1, prompt[i]])) < 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("setting", [s for s in SCHEDULER_SETTINGS if s != "preemption"])
def test_window_larger_than_the_sequence_is_full_attention(tiny_model_dirs, hf_models, arch, setting):
    hf = hf_models[arch]
    prompts = [_prompt(n, n) for n in (1, 5, 17, 64, 130)]
    llm = LLM(str(tiny_model_dirs[arch]), **SCHEDULER_SETTINGS[setting])
    outs = llm.generate(prompts, _sinks(24, window=512), use_tqdm=False)
    for p, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 24), f"prompt of {len(p)} tokens diverged"


# Every setting on Llama; Qwen2 (q/k/v bias) and Qwen3 (q/k norms) under two of them.
REFERENCE_CASES = [("llama", s) for s in SCHEDULER_SETTINGS] + [("qwen2", "chunked_prefill"), ("qwen3", "tiny_budget")]


@pytest.mark.parametrize("arch, setting", REFERENCE_CASES)
def test_matches_the_reference_several_windows_long_in_mixed_batches(tiny_model_dirs, hf_models, arch, setting):
    """Sinks requests (prompts up to 5 windows, 40 tokens more) match the reference, full
    requests in the same batches still match transformers."""
    hf = hf_models[arch]
    llm = LLM(str(tiny_model_dirs[arch]), **SCHEDULER_SETTINGS[setting])
    sinks_prompts = [_prompt(n, 100 + n) for n in (20, 75, 160)]
    full_prompts = [_prompt(n, 200 + n) for n in (150, 180)]  # with the sinks ones, > 30 blocks
    full = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = sinks_prompts + full_prompts
    params = [_sinks(40), _sinks(40, prompt_logprobs=0), _sinks(40), full, full]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for i, (p, out) in enumerate(zip(prompts, outs, strict=True)):
        if i >= len(sinks_prompts):
            assert out.outputs[0].token_ids == hf_greedy(hf, p, 24)
        else:
            _check_against_reference(hf, p, out, prompt_lps=i == 1)
    engine = llm.engine
    if setting == "preemption":
        assert engine.scheduler.num_preemptions > 0
    assert engine.stats().num_evicted_tokens > 0


def test_plain_rolling_window_without_sinks(tiny_model_dirs, hf_models):
    hf = hf_models["llama"]
    llm = LLM(str(tiny_model_dirs["llama"]), max_num_batched_tokens=48)
    p = _prompt(150, 7)
    out = llm.generate([p], _sinks(30, sinks=0, prompt_logprobs=0), use_tqdm=False)[0]
    _check_against_reference(hf, p, out, sinks=0, prompt_lps=True)


def test_preempted_midway_it_is_recomputed_from_what_it_kept(tiny_model_dirs, hf_models):
    """Preempted after rolling (as a weight update does to everyone), a sinks request
    recomputes only its sinks and its kept window: the tokens before match the reference,
    the tokens after match the reference with nothing before that window."""
    from livelm.core.request_options import RequestOptions

    hf = hf_models["llama"]
    llm = LLM(str(tiny_model_dirs["llama"]), max_num_batched_tokens=64)
    engine = llm.engine
    prompt = _prompt(150, 5)
    params = _sinks(30)
    engine.add("r", prompt, params, prompt_token_ids=prompt, options=RequestOptions.from_extra(params.extra))
    req = engine.scheduler.requests["r"]
    while req.num_output_tokens < 10:
        engine.step()
    engine.scheduler.recompute_all()
    floor = req.kv_floor
    assert floor > SINKS and req.num_computed_tokens == 0
    computed_before = engine.stats().num_computed_tokens
    state = None
    while engine.scheduler.has_unfinished():
        for st, _ in engine.step():
            state = st
    out = state.final_output()
    toks = out.outputs[0].token_ids
    assert len(toks) == 30
    # Recomputed: the sinks and the kept window (plus the new tokens), not the whole text.
    recomputed = engine.stats().num_computed_tokens - computed_before
    assert recomputed == SINKS + (len(prompt) + 29 - floor)
    before = sinks_logits(hf, prompt + toks, SINKS, WINDOW)
    after = sinks_logits(hf, prompt + toks, SINKS, WINDOW, floor)
    err = {"before": [], "after": []}
    for j, (tok, lp) in enumerate(zip(toks, out.outputs[0].logprobs, strict=True)):
        row = (before if j < 10 else after)[len(prompt) - 1 + j]  # the 11th came after
        assert int(row.argmax()) == tok, f"output token {j}"
        assert abs(lp[tok].logprob - float(row[tok])) < 1e-3
        if j >= 10:
            for name, ref in (("before", before), ("after", after)):
                err[name].append(abs(lp[tok].logprob - float(ref[len(prompt) - 1 + j, tok])))
    # The engine follows the recomputed window, not the KV it had before (which differs).
    assert max(err["after"]) < 1e-4 and max(err["before"]) > 10 * max(err["after"]), err


def test_a_generation_runs_past_the_context_length(tiny_model_dirs, hf_models):
    """The tiny models have 1024 positions: a sinks request goes on past them."""
    llm = LLM(str(tiny_model_dirs["llama"]), max_model_len=128, num_kv_blocks=24)
    p = _prompt(100, 3)
    out = llm.generate([p], _sinks(200), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 200 and out.outputs[0].finish_reason == "length"
    _check_against_reference(hf_models["llama"], p, out)
    with pytest.raises(ValueError, match="context length"):  # a full one stops at it
        llm.generate([p], SamplingParams(max_tokens=200), use_tqdm=False)


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"kv_policy": "bogus", "kv_window": 32}, "kv_policy"),
        ({"kv_policy": 5, "kv_window": 32}, "kv_policy"),
        ({"kv_policy": "sinks"}, "kv_window"),
        ({"kv_policy": "sinks", "kv_window": math.nan}, "kv_window"),
        ({"kv_policy": "sinks", "kv_window": -32}, "kv_window"),
        ({"kv_policy": "sinks", "kv_window": 10**15}, "kv_window"),
        ({"kv_policy": "sinks", "kv_window": "32"}, "kv_window"),
        ({"kv_policy": "sinks", "kv_window": True}, "kv_window"),
        ({"kv_policy": "sinks", "kv_window": 8}, "at least one KV block"),
        ({"kv_policy": "sinks", "kv_window": 2000}, "context length"),
        ({"kv_policy": "sinks", "kv_window": 32, "num_sink_tokens": 40}, "num_sink_tokens"),
        ({"kv_policy": "sinks", "kv_window": 32, "num_sink_tokens": -1}, "num_sink_tokens"),
        ({"kv_policy": "sinks", "kv_window": 32, "num_sink_tokens": math.inf}, "num_sink_tokens"),
        ({"kv_window": 32}, "kv_policy 'sinks'"),
        ({"kv_policy": "full", "kv_window": 32}, "kv_window"),
    ],
)
def test_malformed_policies_are_refused_and_others_served(tiny_model_dirs, hf_models, extra, match):
    llm = LLM(str(tiny_model_dirs["llama"]))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, extra=extra)
    with pytest.raises(ValueError, match=match):
        llm.generate([[5, 6, 7]], params, use_tqdm=False)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf_models["llama"], [5, 6, 7], 4)


def test_a_model_whose_rotary_is_not_relative_is_refused(tmp_path):
    from tiny_models import build_tiny_model

    d = build_tiny_model(tmp_path / "yarn", "llama",
                         rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})
    llm = LLM(str(d))
    with pytest.raises(ValueError, match="rotary"):
        llm.generate([[5, 6, 7]], _sinks(4), use_tqdm=False)


def test_session_turns_past_the_window_reuse_the_pinned_window(tiny_model_dirs, hf_models):
    hf = hf_models["llama"]
    llm = LLM(str(tiny_model_dirs["llama"]), max_num_batched_tokens=64)
    engine = llm.engine
    history = _prompt(120, 11)
    for turn in range(3):
        params = _sinks(20)
        params.extra["session_id"] = "day-long"
        hits = engine.stats().prefix_cache_hit_tokens
        out = llm.generate([history], params, use_tqdm=False)[0]
        _check_against_reference(hf, history, out)
        if turn:  # everything the previous turn computed came from the pin (not its last token)
            assert engine.stats().prefix_cache_hit_tokens - hits == len(history) - 8
        history = history + out.outputs[0].token_ids + _prompt(7, 50 + turn)
    engine.scheduler.close_session("day-long")


def test_input_stream_20_windows_long_in_flat_memory(tiny_model_dirs, hf_models):
    """A stream 20x its window: blocks held stay flat, old input rolls out, the reply
    matches the reference over everything streamed, a replace before the window is
    refused (one within it works), and every block comes back."""
    hf = hf_models["llama"]
    policy = KVPolicy("sinks", SINKS, WINDOW)
    tokens = _prompt(20 * WINDOW, 21)

    async def main():
        engine = AsyncEngine(str(tiny_model_dirs["llama"]), max_num_batched_tokens=40)
        try:
            held = []
            async with engine.open_stream(kv_policy=policy) as stream:
                for i in range(0, len(tokens), 16):
                    stream.append(tokens[i : i + 16])
                    await stream.wait_prefilled()
                    s = engine.stats()
                    held.append(s.num_total_blocks - s.num_free_blocks)
                occupancy = engine.stats().kv_window_occupancy  # the window is full
                with pytest.raises(ValueError, match="kv_window"):
                    stream.replace(tokens[:100] + [9, 9])
                stream.replace(tokens[:-3] + [9, 9, 9])
                await stream.wait_prefilled()
                final = tokens[:-3] + [9, 9, 9]
                params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
                outs = [o async for o in stream.generate(params)]
            return held, final, outs, occupancy
        finally:
            await engine.shutdown()

    held, final, outs, occupancy = asyncio.run(main())
    assert occupancy == 1.0
    bound = 1 + (3 * WINDOW + 2 * 16) // 16 + 2
    assert max(held) <= bound, held
    assert max(held[len(held) // 4 :]) <= max(held[: len(held) // 4]) + 1, "memory kept growing"
    toks = [t for o in outs for t in o.outputs[0].token_ids]
    ref = sinks_logits(hf, final + toks, SINKS, WINDOW)
    assert toks == [int(ref[len(final) - 1 + j].argmax()) for j in range(len(toks))]
