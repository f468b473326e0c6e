"""ModelRunner alone, on the tiny Llama: the flat batch it builds from a hand-made
SchedulerOutput (slots, decode block tables, prefill segments), its KV cache, per-request
generators, prompt logprobs, and the same tokens from either attention backend."""

from __future__ import annotations

import pytest
import torch

from livelm.core.scheduler_output import ScheduledChunk, SchedulerOutput
from livelm.layers.attention import CpuKernelAttention, TorchAttention
from livelm.models.loader import load_model
from livelm.runner.model_runner import ModelRunner
from livelm.sampling_params import SamplingParams

BLOCK = 4
NUM_BLOCKS = 32
GREEDY = SamplingParams(temperature=0.0)


def _runner(model_dir, backend: str = "torch") -> ModelRunner:
    model = load_model(model_dir, torch.float32, torch.device("cpu"), 256)
    return ModelRunner(model, NUM_BLOCKS, BLOCK, frozenset({2}), attention_backend=backend)


@pytest.fixture(scope="module")
def runner(llama_dir) -> ModelRunner:
    return _runner(llama_dir)


def _chunk(rid: str, tokens: list[int], start: int, blocks: list[int], sample: bool = True,
           params: SamplingParams = GREEDY, prompt: list[int] | None = None, **kw) -> ScheduledChunk:
    return ScheduledChunk(rid, tokens, start, blocks, sample, params,
                          prompt if prompt is not None else tokens, [], **kw)


def test_kv_cache_shapes(runner: ModelRunner) -> None:
    cfg = runner.model.config
    assert len(runner.kv_caches) == cfg.num_layers
    for k, v in runner.kv_caches:
        assert k.shape == v.shape == (cfg.num_kv_heads, NUM_BLOCKS * BLOCK, cfg.head_dim)
        assert k.dtype == v.dtype == torch.float32
        assert k.data_ptr() != v.data_ptr()
    per_block = ModelRunner.kv_bytes_per_block(cfg, BLOCK, torch.float32)
    assert per_block == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * BLOCK * 4
    assert per_block * NUM_BLOCKS == sum(k.nbytes + v.nbytes for k, v in runner.kv_caches)


def test_prepare_builds_slots_tables_and_segments(runner: ModelRunner) -> None:
    chunks = [
        _chunk("d0", [11], 5, [7, 3, 30]),  # decode at position 5: blocks 7, 3 (30 not reached yet)
        _chunk("d1", [12], 0, [5]),  # decode at position 0: a one-block table, padded
        _chunk("p0", [20, 21, 22], 0, [9], sample=False),  # a prompt's first chunk
        _chunk("p1", [30, 31, 32], 6, [1, 4, 2], prompt=list(range(9))),  # continues 6 cached tokens
    ]
    ids, pos, meta, row_of = runner._prepare(chunks)
    assert ids.tolist() == [11, 12, 20, 21, 22, 30, 31, 32]
    assert pos.tolist() == [5, 0, 0, 1, 2, 6, 7, 8]
    # slot = block_ids[p // 4] * 4 + p % 4
    assert meta.slot_mapping.tolist() == [3 * 4 + 1, 5 * 4, 36, 37, 38, 4 * 4 + 2, 4 * 4 + 3, 2 * 4]
    assert row_of == {"d0": (0, 1), "d1": (1, 2), "p0": (2, 5), "p1": (5, 8)}
    assert meta.num_decodes == 2 and meta.block_size == BLOCK
    assert meta.decode_block_tables.tolist() == [[7, 3], [5, 0]]
    assert meta.decode_lens.tolist() == [6, 1]
    first, cont = meta.prefills
    assert (first.query_start, first.query_len, first.context_slots) == (2, 3, None)
    assert (cont.query_start, cont.query_len) == (5, 3)
    assert cont.context_slots.tolist() == [4, 5, 6, 7, 16, 17, 18, 19, 8]  # positions 0..8
    assert meta.backend is runner.attn_backend and isinstance(runner.attn_backend, TorchAttention)

    # The torch backend's extras: gather slots and padding bias per decode, causal masks.
    # Positions past a row's length read its first slot (always written), never a slot
    # that may hold garbage: the cache is not zero-filled.
    assert meta.decode_slots.tolist() == [[28, 29, 30, 31, 12, 13, 28, 28], [20, 20, 20, 20, 20, 20, 20, 20]]
    assert torch.isinf(meta.decode_bias[0, :, 0]).tolist() == [
        [False] * 6 + [True] * 2,
        [False] + [True] * 7,
    ]
    assert cont.causal_mask.shape == (3, 9)
    assert cont.causal_mask.sum(1).tolist() == [7, 8, 9]  # query at position 6 + i sees keys 0..6 + i
    assert first.causal_mask is None  # a chunk at position 0 runs SDPA's own causal mask


