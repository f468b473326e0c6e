"""Speculative decoding with a draft model (speculative_method="draft"): a 1-layer cut of the
tiny target drafts for it with its own paged KV. Greedy outputs token-identical to plain
decoding and to transformers under every scheduler setting, with several requests at
once; the target drafting for itself accepts nearly everything (the draft KV is right);
seeded sampling equals plain decoding's; the draft pool's blocks all come back; a draft
model that cannot draft for the target is refused at engine start."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from oracle import SCHEDULER_SETTINGS, hf_greedy, load_hf_model
from tiny_models import build_layer_draft, build_tiny_model

from livelm import SamplingParams
from livelm.core.kv_manager import blocks_needed
from livelm.engine.llm import LLM

NEW_TOKENS = 32


def _prompts(seed: int = 0, count: int = 8, longest: int = 64) -> list[list[int]]:
    # Long enough together (with their outputs) to overflow the "preemption" setting's pool.
    rng = random.Random(seed)
    return [[rng.randrange(3, 400) for _ in range(rng.randrange(3, longest))] for _ in range(count)]


@pytest.fixture(scope="module")
def draft_dir(llama_dir, tmp_path_factory):
    return build_layer_draft(llama_dir, tmp_path_factory.mktemp("draft") / "llama-1layer", num_layers=1)


@pytest.fixture(scope="module")
def hf(llama_dir):
    return load_hf_model(llama_dir)


@pytest.fixture(scope="module")
def prompts():
    return _prompts()


@pytest.fixture(scope="module")
def expected(hf, prompts):
    return [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)


def _drafting_happened(llm: LLM) -> None:
    stats = llm.engine.scheduler.speculator.stats()
    assert stats.num_accepted_tokens > 0, "no draft was ever accepted: the test would check nothing"
    assert stats.num_accepted_tokens < stats.num_draft_tokens, "no draft was ever rejected"
    assert stats.draft_model_seconds > 0
    assert llm.engine.stats().spec_draft_model_seconds == stats.draft_model_seconds


@pytest.mark.parametrize("setting", list(SCHEDULER_SETTINGS))
def test_greedy_is_token_identical_to_plain_decoding(llama_dir, draft_dir, prompts, expected, setting):
    plain = LLM(str(llama_dir), **SCHEDULER_SETTINGS[setting]).generate(prompts, GREEDY, use_tqdm=False)
    llm = LLM(str(llama_dir), speculative_method="draft", speculative_draft_model=str(draft_dir),
              **SCHEDULER_SETTINGS[setting])
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for want, base, out in zip(expected, plain, outs, strict=True):
        assert out.outputs[0].token_ids == want == base.outputs[0].token_ids
        for tok, a, b in zip(want, base.outputs[0].logprobs, out.outputs[0].logprobs, strict=True):
            assert abs(a[tok].logprob - b[tok].logprob) < 1e-4
    _drafting_happened(llm)
    draft = llm.engine.draft
    assert draft.num_blocks == llm.engine.cache_config.num_blocks  # its own pool, as many slots
    assert draft.num_free_blocks == draft.num_blocks and draft.num_requests == 0
    if setting == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    if setting == "default":  # again, now from the target's prefix cache (the draft recomputes)
        again = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == expected
        assert llm.engine.stats().prefix_cache_hit_tokens > 0


@pytest.mark.parametrize("setting", ["default", "tiny_budget", "preemption"])
def test_the_target_drafting_for_itself_is_accepted(llama_dir, prompts, expected, setting):
    # Same weights: every draft token is the target's own greedy token, unless the draft
    # KV (catch-up chunks, rollback, recompute after preemption) were wrong.
    llm = LLM(str(llama_dir), speculative_method="draft", speculative_draft_model=str(llama_dir),
              speculative_adaptive=False, num_speculative_tokens=4, **SCHEDULER_SETTINGS[setting])
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.engine.stats()
    assert stats.spec_num_draft_tokens >= len(prompts) * 4
    assert stats.spec_acceptance_rate > 0.9
    if setting == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0


def test_draft_requests_are_drafted_in_one_batch(llama_dir, prompts, expected):
    # Each step catches every request up in one forward, then k - 1 batched decodes: never
    # one forward per request.
    llm = LLM(str(llama_dir), speculative_method="draft", speculative_draft_model=str(llama_dir),
              speculative_adaptive=False, num_speculative_tokens=3)
    draft = llm.engine.draft
    sizes: list[int] = []
    forward = draft.runner.greedy_tokens
    draft.runner.greedy_tokens = lambda chunks: (sizes.append(len(chunks)), forward(chunks))[1]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert max(sizes) == len(prompts)
    assert draft.num_forwards <= 3 * (NEW_TOKENS + 1)


def test_mixed_batch_with_per_request_methods(llama_dir, draft_dir, prompts, expected):
    # An engine with a draft model but no default method: requests pick draft, ngram or off.
    llm = LLM(str(llama_dir), speculative_draft_model=str(draft_dir), max_num_batched_tokens=40)
    overrides = [{"speculative_method": "draft"}, {}, {"speculative_method": "ngram"},
                 {"speculative_method": "draft", "num_speculative_tokens": 2}]
    params = [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True,
                             extra=overrides[i % len(overrides)]) for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.stats().spec_draft_model_seconds > 0


def test_seeded_sampling_gives_plain_decodings_tokens(llama_dir, prompts):
    # Drafts are the draft model's greedy tokens (q a point mass): accepting d iff the
    # target's own draw equals d is exact, and a seeded request draws plain decoding's numbers.
    params = [SamplingParams(temperature=(0.05, 0.3, 0.8)[i % 3], top_p=0.9, top_k=20 * (i % 2),
                             repetition_penalty=1.0 + 0.1 * (i % 2), max_tokens=NEW_TOKENS, seed=i,
                             sampling_logprobs=True) for i in range(len(prompts))]
    plain = LLM(str(llama_dir)).generate(prompts, params, use_tqdm=False)
    llm = LLM(str(llama_dir), speculative_method="draft", speculative_draft_model=str(llama_dir))
    outs = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(plain, outs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        diffs = [abs(u - v) for u, v in zip(a.outputs[0].sampling_logprobs, b.outputs[0].sampling_logprobs,
                                            strict=True)]
        assert max(diffs) < 1e-4
    stats = llm.engine.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    # n > 1: the sequences forked from one prompt draft each with KV of their own.
    params = SamplingParams(n=3, temperature=0.7, max_tokens=NEW_TOKENS, seed=11)
    want = LLM(str(llama_dir)).generate(prompts[:2], params, use_tqdm=False)
    got = llm.generate(prompts[:2], params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]


def test_draft_kv_is_rolled_back_and_freed(llama_dir, draft_dir):
    # Block size 2, long drafts: between steps a request's draft KV holds no block past its
    # known tokens (rejected drafts' blocks went back); an abort frees the rest.
    llm = LLM(str(llama_dir), speculative_method="draft", speculative_draft_model=str(draft_dir), block_size=2,
              num_speculative_tokens=8, speculative_adaptive=False)
    eng = llm.engine
    draft = eng.draft
    for i, p in enumerate(_prompts(7, 3)):
        eng.add(f"r{i}", p, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    held = 0
    for _ in range(30):
        eng.step()
        for rid, req in eng.scheduler.requests.items():
            kv = draft._kv.get(rid)
            if kv is not None:
                assert len(kv.block_ids) <= blocks_needed(req.num_tokens, 2)
                assert kv.tokens == req.all_token_ids[: len(kv.tokens)]
        held = max(held, draft.num_blocks - draft.num_free_blocks)
    stats = eng.scheduler.speculator.stats()
    assert stats.num_draft_tokens - stats.num_accepted_tokens >= 8, "few drafts were rejected"
    assert held > 0 and draft.num_requests == 3
    for i in range(3):
        eng.abort(f"r{i}")
    assert draft.num_free_blocks == draft.num_blocks and draft.num_requests == 0


def test_a_short_draft_pool_stays_exact(llama_dir):
    # A draft pool too small for every request at once: the KV of requests not drafting
    # goes first, and those still without room decode plainly; outputs stay exact.
    prompts = _prompts(3, 4)
    want = LLM(str(llama_dir)).generate(prompts, GREEDY, use_tqdm=False)
    llm = LLM(str(llama_dir), speculative_method="draft", speculative_draft_model=str(llama_dir), block_size=4,
              num_kv_blocks=64, max_num_batched_tokens=64)
    draft = llm.engine.draft
    draft.pool = type(draft.pool)(24)  # room for about one context at a time
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in want]
    assert llm.engine.stats().spec_num_accepted_tokens > 0
    assert draft.num_no_room > 0, "the pool never ran short: the test would check nothing"
    assert draft.num_free_blocks == draft.num_blocks


def test_a_failing_draft_model_only_costs_the_drafts(llama_dir, prompts, expected):
    # The draft model raises on every third forward: those steps decode without drafts,
    # the draft KV of the requests involved is dropped, and outputs stay exact.
    llm = LLM(str(llama_dir), speculative_method="draft", speculative_draft_model=str(llama_dir),
              speculative_adaptive=False)  # fixed drafting: the cost gate may skip batched drafts
    draft = llm.engine.draft
    forward = draft.runner.greedy_tokens
    calls = []

    def flaky(chunks):
        calls.append(len(chunks))
        if len(calls) % 3 == 0:
            raise RuntimeError("draft model failure")
        return forward(chunks)

    draft.runner.greedy_tokens = flaky
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert len(calls) >= 6 and llm.engine.stats().spec_num_accepted_tokens > 0
    assert draft.num_free_blocks == draft.num_blocks


# ------------------------------------------------------------------ bad input


def test_draft_without_a_draft_model_is_refused(llama_dir):
    with pytest.raises(ValueError, match="speculative_draft_model"):
        LLM(str(llama_dir), speculative_method="draft")
    llm = LLM(str(llama_dir), speculative_method="ngram")
    params = SamplingParams(temperature=0, max_tokens=4, extra={"speculative_method": "draft"})
    with pytest.raises(ValueError, match="needs a draft model.*speculative_draft_model"):
        llm.generate([[5, 6, 7]], params, use_tqdm=False)
    assert llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)


def test_a_missing_draft_model_path_is_refused(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="speculative_draft_model.*does not exist"):
        LLM(str(llama_dir), speculative_method="draft", speculative_draft_model=str(tmp_path / "nope"))


def test_a_draft_model_of_another_vocabulary_size_is_refused(llama_dir, tmp_path):
    other = build_tiny_model(tmp_path / "big-vocab", "llama", num_hidden_layers=1, vocab_size=450)
    with pytest.raises(ValueError, match="vocabulary of 450 tokens, the served model 416"):
        LLM(str(llama_dir), speculative_method="draft", speculative_draft_model=str(other))


def test_a_draft_model_of_another_tokenizer_is_refused(llama_dir, draft_dir, tmp_path):
    # Same vocabulary size, but two tokens swap ids.
    other = tmp_path / "swapped"
    shutil.copytree(draft_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="different tokenizer: 2 token\\(s\\) have other ids"):
        LLM(str(llama_dir), speculative_method="draft", speculative_draft_model=str(other))
    # Special ids that differ are refused too.
    special = tmp_path / "special"
    shutil.copytree(draft_dir, special)
    cfg = json.loads((special / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|im_start|>"
    (special / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="different tokenizer: eos_token_id"):
        LLM(str(llama_dir), speculative_method="draft", speculative_draft_model=str(special))
