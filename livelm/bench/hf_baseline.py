"""The transformers baseline of the offline benchmarks: its model, and its batched greedy
``generate`` timed over a list of requests (``livelm bench throughput`` and
``benchmarks/offline_throughput.py`` both run it against livelm)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class RunResult:
    """One engine's timed run of one workload."""

    seconds: float
    output_token_ids: list[list[int]]
    useful_output_tokens: int
    extra: dict = field(default_factory=dict)


def build_hf(model_dir: Path):
    """transformers' model (fp32, its default SDPA attention), EOS disabled for generate."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    # generate() merges the model's generation_config into ours; drop EOS there so that
    # no sequence stops early (livelm runs with ignore_eos).
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def run_hf(model, prompts: list[list[int]], output_lens: list[int], batch_size: int) -> RunResult:
    """transformers' batched greedy ``generate``: prompts sorted by length, batches of
    ``batch_size`` left-padded to their longest prompt, each run to its longest output.

    Only the requested number of output tokens of each request counts as useful.
    """
    from transformers import GenerationConfig

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    generated = padded_prompt = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in batch)
            max_new = max(output_lens[i] for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                p = prompts[i]
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            gen = GenerationConfig(
                do_sample=False,
                max_new_tokens=max_new,
                min_new_tokens=None,
                eos_token_id=None,
                pad_token_id=0,
                use_cache=True,
            )
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
            new = out[:, width:]
            if new.shape[1] != max_new:
                raise RuntimeError(
                    f"transformers generated {new.shape[1]} tokens, expected {max_new}"
                )
            for row, i in enumerate(batch):
                results[i] = new[row, : output_lens[i]].tolist()
            generated += len(batch) * max_new
            padded_prompt += len(batch) * width
    seconds = time.perf_counter() - t0
    return RunResult(
        seconds,
        results,
        sum(output_lens),
        {
            "batch_size": batch_size,
            "generated_tokens": generated,
            "padded_prompt_tokens": padded_prompt,
        },
    )
