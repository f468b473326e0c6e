"""The grammar backend, the per-step bitmask and its application in the sampler (issue 15).

A real (tiny, trained at test time) byte-level BPE tokenizer; no model for most tests.
"""

from __future__ import annotations

import threading

import pytest
import torch

from livelm.core.scheduler_output import ScheduledChunk
from livelm.engine.tokenizer import load_tokenizer
from livelm.runner.sampling import Sampler, SamplingBatch
from livelm.runner.sampling.token_mask import TokenMask, allowed_tokens, apply_token_mask
from livelm.runner.structured import GrammarBackend, StructuredDecoding
from livelm.runner.structured.grammars import choice_regex
from livelm.runner.structured.matcher import ConstraintViolation, SequenceMatcher
from livelm.sampling_params import SamplingParams
from livelm.structured_output import StructuredOutput

MODEL_VOCAB = 416  # the tiny models' rows: 16 more than the tokenizer's 400 ids
EOS = 2  # <|im_end|>, the tokenizer's eos
OTHER_EOS = 1  # a second engine EOS id (<|im_start|>), as models with several have


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return load_tokenizer(llama_dir)


@pytest.fixture(scope="module")
def backend(tokenizer):
    return GrammarBackend(tokenizer, MODEL_VOCAB, frozenset({EOS, OTHER_EOS}))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _allowed(mask_row: torch.Tensor) -> set[int]:
    return set(allowed_tokens(mask_row.unsqueeze(0), MODEL_VOCAB)[0].nonzero().flatten().tolist())


def _chunk(rid: str, structured, output: list[int]) -> ScheduledChunk:
    params = SamplingParams(temperature=0, max_tokens=100, structured=structured)
    return ScheduledChunk(rid, [5], 3 + len(output), [0], True, params, [3, 4, 5], output)


# ------------------------------------------------------------------------- compile


def test_compile_is_cached_by_kind_and_spec(tokenizer):
    backend = GrammarBackend(tokenizer, MODEL_VOCAB, frozenset({EOS}), cache_size=2)
    a = backend.compile(StructuredOutput(regex="a+"))
    assert backend.compile(StructuredOutput(regex="a+")) is a and backend.num_compiled == 1
    # The same text as another kind is another grammar.
    backend.compile(StructuredOutput(grammar='start: "a"+'))
    assert backend.num_compiled == 2
    backend.compile(StructuredOutput(choice=("a",)))  # evicts the least recently used
    assert not backend.cached(StructuredOutput(regex="a+"))
    assert backend.compile(StructuredOutput(regex="a+")) is not a and backend.num_compiled == 4


@pytest.mark.parametrize("structured, message", [
    (StructuredOutput(json={"type": "object", "properties": {"a": {"type": 7}}}), "invalid JSON schema"),
    (StructuredOutput(json={"type": "string", "minLength": 5, "maxLength": 2}), "invalid JSON schema"),
    (StructuredOutput(regex="[z-a]"), "invalid regex"),
    (StructuredOutput(regex="a{3,1}"), "invalid regex"),
    (StructuredOutput(grammar="start: missing"), "invalid grammar"),
    (StructuredOutput(grammar="this is not a grammar"), "invalid grammar"),
])
def test_invalid_constraints_raise_with_the_library_message(backend, structured, message):
    with pytest.raises(ValueError, match=message) as first:
        backend.compile(structured)
    assert len(str(first.value)) > len(message) + 2  # llguidance's reason follows
    compiled = backend.num_compiled
    with pytest.raises(ValueError, match=message):  # refused again, from the cache
        backend.compile(structured)
    assert backend.num_compiled == compiled


def test_compile_from_many_threads(tokenizer):
    backend = GrammarBackend(tokenizer, MODEL_VOCAB, frozenset({EOS}))
    specs = [StructuredOutput(regex=f"x{{{i}}}") for i in range(1, 9)]
    results: dict[int, object] = {}

    def work(i: int) -> None:
        results[i] = backend.compile(specs[i % len(specs)])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 32
    for i, compiled in results.items():
        assert compiled.spec == specs[i % len(specs)].spec


def test_choice_regex_escapes_everything_but_letters_and_digits():
    assert choice_regex(("ab1", "a.b")) == r"(?:ab1)|(?:a\x{2e}b)"


def test_gbnf_grammar_is_accepted(backend, tokenizer):
    gbnf = 'root ::= "yes" | "no"'
    try:
        compiled = backend.compile(StructuredOutput(grammar=gbnf))
    except ValueError as e:
        pytest.skip(f"this llguidance has no GBNF converter: {e}")
    m = SequenceMatcher(compiled)
    m.sync(_ids(tokenizer, "yes"))
    assert m.matcher.is_accepting()


# ---------------------------------------------------------------------- matchers


def test_matcher_refuses_tokens_outside_its_grammar(backend, tokenizer):
    m = SequenceMatcher(backend.compile(StructuredOutput(regex="[0-9]+")))
    m.sync(_ids(tokenizer, "12"))
    with pytest.raises(ConstraintViolation):
        m.sync(_ids(tokenizer, "12") + _ids(tokenizer, "x"))


def test_matcher_replays_when_the_whole_output_changes(backend, tokenizer):
    m = SequenceMatcher(backend.compile(StructuredOutput(choice=("cat", "dog"))))
    m.sync(_ids(tokenizer, "ca"))
    m.sync(_ids(tokenizer, "dog"))
    assert m.consumed == _ids(tokenizer, "dog") and m.matcher.is_accepting()
    m.sync([])
    assert m.consumed == [] and not m.matcher.is_accepting()


