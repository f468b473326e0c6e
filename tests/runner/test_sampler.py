"""Tests of the batch sampler: penalties, filters, the draw, seeded invariance, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from livelm.runner.sampling import Sampler, SamplingBatch
from livelm.runner.sampling.draw import _candidate_thresholds
from livelm.runner.sampling.filters import _active_top_k, _filter_threshold
from livelm.runner.sampling.logprobs import compute_logprobs
from livelm.runner.sampling.penalties import apply_penalties
from livelm.sampling_params import SamplingParams

NEG_INF = float("-inf")


def make_batch(
    params: list[SamplingParams],
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
    eos: list[set[int]] | None = None,
) -> SamplingBatch:
    """A SamplingBatch with empty histories, no generators and no eos unless given."""
    n = len(params)
    return SamplingBatch(
        params=params,
        prompt_token_ids=prompts if prompts is not None else [[] for _ in range(n)],
        output_token_ids=outputs if outputs is not None else [[] for _ in range(n)],
        generators=generators if generators is not None else [None] * n,
        eos_token_ids=eos if eos is not None else [set() for _ in range(n)],
    )


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of observed ``counts`` against probabilities ``probs``."""
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# Upper 0.1% points of the chi-square distribution, by degrees of freedom.
CHI2_999 = {2: 13.82, 4: 18.47, 5: 20.52, 7: 24.32, 999: 1143.0}


# ----------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_and_draws_nothing() -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 1000)
    gens = [seeded(i) for i in range(16)]
    gen_states = [g.get_state() for g in gens]
    default_state = torch.get_rng_state()
    before = logits.clone()
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0.0)] * 16, generators=gens))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.token_ids.dtype == torch.long
    assert out.logprobs is None and out.ranks is None and out.top_ids is None
    assert torch.equal(torch.get_rng_state(), default_state)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, gen_states, strict=True))
    assert torch.equal(logits, before)


def test_greedy_rows_in_mixed_batch_are_argmax_of_penalized_logits() -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, 50)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, top_p=0.8),
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
        SamplingParams(temperature=1.3, top_k=5, seed=3),
        SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5),
        SamplingParams(temperature=0.0, seed=7),  # seeded but greedy: no draw either
    ]
    outputs = [[1, 2], [3], [int(logits[2].argmax()), 4], [], [int(logits[4].argmax())] * 3, [9]]
    gens = [None, None, None, seeded(3), None, seeded(7)]
    batch = make_batch(params, prompts=[[0]] * 6, outputs=outputs, generators=gens)
    greedy_gen_state = gens[5].get_state()
    out = Sampler()(logits, batch)
    penalized = apply_penalties(logits, batch)
    for i in (0, 2, 4, 5):
        assert out.token_ids[i] == penalized[i].argmax()
    # The penalties really moved row 4 off its raw argmax.
    assert out.token_ids[4] != logits[4].argmax()
    assert torch.equal(gens[5].get_state(), greedy_gen_state)


def test_bf16_logits_and_empty_batch() -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, 300).to(torch.bfloat16)
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0.0)] * 4))
    assert torch.equal(out.token_ids, logits.float().argmax(dim=-1))
    out = Sampler()(
        logits, make_batch([SamplingParams(temperature=0.7, top_p=0.9, logprobs=2)] * 4)
    )
    assert out.token_ids.shape == (4,) and out.logprobs is not None
    empty = Sampler()(torch.empty(0, 300), make_batch([]))
    assert empty.token_ids.shape == (0,)


# -------------------------------------------------------------------------- penalties


def test_repetition_penalty_math() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0]])
    batch = make_batch(
        [SamplingParams(repetition_penalty=2.0)], prompts=[[0, 1, 1]], outputs=[[3, 5, 0]]
    )
    got = apply_penalties(logits, batch)
    # Seen tokens 0, 1, 3, 5: positive logits divided, negative multiplied, once each.
    assert torch.equal(got, torch.tensor([[1.0, -2.0, 0.5, -6.0, 1.0, 0.0]]))
    hf = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1, 1, 3, 5, 0]]), logits.clone())
    assert torch.equal(got, hf)
    # The caller's tensor is untouched.
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0]]))


