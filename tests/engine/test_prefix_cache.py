"""Prefix caching end to end: greedy outputs token-identical to transformers, cache on or off."""

from __future__ import annotations

import random

import pytest
from oracle import hf_greedy, load_hf_model

from livelm import SamplingParams
from livelm.engine.llm import LLM

NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _shared_prefix_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompts that share prefixes in every way a cache can be hit (block size 16)."""
    rng = random.Random(seed)

    def rand(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    system = rand(48)  # three full blocks
    other = rand(37)
    return [
        system + rand(9),
        system + rand(23),
        system[:20] + rand(15),  # shares 20 tokens: the hit ends mid-block (16 reused)
        system + [system[0]],  # 49 tokens: 48 cached, only the last one recomputed
        list(system),  # 48 tokens = 3 full blocks: the last block is recomputed
        system + rand(9),
        other,
        other + rand(30),
        system[:16] + rand(1),  # exactly one block + 1
        list(other),  # the whole prompt is a hit
    ]


@pytest.fixture(scope="module")
def reference(llama_dir):
    hf = load_hf_model(llama_dir)
    prompts = _shared_prefix_prompts(hf.config.vocab_size)
    return prompts, [hf_greedy(hf, p, NEW_TOKENS) for p in prompts], hf


SETTINGS = {
    "default": {},
    "chunked": {"max_num_batched_tokens": 24},
    # 12 blocks of 16: the pool holds a couple of requests at a time, so cached blocks are
    # evicted and running requests preempted all along.
    "tiny_pool": {"num_kv_blocks": 12, "max_num_batched_tokens": 64},
}


def _generate_twice(llm: LLM, prompts: list[list[int]], params=GREEDY):
    first = llm.generate(prompts, params, use_tqdm=False)
    second = llm.generate(prompts, params, use_tqdm=False)  # now everything could hit
    return first, second


@pytest.mark.parametrize("caching", [True, False], ids=["cache_on", "cache_off"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_matches_transformers_with_caching_on_and_off(llama_dir, reference, setting, caching):
    prompts, expected, _ = reference
    llm = LLM(str(llama_dir), enable_prefix_caching=caching, **SETTINGS[setting])
    for outs in _generate_twice(llm, prompts):
        for prompt, out, want in zip(prompts, outs, expected, strict=True):
            assert out.prompt_token_ids == prompt
            assert out.outputs[0].token_ids == want, f"prompt of {len(prompt)} tokens diverged"
    stats = llm.engine.stats()
    if caching:
        assert stats.prefix_cache_hit_tokens > 0
    else:
        assert stats.prefix_cache_hit_tokens == 0 and stats.num_cached_blocks == 0
    if setting == "tiny_pool":
        assert llm.engine.scheduler.num_preemptions > 0
        if caching:
            assert stats.num_cache_evictions > 0  # and the second pass still matched


def test_hits_are_what_the_cache_promises(llama_dir, reference):
    prompts, expected, _ = reference
    llm = LLM(str(llama_dir))
    llm.generate(prompts, GREEDY, use_tqdm=False)
    before = llm.engine.stats().prefix_cache_hit_tokens
    # Alone, a prompt of 4 full blocks + 1 token reuses 4 blocks and computes 1 token.
    solo = prompts[0][:48] + prompts[6][:16] + [5]
    llm.generate([solo[:-1] + [6]], GREEDY, use_tqdm=False)
    out = llm.generate([solo], GREEDY, use_tqdm=False)[0]
    assert llm.engine.stats().prefix_cache_hit_tokens - before == 48 + 64
    assert out.outputs[0].token_ids == hf_greedy(reference[2], solo, NEW_TOKENS)


def test_n_greater_than_one_with_caching(llama_dir, reference):
    prompts, expected, _ = reference
    params = SamplingParams(n=3, temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for caching in (True, False):
        llm = LLM(str(llama_dir), enable_prefix_caching=caching)
        for outs in _generate_twice(llm, prompts[:4], params):
            for out, want in zip(outs, expected[:4], strict=True):
                assert [c.token_ids for c in out.outputs] == [want] * 3


def test_forced_hash_collisions_never_return_wrong_kv(llama_dir, reference):
    prompts, expected, _ = reference
    llm = LLM(str(llama_dir))
    cache = llm.engine.scheduler.kv.prefix_cache
    cache.hash_fn = lambda parent, tokens, salt: 1234  # the test hook: every key collides
    for outs in _generate_twice(llm, prompts):
        for out, want in zip(outs, expected, strict=True):
            assert out.outputs[0].token_ids == want
    assert cache.num_collisions > 0
    assert llm.engine.stats().prefix_cache_hit_tokens > 0  # verified hits still happen


def test_cache_salts_isolate(llama_dir, reference):
    prompts, expected, _ = reference
    llm = LLM(str(llama_dir))

    def run(salt):
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True,
                                extra={"cache_salt": salt} if salt else {})
        before = llm.engine.stats().prefix_cache_hit_tokens
        out = llm.generate([prompts[9]], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == expected[9]
        return llm.engine.stats().prefix_cache_hit_tokens - before

    assert run("tenant-a") == 0
    assert run("tenant-b") == 0
    assert run(None) == 0
    assert run("tenant-a") == 32


def test_prefix_grouped_batch_keeps_input_order(llama_dir, reference):
    prompts, expected, _ = reference
    order = list(range(len(prompts))) * 2
    random.Random(3).shuffle(order)
    batch = [prompts[i] for i in order]
    params = [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS - (i % 3), ignore_eos=True)
              for i in range(len(batch))]
    llm = LLM(str(llama_dir), num_kv_blocks=16)
    grouped = llm.generate(batch, params, use_tqdm=False)
    plain = llm.generate(batch, params, use_tqdm=False, group_prefixes=False)
    for i, (g, p) in enumerate(zip(grouped, plain, strict=True)):
        want = expected[order[i]][: NEW_TOKENS - (i % 3)]
        assert g.prompt_token_ids == batch[i]
        assert g.outputs[0].token_ids == p.outputs[0].token_ids == want


def test_prompt_logprobs_are_complete_with_caching(llama_dir, reference):
    prompts, _, _ = reference
    llm = LLM(str(llama_dir))
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0)
    for out in llm.generate(prompts[:2] * 2, params, use_tqdm=False):
        assert all(out.prompt_logprobs[i] is not None for i in range(1, len(out.prompt_token_ids)))
