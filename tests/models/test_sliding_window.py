"""Sliding-window attention against transformers: tiny random Mistral, Phi-3 and Qwen2 (all
layers sliding, or global and sliding layers mixed) on prompts and outputs several windows
long, greedy token-identical under every scheduler setting of the correctness suite, with
KV blocks small enough that many leave the window; an all-sliding model's long request
holds a window's worth of blocks; which layers slide follows transformers' config rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from oracle import (
    SCHEDULER_SETTINGS,
    assert_greedy_matches,
    greedy_references,
    hf_greedy,
    load_hf_model,
    random_prompts,
)
from tiny_models import build_tiny_model

from livelm import SamplingParams
from livelm.core.request_options import RequestOptions
from livelm.engine.llm import LLM
from livelm.models.model_config import ModelConfig

WINDOW, BLOCK = 24, 8
PROMPT_LENS = [3, 9, 17, 30, 48, 70, 100, 130]
NEW_TOKENS = 32
MODELS = {
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    "phi3": ("phi3", {"sliding_window": WINDOW}),
    # Qwen2: layer 0 global, layers 1 and 2 sliding (max_window_layers=1): nothing released.
    "qwen2_mixed": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1,
                              "num_hidden_layers": 3}),
    "qwen2_all": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 0}),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, tuple[Path, list[list[int]], list[list[int]]]]:
    """Per model: (dir, prompts, transformers' greedy continuations)."""
    return greedy_references(tmp_path_factory.mktemp("swa_models"), MODELS, PROMPT_LENS, NEW_TOKENS)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("setting", list(SCHEDULER_SETTINGS))
def test_greedy_matches_transformers(references, name: str, setting: str) -> None:
    """Every setting (the C++ kernels by default, the torch path under "torch_attention";
    "default" runs the batch twice, the second from the prefix cache; "preemption" must
    preempt) with 8-token blocks."""
    d, prompts, expected = references[name]
    # An all-sliding model holds a window per request: only a pool about one request large
    # (the longest, 162 tokens, must fit whole at admission) runs out and preempts.
    small = setting == "preemption" and name != "qwen2_mixed"
    assert_greedy_matches(d, prompts, expected, setting, block_size=BLOCK, **({"num_kv_blocks": 21} if small else {}))


def _without_window(d: Path):
    """transformers' model of ``d`` with every layer global (the same weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(d))
    config.sliding_window = 1 << 30  # a window longer than anything: some families always build the mask
    if hasattr(config, "layer_types"):
        config.layer_types = ["full_attention"] * config.num_hidden_layers
    return AutoModelForCausalLM.from_pretrained(str(d), config=config, dtype=torch.float32).eval()


def test_transformers_really_applies_the_window(references) -> None:
    """The greedy oracle is not vacuous: Mistral's weights without the window continue the
    long prompts differently; tokens whose query saw every key either way do not differ."""
    d, prompts, expected = references["mistral"]
    full = _without_window(d)
    differ = [hf_greedy(full, p, NEW_TOKENS) != want for p, want in zip(prompts, expected, strict=True)]
    n = WINDOW - len(prompts[0]) + 1  # tokens sampled at positions < WINDOW
    assert hf_greedy(full, prompts[0], n) == expected[0][:n]
    assert sum(differ[4:]) >= 3, "the window should change the long prompts' continuations"


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_logprobs_follow_the_window(references, name: str, backend: str) -> None:
    """Logprobs of a long prompt (prefill, in chunks over earlier context) and of its
    generated tokens (decodes) equal transformers' windowed model within 1e-3, while the
    same weights without the window are far off past the window (the tiny Qwen2's greedy
    tokens barely move with the window: its logprobs show the window is applied)."""
    from oracle import hf_logprobs

    d, prompts, _ = references[name]
    prompt = prompts[-1]
    llm = LLM(str(d), block_size=BLOCK, max_num_batched_tokens=48, attention_backend=backend)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    toks = out.outputs[0].token_ids
    text = prompt + toks
    got = torch.tensor([out.prompt_logprobs[i][prompt[i]].logprob for i in range(1, len(prompt))]
                       + [lp[t].logprob for t, lp in zip(toks, out.outputs[0].logprobs, strict=True)])
    picks = torch.tensor(text[1:])[:, None]
    want = hf_logprobs(load_hf_model(d), text)[:-1].gather(1, picks)[:, 0]
    unwindowed = hf_logprobs(_without_window(d), text)[:-1].gather(1, picks)[:, 0]
    assert (got - want).abs().max() < 1e-3
    assert (unwindowed - want)[: WINDOW - 1].abs().max() < 1e-4  # every key within the window
    assert (unwindowed - want)[WINDOW:].abs().max() > 0.05


# More families, on one setting each: which layers slide differs (Qwen3: from
# max_window_layers on; Qwen2-MoE: the even layers below it; Qwen3-MoE and Mixtral: all).
MORE_MODELS = {
    "mixtral": ("mixtral", {"sliding_window": WINDOW}),
    "qwen3": ("qwen3", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen2_moe": ("qwen2_moe", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2,
                                "num_hidden_layers": 3}),
    "qwen3_moe": ("qwen3_moe", {"use_sliding_window": True, "sliding_window": WINDOW}),
}


@pytest.mark.parametrize("name", list(MORE_MODELS))
def test_more_families_follow_the_window(tmp_path: Path, name: str) -> None:
    """Greedy as transformers under chunked prefill, and the prompt's logprobs within 1e-3
    of the windowed model while the unwindowed one is far off (the prompt's tokens are
    random, so their logprobs show every layer's attention; a tied model's greedy picks sit
    at probability ~1 either way)."""
    from oracle import hf_logprobs

    arch, overrides = MORE_MODELS[name]
    d = build_tiny_model(tmp_path / name, arch, **overrides)
    hf = load_hf_model(d)
    prompts = random_prompts([40, 90], seed=3)
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    assert_greedy_matches(d, prompts, expected, "chunked_prefill", block_size=BLOCK)
    llm = LLM(str(d), block_size=BLOCK, max_num_batched_tokens=48)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, prompt_logprobs=0)
    prompt = prompts[1]
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    picks = torch.tensor(prompt[1:])[:, None]
    want = hf_logprobs(hf, prompt)[:-1].gather(1, picks)[:, 0]
    unwindowed = hf_logprobs(_without_window(d), prompt)[:-1].gather(1, picks)[:, 0]
    got = torch.tensor([out.prompt_logprobs[i][prompt[i]].logprob for i in range(1, len(prompt))])
    assert (got - want).abs().max() < 1e-3
    assert (unwindowed - want)[WINDOW:].abs().max() > 0.05


def _run_alone(llm: LLM, prompt: list[int], max_tokens: int):
    """Step one request to its end: yields (blocks held, blocks released, tokens computed)
    after every step, then its final state."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engine.add("r", prompt, params, prompt_token_ids=prompt, options=RequestOptions.from_extra(params.extra))
    req = engine.scheduler.requests["r"]
    final = None
    while engine.scheduler.has_unfinished():
        for state, _ in engine.step():
            final = state
        yield len(req.block_ids), req.num_evicted_blocks, req.num_computed_tokens
    yield final


def test_all_sliding_request_holds_a_window_of_blocks(references) -> None:
    """A Mistral request of 130 + 200 tokens: after every step it holds at most
    ceil(window / block) + 2 blocks (the window, the block it writes, one slack block), the
    pool's used blocks are just those, and its output is still transformers'."""
    d, prompts, _ = references["mistral"]
    prompt, new = prompts[-1], 200
    hf = load_hf_model(d)
    want = hf_greedy(hf, prompt, new)
    llm = LLM(str(d), block_size=BLOCK, max_num_batched_tokens=32)
    bound = -(-WINDOW // BLOCK) + 2
    pool = llm.engine.scheduler.kv.pool
    peak = 0
    *steps, final = list(_run_alone(llm, prompt, new))
    for held, _, _ in steps[:-1]:  # the last step finished it: its blocks are back
        assert held <= bound
        peak = max(peak, held)
    assert max(released for _, released, _ in steps) > 30
    assert steps[-1][:2] == (0, 0)  # freed, so the table is plain again
    assert peak == bound
    assert final.final_output().outputs[0].token_ids == want
    assert pool.num_free_blocks == pool.num_blocks
    assert llm.engine.stats().num_evicted_tokens >= len(prompt) + new - WINDOW - 3 * BLOCK


def test_a_global_layer_keeps_every_block(references) -> None:
    """Qwen2 with a global layer: nothing is released, the request holds its whole text."""
    d, prompts, expected = references["qwen2_mixed"]
    llm = LLM(str(d), block_size=BLOCK, max_num_batched_tokens=32)
    *steps, final = list(_run_alone(llm, prompts[-1], NEW_TOKENS))
    held, released, computed = steps[-2]
    assert released == 0 and held == -(-computed // BLOCK)
    assert llm.engine.stats().num_evicted_tokens == 0
    assert final.final_output().outputs[0].token_ids == expected[-1]


def test_sinks_on_a_windowed_model_is_refused(references) -> None:
    d, prompts, expected = references["mistral"]
    llm = LLM(str(d), block_size=BLOCK)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                            extra={"kv_policy": "sinks", "kv_window": 32})
    with pytest.raises(ValueError, match="sliding window of 24 tokens.*kv_policy 'full'"):
        llm.generate([prompts[3]], params, use_tqdm=False)
    out = llm.generate([prompts[3]], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                       use_tqdm=False)
    assert out[0].outputs[0].token_ids == expected[3]


def test_n_greater_than_one_forks_a_sliding_prompt(references) -> None:
    """n = 3 sequences of a long prompt: the later ones fork the first one's window-bounded
    KV (or recompute when it already moved on) and all equal transformers' greedy output."""
    d, prompts, expected = references["mistral"]
    llm = LLM(str(d), block_size=BLOCK)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, n=3)
    out = llm.generate([prompts[-2]], params, use_tqdm=False)[0]
    assert [o.token_ids for o in out.outputs] == [expected[-2]] * 3


def _hf_windows(config) -> tuple:
    return tuple(config.sliding_window if t == "sliding_attention" else None for t in config.layer_types)


@pytest.mark.parametrize(("cls", "arch", "kwargs"), [
    ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 3}),
    ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False, "sliding_window": 64}),
    ("Qwen3Config", "Qwen3ForCausalLM", {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 5}),
    ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"use_sliding_window": True, "sliding_window": 16,
                                               "max_window_layers": 5}),
])
@pytest.mark.parametrize("with_layer_types", [True, False])
def test_which_layers_slide_follows_transformers(cls: str, arch: str, kwargs: dict, with_layer_types: bool) -> None:
    """From the config transformers writes (``layer_types`` listed) and from one without
    them (livelm derives them as transformers' config class would)."""
    import transformers

    config = getattr(transformers, cls)(num_hidden_layers=7, hidden_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=100, **kwargs)
    raw = {**config.to_dict(), "architectures": [arch]}
    if not with_layer_types:
        raw.pop("layer_types")
    want = _hf_windows(config)
    got = ModelConfig.from_dict(raw).sliding_windows
    assert (got or (None,) * 7) == want
    assert any(w is not None for w in want) == kwargs["use_sliding_window"]