def test_repetition_penalty_matches_hf_per_row() -> None:
    torch.manual_seed(3)
    logits = torch.randn(3, 40) * 3
    prompts = [[1, 5, 7, 39], [2, 2, 2], [0]]
    outputs = [[5, 8], [], [3, 3, 30]]
    pens = [1.3, 0.7, 1.0]
    batch = make_batch([SamplingParams(repetition_penalty=p) for p in pens], prompts, outputs)
    got = apply_penalties(logits, batch)
    for i in range(3):
        ids = torch.tensor([prompts[i] + outputs[i]])
        want = RepetitionPenaltyLogitsProcessor(pens[i])(ids, logits[i : i + 1].clone())
        assert torch.equal(got[i : i + 1], want)


def test_presence_and_frequency_penalties_math() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, -4.0, 5.0], [1.0, 2.0, 3.0, -4.0, 5.0]])
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(presence_penalty=-1.0),
    ]
    # Prompt tokens are not penalized (OpenAI semantics: output tokens only).
    batch = make_batch(params, prompts=[[0, 1], [0]], outputs=[[2, 2, 3, 2], [4, 4]])
    got = apply_penalties(logits, batch)
    want = torch.tensor(
        [
            [1.0, 2.0, 3.0 - 0.5 - 0.25 * 3, -4.0 - 0.5 - 0.25, 5.0],
            [1.0, 2.0, 3.0, -4.0, 5.0 + 1.0],
        ]
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_penalty_order_repetition_then_presence_frequency() -> None:
    logits = torch.tensor([[4.0, -2.0, 1.0]])
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5)]
    batch = make_batch(params, prompts=[[2]], outputs=[[0, 0, 1]])
    got = apply_penalties(logits, batch)
    # token 0: 4/2 - (1 + 0.5*2) = 0; token 1: -2*2 - (1 + 0.5) = -5.5; token 2: 1/2 (prompt only)
    assert torch.equal(got, torch.tensor([[0.0, -5.5, 0.5]]))


def test_penalties_ignore_out_of_vocab_ids() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, min_tokens=3)]
    batch = make_batch(params, prompts=[[7]], outputs=[[1, 9]], eos=[{2, 50}])
    got = apply_penalties(logits, batch)
    assert torch.equal(got, torch.tensor([[1.0, 0.0, NEG_INF]]))


def test_no_penalties_returns_logits_unchanged() -> None:
    logits = torch.randn(2, 10)
    batch = make_batch([SamplingParams(min_tokens=1)] * 2, outputs=[[1], [2, 3]], eos=[{0}, {0}])
    assert apply_penalties(logits, batch) is logits


# ------------------------------------------------------------------------- min_tokens


def test_min_tokens_suppresses_eos_and_stop_ids() -> None:
    logits = torch.zeros(3, 10)
    logits[:, 0] = 10.0  # eos
    logits[:, 5] = 9.0  # a stop token id
    logits[:, 7] = 8.0
    params = [
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5]),
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5]),  # reached min_tokens
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5], ignore_eos=True),
    ]
    # The runner passes no eos ids for ignore_eos requests.
    batch = make_batch(params, outputs=[[1, 2], [1, 2, 3], [1]], eos=[{0}, {0}, set()])
    out = Sampler()(logits, batch)
    assert out.token_ids.tolist() == [7, 0, 0]
    penalized = apply_penalties(logits, batch)
    assert penalized[0, 0] == NEG_INF and penalized[0, 5] == NEG_INF
    assert penalized[2, 0] == 10.0 and penalized[2, 5] == NEG_INF