def test_cpu_backend_needs_no_torch_extras(llama_dir) -> None:
    runner = _runner(llama_dir, "cpu")
    backend = runner.attn_backend
    if not isinstance(backend, CpuKernelAttention) or backend.decode is None or backend.prefill is None:
        pytest.skip("the C++ attention kernels could not be built here")
    _, _, meta, _ = runner._prepare([_chunk("d", [1], 5, [7, 3]), _chunk("p", [2, 3], 6, [1, 4])])
    assert meta.backend is backend
    assert meta.decode_slots is None and meta.decode_bias is None
    assert meta.prefills[0].causal_mask is None  # the kernel masks from positions


def test_backends_give_the_same_tokens(llama_dir, runner: ModelRunner) -> None:
    """Prefill, then decodes fed back, through each backend: the same greedy tokens."""
    other = _runner(llama_dir, "cpu")
    prompts = {"a": list(range(3, 40)), "b": [7, 8, 9, 10, 11]}
    blocks = {"a": list(range(0, 12)), "b": list(range(12, 16))}
    tokens: dict[str, list[list[int]]] = {}
    for r in (runner, other):
        seqs = {rid: list(p) for rid, p in prompts.items()}
        chunks = [_chunk(rid, p, 0, blocks[rid]) for rid, p in prompts.items()]
        for _ in range(6):
            out = r.execute(SchedulerOutput(chunks))
            for rid in seqs:
                seqs[rid].append(out.sampled[rid].token_id)
            chunks = [_chunk(rid, s[-1:], len(s) - 1, blocks[rid], prompt=prompts[rid]) for rid, s in seqs.items()]
        tokens[r.attn_backend.name] = [seqs["a"], seqs["b"]]
    assert len(set(map(str, tokens.values()))) == 1, tokens


def test_finished_requests_drop_their_generators(runner: ModelRunner) -> None:
    seeded = SamplingParams(temperature=1.0, seed=5)
    first = runner.execute(SchedulerOutput([_chunk("s", [3, 4, 5], 0, [20], params=seeded)]))
    assert "s" in runner._generators
    # The generator carries on: the next step draws from its state, not from a fresh seed.
    gen_state = runner._generators["s"].get_state()
    out = runner.execute(SchedulerOutput([], finished_request_ids=["s", "never-seen"]))
    assert out.sampled == {} and out.prompt_logprobs == {}
    assert "s" not in runner._generators
    # Seeded again from scratch, the same request draws the same first token.
    again = runner.execute(SchedulerOutput([_chunk("s", [3, 4, 5], 0, [20], params=seeded)]))
    assert again.sampled["s"].token_id == first.sampled["s"].token_id
    assert torch.equal(runner._generators["s"].get_state(), gen_state)
    runner.execute(SchedulerOutput([], finished_request_ids=["s"]))
    # Greedy requests never get one.
    runner.execute(SchedulerOutput([_chunk("g", [3, 4], 0, [21], params=SamplingParams(temperature=0.0, seed=5))]))
    assert "g" not in runner._generators


def test_prompt_logprobs_span_each_chunk(runner: ModelRunner) -> None:
    """Chunk at positions p..q scores prompt tokens p+1..q+1, never past the prompt's last
    token; chunked, the values are those of the whole prompt in one chunk."""
    prompt = [5, 9, 14, 3, 27, 8]
    params = SamplingParams(temperature=0.0, prompt_logprobs=2)
    whole = runner.execute(SchedulerOutput([
        _chunk("w", prompt, 0, [22, 23], params=params, want_prompt_logprobs=True),
    ])).prompt_logprobs["w"]
    assert whole.start_index == 1 and len(whole.token_logprobs) == 5  # tokens 1..5
    head = runner.execute(SchedulerOutput([
        _chunk("c", prompt[:4], 0, [24, 25], sample=False, params=params, prompt=prompt, want_prompt_logprobs=True),
    ])).prompt_logprobs["c"]
    tail = runner.execute(SchedulerOutput([
        _chunk("c", prompt[4:], 4, [24, 25], params=params, prompt=prompt, want_prompt_logprobs=True),
    ])).prompt_logprobs["c"]
    assert (head.start_index, len(head.token_logprobs)) == (1, 4)  # positions 0..3 score tokens 1..4
    assert (tail.start_index, len(tail.token_logprobs)) == (5, 1)  # position 4 scores token 5; 5's logits give the first output
    torch.testing.assert_close(torch.tensor(head.token_logprobs + tail.token_logprobs),
                               torch.tensor(whole.token_logprobs), atol=1e-5, rtol=1e-5)
    for lp in (whole, head, tail):
        assert all(len(t) == 2 for t in lp.top_ids) and all(r >= 1 for r in lp.ranks)
        for tok_lp, rank, top_ids, top_lps in zip(lp.token_logprobs, lp.ranks, lp.top_ids, lp.top_logprobs,
                                                  strict=True):
            assert top_lps[0] >= top_lps[1] and tok_lp <= top_lps[0] + 1e-6
            if rank == 1:
                assert abs(tok_lp - top_lps[0]) < 1e-6
            assert all(0 <= t < runner.model.config.vocab_size for t in top_ids)