def test_every_layer_slides_in_mistral_mixtral_phi3_and_qwen3_moe() -> None:
    base = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    for arch, extra in [("MistralForCausalLM", {"sliding_window": 40}), ("Phi3ForCausalLM", {"sliding_window": 40}),
                        ("MixtralForCausalLM", {"sliding_window": 40, "num_local_experts": 2,
                                                "num_experts_per_tok": 1}),
                        ("Qwen3MoeForCausalLM", {"sliding_window": 40, "use_sliding_window": True,
                                                 "num_experts": 2, "num_experts_per_tok": 1,
                                                 "moe_intermediate_size": 8})]:
        cfg = ModelConfig.from_dict({**base, **extra, "architectures": [arch]})
        assert cfg.sliding_windows == (40, 40, 40) and cfg.all_layers_slide
    assert ModelConfig.from_dict({**base, "architectures": ["MistralForCausalLM"],
                                  "sliding_window": None}).sliding_windows == ()
    # Llama has no window, whatever its config says.
    assert ModelConfig.from_dict({**base, "architectures": ["LlamaForCausalLM"],
                                  "sliding_window": 8}).sliding_windows == ()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4096"])
def test_a_malformed_window_is_refused(bad) -> None:
    raw = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=64, vocab_size=100,
               architectures=["MistralForCausalLM"], sliding_window=bad)
    with pytest.raises(ValueError, match="sliding_window must be a positive integer"):
        ModelConfig.from_dict(raw)
    qwen = {**raw, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 8,
            "layer_types": ["sliding_attention", "chunked_attention"]}
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_dict(qwen)