def test_min_tokens_never_samples_suppressed_ids() -> None:
    torch.manual_seed(4)
    logits = torch.randn(1, 6).repeat(500, 1)
    logits[:, 2] = 5.0
    params = [SamplingParams(temperature=1.5, min_tokens=2, stop_token_ids=[4])] * 500
    out = Sampler()(logits, make_batch(params, outputs=[[1]] * 500, eos=[{2}] * 500))
    assert not torch.isin(out.token_ids, torch.tensor([2, 4])).any()
    assert len(set(out.token_ids.tolist())) == 4


# ---------------------------------------------------------------------------- filters


def test_top_k_1_equals_greedy() -> None:
    torch.manual_seed(5)
    logits = torch.randn(64, 500) * 2
    params = [SamplingParams(temperature=1.0 + i / 10, top_k=1) for i in range(64)]
    out = Sampler()(logits, make_batch(params))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_tiny_top_p_keeps_only_top_token() -> None:
    torch.manual_seed(6)
    logits = torch.randn(64, 2000)
    params = [SamplingParams(temperature=2.0, top_p=1e-6)] * 32
    params += [SamplingParams(temperature=2.0, top_p=1e-6, top_k=100)] * 32
    out = Sampler()(logits, make_batch(params))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_min_p_filters_and_renormalizes() -> None:
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log().repeat(4000, 1)
    # threshold 0.15 * 0.5 = 0.075: tokens 0, 1, 2 stay, renormalized.
    torch.manual_seed(7)
    out = Sampler()(logits, make_batch([SamplingParams(min_p=0.15)] * 4000))
    counts = torch.bincount(out.token_ids, minlength=5).double()
    assert counts[3] == 0 and counts[4] == 0
    assert chi_square(counts[:3], probs[:3].double() / 0.9) < CHI2_999[2]