# --------------------------------------------------------------------- step masks


def _fill(decoding: StructuredDecoding, chunks):
    job = decoding.start(chunks)
    assert job is not None
    return job.result()


def test_step_masks_allow_exactly_the_grammar_and_every_eos(backend, tokenizer):
    decoding = StructuredDecoding(backend)
    digits = StructuredOutput(regex="[0-9]{1,3}")
    free = ScheduledChunk("free", [5], 3, [0], True, SamplingParams(), [3, 4, 5], [])
    chunks = [_chunk("a", digits, []), free, _chunk("b", digits, _ids(tokenizer, "123"))]
    masks = _fill(decoding, chunks)
    assert set(masks.row_of) == {"a", "b"} and not masks.errors
    vocab = {i: tokenizer.decode([i]) for i in range(len(tokenizer))}
    start = _allowed(masks.bitmask[masks.row_of["a"]])
    assert start and all(vocab[t].isdigit() and len(vocab[t]) <= 3 for t in start)
    assert EOS not in start and OTHER_EOS not in start
    # Three digits: the grammar is complete and nothing may follow, so only the EOS ids.
    assert _allowed(masks.bitmask[masks.row_of["b"]]) == {EOS, OTHER_EOS}
    # Padded model rows (ids 400..415) are never allowed.
    assert not any(t >= len(tokenizer) for t in start)
    assert decoding.num_matchers == 2
    decoding.drop(["a", "b"])
    assert decoding.num_matchers == 0


def test_step_masks_report_a_failing_sequence_only(backend, tokenizer):
    decoding = StructuredDecoding(backend)
    digits = StructuredOutput(regex="[0-9]+")
    masks = _fill(decoding, [_chunk("ok", digits, _ids(tokenizer, "4")), _chunk("bad", digits, _ids(tokenizer, "x"))])
    assert set(masks.row_of) == {"ok"} and isinstance(masks.errors["bad"], ConstraintViolation)


def test_no_job_without_constrained_chunks(backend):
    free = ScheduledChunk("free", [5], 3, [0], True, SamplingParams(), [3, 4, 5], [])
    assert StructuredDecoding(backend).start([free]) is None


# ------------------------------------------------------------------- the sampler


def _mask_of(rows_allowed: list[set[int]], vocab: int) -> torch.Tensor:
    words = (vocab + 31) // 32
    bits = torch.zeros(len(rows_allowed), words, dtype=torch.int32)
    for r, allowed in enumerate(rows_allowed):
        for t in allowed:
            w, b = divmod(t, 32)
            bits[r, w] |= (1 << b) if b < 31 else -(1 << 31)
    return bits


def test_apply_token_mask_copies_and_masks_only_constrained_rows():
    torch.manual_seed(0)
    logits = torch.randn(3, 70)
    before = logits.clone()
    allowed = {0, 31, 32, 63}
    # Width 2 words = 64 ids: ids 64..69 lie past the bitmask and are always masked.
    bits = _mask_of([allowed], 64)
    x = apply_token_mask(logits, TokenMask([1], bits))
    assert torch.equal(logits, before)  # the caller's tensor is untouched
    assert torch.equal(x[0], logits[0]) and torch.equal(x[2], logits[2])
    finite = set(torch.isfinite(x[1]).nonzero().flatten().tolist())
    assert finite == {0, 31, 32, 63}
    assert torch.equal(x[1, [0, 31, 32, 63]], logits[1, [0, 31, 32, 63]])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.8, seed=3),
    SamplingParams(temperature=1.0, top_k=3, seed=4),
    SamplingParams(temperature=1.0, top_p=0.9, seed=5, repetition_penalty=1.2),
])
def test_sampler_draws_only_allowed_tokens_and_keeps_raw_logprobs(params):
    torch.manual_seed(1)
    vocab = 300
    logits = torch.randn(4, vocab) * 3
    allowed = [{7, 200, 299}, {150}]
    mask = TokenMask([0, 2], _mask_of(allowed, vocab))
    p = SamplingParams(**{**{f: getattr(params, f) for f in ("temperature", "top_k", "top_p", "seed",
                                                               "repetition_penalty")}, "logprobs": 1})

    def batch(token_mask):
        gens = [None if p.seed is None else torch.Generator().manual_seed(p.seed + i) for i in range(4)]
        return SamplingBatch([p] * 4, [[1, 2]] * 4, [[7]] * 4, gens, [{EOS}] * 4, token_mask)

    raw = logits.clone()
    out = Sampler()(logits, batch(mask))
    free = Sampler()(logits, batch(None))
    assert torch.equal(logits, raw)
    tokens = out.token_ids.tolist()
    assert tokens[0] in allowed[0] and tokens[2] == 150
    # Unconstrained rows: the tokens of the same batch without any constraint.
    assert tokens[1] == free.token_ids[1].item() and tokens[3] == free.token_ids[3].item()
    # Logprobs are those of the raw distribution at the drawn token.
    raw_lp = torch.log_softmax(logits, dim=-1)
    for r in range(4):
        assert out.logprobs[r].item() == pytest.approx(raw_lp[r, tokens[r]].item(), abs=1e-5)