def test_a_request_longer_than_the_pool_runs_in_window_sized_memory(references) -> None:
    """Mistral with a pool of 12 blocks (96 tokens) serves a 130-token prompt + 60 tokens:
    it holds about two windows at most (chunks of at most a window), greedy as transformers;
    a model with a global layer still refuses what cannot fit whole."""
    d, prompts, _ = references["mistral"]
    hf = load_hf_model(d)
    want = hf_greedy(hf, prompts[-1], 60)
    llm = LLM(str(d), block_size=BLOCK, num_kv_blocks=12)
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    out = llm.generate([prompts[-1]], params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want
    d_mixed = references["qwen2_mixed"][0]
    with pytest.raises(ValueError, match="cannot fit in the KV cache"):
        LLM(str(d_mixed), block_size=BLOCK, num_kv_blocks=12).generate([prompts[-1]], params, use_tqdm=False)


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_speculative_decoding_on_a_sliding_model(references, method: str) -> None:
    """Drafted tokens verified over a window whose old blocks are being released (their
    rejected slots given back through the logical table): greedy as transformers, with
    drafts really accepted."""
    d, prompts, expected = references["mistral"]
    # Fixed drafting: the cost gate (part of adaptive) may rightly skip drafts for a batch
    # of this tiny model, and this test is about verification over a window.
    llm = LLM(str(d), block_size=BLOCK, speculative_method=method, speculative_adaptive=False,
              max_num_batched_tokens=40)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.engine.stats()
    assert stats.spec_num_accepted_tokens > 0 and stats.num_evicted_tokens > 0


def test_session_turns_reuse_the_pinned_window(references) -> None:
    """Turns of a session on Mistral, each past the window: the next turn takes the pin
    (released blocks and all: its table stays logical) and prefills only what it adds,
    greedy as transformers over the whole history."""
    d, prompts, _ = references["mistral"]
    hf = load_hf_model(d)
    llm = LLM(str(d), block_size=BLOCK, max_num_batched_tokens=40)
    engine = llm.engine
    history = list(prompts[-2])
    for turn in range(3):
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, extra={"session_id": "s"})
        hits = engine.stats().prefix_cache_hit_tokens
        out = llm.generate([history], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == hf_greedy(hf, history, 20)
        if turn:  # all the previous turn computed came from the pin (not its last token)
            assert engine.stats().prefix_cache_hit_tokens - hits == len(history) - 8
        history = history + out.outputs[0].token_ids + random_prompts([7], seed=50 + turn)[0]
    engine.scheduler.close_session("s")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_tensor_parallel_mistral_follows_the_window(references, backend: str) -> None:
    """TP=2 (each rank its heads' KV, the same logical block tables): greedy as
    transformers with blocks released on every rank."""
    d, prompts, expected = references["mistral"]
    llm = LLM(str(d), block_size=BLOCK, tensor_parallel_size=2, num_threads=1, max_num_batched_tokens=40,
              attention_backend=backend)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        outs = llm.generate(prompts[4:], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected[4:]
        assert llm.engine.stats().num_evicted_tokens > 0
    finally:
        llm.engine.close()