def hf_filtered(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Reference: Hugging Face warpers in their generate() order."""
    x = logits.unsqueeze(0) / p.temperature
    ids = torch.zeros(1, 1, dtype=torch.long)
    if p.top_k:
        x = TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(ids, x)
    if p.min_p > 0.0:
        x = MinPLogitsWarper(p.min_p)(ids, x)
    return x.squeeze(0)


@pytest.mark.parametrize("vocab", [7, 1000, 49152])
@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0, 12.0])
def test_filters_keep_the_same_tokens_as_hf(vocab: int, scale: float) -> None:
    gen = seeded(vocab + int(scale * 10))
    logits = torch.randn(12, vocab, generator=gen) * scale
    logits[3, : vocab // 2] = NEG_INF  # suppressed tokens in one row
    params = [
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=1.3, top_p=0.99),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=0.5, top_k=5),
        SamplingParams(temperature=1.0, top_k=3, top_p=0.7),
        SamplingParams(temperature=1.0, top_k=200, top_p=0.95),
        SamplingParams(temperature=0.9, min_p=0.1),
        SamplingParams(temperature=1.0, top_p=0.9, min_p=0.2),
        SamplingParams(temperature=1.0, top_k=40, min_p=0.05),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_p=0.999999),
    ]
    scaled = logits / torch.tensor([p.temperature for p in params]).unsqueeze(1)
    threshold = _filter_threshold(scaled, params)
    assert threshold is not None
    kept = scaled >= threshold
    for i, p in enumerate(params):
        want = hf_filtered(logits[i], p) > NEG_INF
        assert torch.equal(kept[i] & (logits[i] > NEG_INF), want), (i, p)
    # The candidate path (top-k rows, and top-p rows whose nucleus is among the top 64)
    # must agree wherever it claims the kept set fits among its candidates.
    rows = [i for i, p in enumerate(params) if p.top_k or p.top_p < 1.0]
    sub = [params[i] for i in rows]
    cand_threshold, fits, _, _ = _candidate_thresholds(
        scaled[rows], torch.softmax(scaled[rows], dim=-1), sub, _active_top_k(sub, vocab)
    )
    for j, i in enumerate(rows):
        if fits[j]:
            want = hf_filtered(logits[i], params[i]) > NEG_INF
            got = (scaled[i] >= cand_threshold[j]) & (logits[i] > NEG_INF)
            assert torch.equal(got, want), (i, params[i])


def test_no_filter_means_no_threshold() -> None:
    s = torch.randn(3, 20)
    params = [SamplingParams(top_k=0, top_p=1.0, min_p=0.0), SamplingParams(top_k=20)]
    assert _filter_threshold(s[:2], params) is None


def test_temperature_sampling_matches_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5])
    for temp in (0.5, 1.0, 2.0):
        torch.manual_seed(8)  # fixed draw: the test cannot flake
        rows = 20000
        out = Sampler()(
            logits.repeat(rows, 1), make_batch([SamplingParams(temperature=temp)] * rows)
        )
        counts = torch.bincount(out.token_ids, minlength=8).double()
        probs = torch.softmax(logits.double() / temp, dim=-1)
        assert chi_square(counts, probs) < CHI2_999[7], temp


def test_top_p_sampling_matches_renormalized_nucleus() -> None:
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    # p = 0.75: mass above token 2 is 0.65 < 0.75 (kept), above token 3 is 0.8 (dropped).
    torch.manual_seed(9)
    rows = 20000
    out = Sampler()(probs.log().repeat(rows, 1), make_batch([SamplingParams(top_p=0.75)] * rows))
    counts = torch.bincount(out.token_ids, minlength=6).double()
    assert counts[3:].sum() == 0
    assert chi_square(counts[:3], probs[:3].double() / 0.8) < CHI2_999[2]


def test_ties_at_the_top_k_edge_are_all_kept() -> None:
    # Hugging Face's top-k keeps every token tied with the k-th; so do we (and the draw
    # then goes over the whole row, since the candidates topk returned do not hold them all).
    logits = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 2.0]).repeat(3000, 1)
    torch.manual_seed(14)
    out = Sampler()(logits, make_batch([SamplingParams(top_k=2)] * 3000))
    counts = torch.bincount(out.token_ids, minlength=6).double()
    assert counts[4] == 0
    probs = torch.softmax(torch.tensor([3.0, 2.0, 2.0, 2.0, 2.0]).double(), dim=-1)
    assert chi_square(counts[[0, 1, 2, 3, 5]], probs) < CHI2_999[4]


def test_draw_over_a_large_vocabulary_matches_the_distribution() -> None:
    # V = 1000: the whole-row draw goes chunk by chunk (256 tokens, the last chunk padded);
    # mass sits on chunk edges and at the very end.
    vocab, rows = 1000, 20000
    allowed = torch.tensor([0, 255, 256, 511, 600, 999])
    probs = torch.tensor([0.1, 0.2, 0.15, 0.25, 0.1, 0.2])
    logits = torch.full((vocab,), NEG_INF)
    logits[allowed] = probs.log()
    torch.manual_seed(15)
    out = Sampler()(logits.repeat(rows, 1), make_batch([SamplingParams()] * rows))
    counts = torch.bincount(out.token_ids, minlength=vocab).double()
    assert counts.sum() == counts[allowed].sum()
    assert chi_square(counts[allowed], probs.double()) < CHI2_999[5]
    # And a dense random distribution over all 1000 tokens.
    gen = seeded(16)
    logits = torch.randn(vocab, generator=gen) * 0.5
    torch.manual_seed(17)
    out = Sampler()(logits.repeat(rows, 1), make_batch([SamplingParams()] * rows))
    counts = torch.bincount(out.token_ids, minlength=vocab).double()
    assert chi_square(counts, torch.softmax(logits.double(), dim=-1)) < CHI2_999[999]


@pytest.mark.parametrize("token", [0, 255, 256, 511, 767, 998, 999])
def test_draw_never_picks_a_token_without_mass(token: int) -> None:
    logits = torch.full((64, 1000), NEG_INF)
    logits[:, token] = 0.0
    logits[::2, (token + 300) % 1000] = -1e-3  # a second token in half the rows
    params = [SamplingParams(temperature=1.0 + i / 64, seed=i) for i in range(64)]
    gens = [seeded(i) for i in range(64)]
    for _ in range(20):
        out = Sampler()(logits, make_batch(params, generators=gens))
        assert (logits.gather(1, out.token_ids.unsqueeze(1)) > NEG_INF).all()


def test_sampling_leaves_the_callers_logits_alone() -> None:
    torch.manual_seed(18)
    logits = torch.randn(6, 800)
    before = logits.clone()
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.5, top_p=0.9),
        SamplingParams(top_k=10, min_p=0.1),
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=1.2, min_tokens=2),
        SamplingParams(frequency_penalty=1.0, logprobs=3),
    ]
    Sampler()(logits, make_batch(params, prompts=[[1, 2]] * 6, outputs=[[3]] * 6, eos=[{0}] * 6))
    assert torch.equal(logits, before)


# ------------------------------------------------------------------ seeded invariance


TARGETS = [
    SamplingParams(temperature=0.8, seed=1234),
    SamplingParams(temperature=1.1, top_p=0.9, seed=1234),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.95, seed=1234),
    SamplingParams(temperature=1.0, min_p=0.05, repetition_penalty=1.2, seed=1234),
]


@pytest.mark.parametrize("target", TARGETS, ids=lambda p: f"T{p.temperature}")
def test_seeded_row_does_not_depend_on_the_batch(target: SamplingParams) -> None:
    vocab, steps = 2048, 24
    data = seeded(99)
    others = []
    for j in range(32):
        kind = j % 8
        others.append(
            [
                SamplingParams(temperature=0.0),
                SamplingParams(temperature=0.6, top_k=50, seed=j),
                SamplingParams(temperature=1.0, top_p=0.8),
                SamplingParams(temperature=1.5, seed=j),
                SamplingParams(temperature=0.9, min_p=0.1, presence_penalty=0.5),
                SamplingParams(temperature=1.2, top_k=5),
                SamplingParams(temperature=0.5, top_k=1000, top_p=0.7, seed=j),
                SamplingParams(temperature=1.0, repetition_penalty=1.3, logprobs=3),
            ][kind]
        )
    alone_gen, batch_gen = seeded(target.seed), seeded(target.seed)
    other_gens = [seeded(j) if p.seed is not None else None for j, p in enumerate(others)]
    sampler = Sampler()
    alone_out: list[int] = []
    batch_out: list[int] = []
    other_outs: list[list[int]] = [[] for _ in others]
    position = 17
    for step in range(steps):
        # Peaked and flat steps (a top-p nucleus within the top candidates or not), and
        # integer logits, whose ties at the k-th place send top-k rows down the whole-row
        # path: the target goes every way, alone and in the batch.
        target_logits = torch.randn(1, vocab, generator=data) * (8 if step % 2 else 3)
        if step % 3 == 0:
            target_logits = target_logits.round()
        other_logits = torch.randn(32, vocab, generator=data) * 3
        other_logits[5::8] = other_logits[5::8].round()
        prompt = [5, 6, 7]
        tok = sampler(
            target_logits, make_batch([target], [prompt], [list(alone_out)], [alone_gen])
        ).token_ids
        alone_out.append(int(tok))

        logits = torch.cat([other_logits[:position], target_logits, other_logits[position:]])
        params = others[:position] + [target] + others[position:]
        gens = other_gens[:position] + [batch_gen] + other_gens[position:]
        outs = other_outs[:position] + [list(batch_out)] + other_outs[position:]
        res = sampler(logits, make_batch(params, [prompt] * 33, outs, gens)).token_ids.tolist()
        batch_out.append(res[position])
        for j, t in enumerate(res[:position] + res[position + 1 :]):
            other_outs[j].append(t)
    assert alone_out == batch_out
    assert len(set(alone_out)) > 5  # it really sampled


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    torch.manual_seed(10)
    logits = torch.randn(1, 5000)
    p = SamplingParams(temperature=1.0, seed=5)

    def run(seed: int) -> list[int]:
        g = seeded(seed)
        return [
            int(Sampler()(logits, make_batch([p], generators=[g])).token_ids) for _ in range(20)
        ]

    assert run(5) == run(5)
    assert run(5) != run(6)


# -------------------------------------------------------------------------- logprobs


def check_logprobs(logits: torch.Tensor, out, rows: list[int], ks: list[int]) -> None:
    """Check ``rows`` of ``out`` (which asked for ``ks`` alternatives) against the raw logits."""
    ref = torch.log_softmax(logits.float(), dim=-1)
    num_top = max(ks)
    for i, k in zip(rows, ks, strict=True):
        tok = int(out.token_ids[i])
        assert abs(float(out.logprobs[i]) - float(ref[i, tok])) <= 1e-6
        order = torch.argsort(logits[i], descending=True, stable=True)
        assert int(out.ranks[i]) == int((order == tok).nonzero()) + 1
        if num_top:
            assert out.top_ids.shape[1] == num_top
            assert out.top_ids[i, :k].tolist() == order[:k].tolist()
            torch.testing.assert_close(
                out.top_logprobs[i, :k], ref[i, order[:k]], rtol=0, atol=1e-6
            )


def test_logprobs_of_raw_logits_for_all_rows() -> None:
    torch.manual_seed(11)
    logits = torch.randn(8, 700) * 2
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.7, top_p=0.5, logprobs=0),
        SamplingParams(temperature=2.0, logprobs=5, repetition_penalty=1.5),
        SamplingParams(temperature=1.0, top_k=10, logprobs=1, seed=1),
    ] * 2
    gens = [seeded(i) if p.seed is not None else None for i, p in enumerate(params)]
    batch = make_batch(params, prompts=[[1, 2, 3]] * 8, outputs=[[4, 5]] * 8, generators=gens)
    out = Sampler()(logits, batch)
    check_logprobs(logits, out, list(range(8)), [p.logprobs for p in params])
    # Sampled rows with temperature 2 are likely not the argmax: ranks are more than 1.
    assert out.ranks.dtype == torch.long and out.logprobs.dtype == torch.float32


def test_logprobs_mixed_rows_only_some_ask() -> None:
    torch.manual_seed(12)
    logits = torch.randn(6, 300)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, logprobs=2),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, logprobs=4),
        SamplingParams(temperature=0.5, top_k=7),
        SamplingParams(temperature=0.0, logprobs=0),
    ]
    out = Sampler()(logits, make_batch(params))
    check_logprobs(logits, out, [1, 3, 5], [2, 4, 0])
    assert out.top_ids.shape == (6, 4)
    for i in (0, 2, 4):  # filler for rows that did not ask
        assert math.isnan(float(out.logprobs[i])) and int(out.ranks[i]) == 0
        assert (out.top_ids[i] == -1).all()


def test_logprobs_zero_gives_no_top_alternatives() -> None:
    torch.manual_seed(13)
    logits = torch.randn(3, 100)
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0.0, logprobs=0)] * 3))
    assert out.top_ids is None and out.top_logprobs is None
    check_logprobs(logits, out, [0, 1, 2], [0, 0, 0])
    assert out.ranks.tolist() == [1, 1, 1]


def test_compute_logprobs_ranks_count_ties_as_best() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    lp, ranks, top_lp, top_ids = compute_logprobs(logits, torch.tensor([2]), 2)
    assert ranks.tolist() == [1]
    assert top_ids is not None and set(top_ids[0].tolist()) == {1, 2}
    _, ranks, _, _ = compute_logprobs(logits, torch.tensor([3]), 0)
    assert ranks.tolist() == [4]
