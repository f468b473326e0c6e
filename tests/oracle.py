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
