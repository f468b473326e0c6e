"""The correctness oracle: greedy continuations and logits from Hugging Face transformers."""

from __future__ import annotations

from pathlib import Path

import torch


def load_hf_model(model_dir: Path):
    """The transformers model of a test directory, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of one prompt with transformers' own KV cache (no padding, no eos)."""
    ids = torch.tensor([prompt_ids])
    out = model(ids, use_cache=True)
    past, generated = out.past_key_values, []
    for _ in range(max_new_tokens):
        tok = int(out.logits[0, -1].argmax())
        generated.append(tok)
        out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return generated


@torch.inference_mode()
def hf_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """log-softmax over the vocabulary at every position of ``token_ids`` (teacher forced)."""
    logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


# The scheduler settings every architecture's greedy output is checked under (the same as
# tests/engine/test_correctness.py's): chunked prefill, a tiny token budget, preemption by
# a small KV pool, and the pure-torch attention path.
SCHEDULER_SETTINGS: dict[str, dict] = {
    "default": {},
    "chunked_prefill": {"max_num_batched_tokens": 64},
    "tiny_budget": {"max_num_batched_tokens": 7, "max_num_seqs": 5},
    "preemption": {"num_kv_blocks": 30, "max_num_batched_tokens": 256},
    "torch_attention": {"max_num_batched_tokens": 64, "attention_backend": "torch"},
}


def assert_greedy_matches(model_dir: Path, prompts: list[list[int]], expected: list[list[int]],
                          setting: str, **engine_kwargs) -> None:
    """livelm's greedy continuations of ``prompts`` under ``setting`` equal ``expected``
    (transformers'); under "default" the batch runs twice, the second time from the prefix
    cache; under "preemption" the pool must really have preempted."""
    from livelm import SamplingParams
    from livelm.engine.llm import LLM

    new_tokens = len(expected[0])
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm = LLM(str(model_dir), **{**SCHEDULER_SETTINGS[setting], **engine_kwargs})
    rounds = 2 if setting == "default" else 1
    for _ in range(rounds):
        outputs = llm.generate(prompts, params, use_tqdm=False)
        for prompt, out, want in zip(prompts, outputs, expected, strict=True):
            assert out.outputs[0].token_ids == want, f"prompt of {len(prompt)} tokens diverged"
    if setting == "default":
        assert llm.engine.stats().prefix_cache_hit_tokens > 0, "the second round should hit the prefix cache"
    if setting == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0, "the tiny pool should force preemption"


def random_prompts(lens: list[int], seed: int = 0) -> list[list[int]]:
    """Prompts of random token ids (of the tiny models' tokenizer, specials excluded), one
    per length."""
    import random

    from tiny_models import TOKENIZER_VOCAB

    rng = random.Random(seed)
    return [[rng.randrange(3, TOKENIZER_VOCAB) for _ in range(n)] for n in lens]


def greedy_references(root: Path, models: dict, prompt_lens, new_tokens: int) -> dict:
    """Per model name in ``models`` ({name: (arch, config overrides)}): (its tiny model's
    directory under ``root``, prompts, transformers' greedy continuations of them).
    ``prompt_lens``: the prompts' lengths, or a function of a model's overrides giving them."""
    from tiny_models import build_tiny_model

    refs = {}
    for name, (arch, overrides) in models.items():
        d = build_tiny_model(root / name, arch, **overrides)
        hf = load_hf_model(d)
        prompts = random_prompts(prompt_lens(overrides) if callable(prompt_lens) else prompt_lens)
        refs[name] = (d, prompts, [hf_greedy(hf, p, new_tokens) for p in prompts])
    return refs


def record_routing(monkeypatch) -> list[torch.Tensor]:  # noqa: ANN001
    """Patch the MoE router so that every call's chosen expert ids [T, top_k] are appended
    to the returned list (to check that a test reaches every expert)."""
    from livelm.models import moe

    seen: list[torch.Tensor] = []
    real = moe.route

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        weights, ids = real(*args, **kwargs)
        seen.append(ids)
        return weights, ids

    monkeypatch.setattr(moe, "route", recording)
    return seen
