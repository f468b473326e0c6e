"""Structured output end to end (issue 15): constrained requests of a tiny random model.

Under temperature > 0 and several seeds every kind's output parses and validates; the
constraints whose outputs must close within max_tokens must finish "stop". A batch that
mixes constrained and free requests (n > 1 too) decodes each correctly, the free ones
token-identical to a run without the constrained ones. Preemption with recompute and
prefix-cache hits in the middle of constrained requests keep them valid. A bad
constraint is a ValueError at add time and leaves the engine serving; a request that
hits max_tokens before its structure closes finishes "length".
"""

from __future__ import annotations

import asyncio
import json
import re
import threading

import pytest

from livelm import SamplingParams, StructuredOutput
from livelm.engine.async_engine import AsyncEngine
from livelm.engine.llm import LLM
from livelm.runner.structured.matcher import SequenceMatcher

try:
    import jsonschema
except ImportError:  # checked by hand below
    jsonschema = None

SEEDS = [0, 1, 2, 3]
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [40, 41, 42, 43]]

# Every string, number and list is bounded, so the output closes within MAX_TOKENS even
# when each character is its own token (or an escape sequence).
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "verified": {"type": "boolean"},
            },
            "required": ["zip", "verified"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}
MAX_TOKENS = 400
REGEX = r"[a-z]{1,5}@[a-z]{2,4}\.(com|org)"
CHOICES = ("yes", "no", "maybe so", 'say "hi"', "naïve café", "a\\b")
GRAMMAR = """
start: greeting " " name "!" (" " mood)?
greeting: "hello" | "hi" | "hey"
name: /[A-Z][a-z]{1,6}/
mood: "(" ("happy" | "sad") ")"
"""
GRAMMAR_RE = r"(hello|hi|hey) [A-Z][a-z]{1,6}!( \((happy|sad)\))?"


def _check_schema(value) -> None:
    if jsonschema is not None:
        jsonschema.validate(value, SCHEMA)
        return
    assert set(value) == set(SCHEMA["required"])
    assert isinstance(value["name"], str) and len(value["name"]) <= 6
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 120
    assert value["color"] in ("red", "green", "blue")
    assert len(value["tags"]) <= 3 and all(isinstance(t, str) and len(t) <= 3 for t in value["tags"])
    assert set(value["address"]) == {"zip", "verified"} and re.fullmatch(r"[0-9]{5}", value["address"]["zip"])
    assert isinstance(value["address"]["verified"], bool)


def _sampled(structured, seed: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=kw.pop("max_tokens", MAX_TOKENS),
                          structured=structured, **kw)


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir))


def _run(llm: LLM, params: list[SamplingParams], prompts=None):
    prompts = prompts or [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    return [o.outputs for o in llm.generate(prompts, params, use_tqdm=False)]


# ------------------------------------------------------------------------ each kind


def test_json_schema_outputs_validate(llm):
    outs = _run(llm, [_sampled(StructuredOutput(json=SCHEMA), s) for s in SEEDS])
    texts = set()
    for (out,) in outs:
        assert out.finish_reason == "stop", out.text
        value = json.loads(out.text)
        _check_schema(value)
        # One line, one space after each separator: the documented whitespace.
        assert out.text == json.dumps(value, ensure_ascii=False) or "\\" in out.text
        texts.add(out.text)
    assert len(texts) > 1  # the seeds really sample


def test_schema_shorthand_dict_and_pydantic(llm):
    pydantic = pytest.importorskip("pydantic")

    class Point(pydantic.BaseModel):
        x: int
        flag: bool

    for structured in (SCHEMA, Point):
        params = SamplingParams(temperature=0.8, seed=3, max_tokens=MAX_TOKENS, structured=structured)
        (out,), = _run(llm, [params])
        value = json.loads(out.text)
        if structured is Point:
            Point.model_validate(value)
        else:
            _check_schema(value)


def test_json_object_outputs_parse(llm):
    # Any JSON object is unbounded: the outputs that close must parse as objects, and
    # those that do not must have run out of tokens.
    outs = _run(llm, [_sampled(StructuredOutput(json_object=True), s, max_tokens=600) for s in SEEDS])
    closed = 0
    for (out,) in outs:
        assert out.text.startswith("{")
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
            closed += 1
        else:
            assert out.finish_reason == "length" and len(out.token_ids) == 600
    assert closed >= len(SEEDS) // 2


def test_regex_outputs_match(llm):
    outs = _run(llm, [_sampled(StructuredOutput(regex=REGEX), s) for s in SEEDS])
    for (out,) in outs:
        assert out.finish_reason == "stop" and re.fullmatch(REGEX, out.text), out.text


def test_choice_outputs_are_one_of_them(llm):
    outs = _run(llm, [_sampled(StructuredOutput(choice=CHOICES), s) for s in SEEDS])
    for (out,) in outs:
        assert out.finish_reason == "stop" and out.text in CHOICES, out.text
    greedy = SamplingParams(temperature=0, max_tokens=50, structured=StructuredOutput(choice=CHOICES))
    (out,), = _run(llm, [greedy])
    assert out.text in CHOICES


def test_lark_grammar_outputs_match(llm):
    outs = _run(llm, [_sampled(StructuredOutput(grammar=GRAMMAR), s) for s in SEEDS])
    for (out,) in outs:
        assert out.finish_reason == "stop" and re.fullmatch(GRAMMAR_RE, out.text), out.text


def test_sampling_options_with_constraints(llm):
    # top-k, top-p, min-p, penalties, greedy and logprobs all sample inside the mask.
    variants = [
        dict(top_k=5), dict(top_p=0.5), dict(min_p=0.2), dict(repetition_penalty=1.3),
        dict(presence_penalty=1.0, frequency_penalty=0.5), dict(logprobs=3),
    ]
    params = [_sampled(StructuredOutput(json=SCHEMA), i, **v) for i, v in enumerate(variants)]
    params.append(SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured=StructuredOutput(json=SCHEMA)))
    for (out,) in _run(llm, params):
        if out.finish_reason == "stop":
            _check_schema(json.loads(out.text))
        else:  # greedy on a random model may repeat itself inside a string until the bound
            assert out.finish_reason == "length"
    (out,), = _run(llm, [params[5]])
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)


# ---------------------------------------------------------------- batches and n > 1


def test_mixed_batch_free_requests_token_identical(llm):
    free = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.9, top_k=40, seed=11, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=12, max_tokens=20, logprobs=2),
    ]
    alone = [o[0] for o in _run(llm, free, PROMPTS[:3])]
    constrained = [
        _sampled(StructuredOutput(json=SCHEMA), 7),
        _sampled(StructuredOutput(regex=REGEX), 8, n=3),
        SamplingParams(temperature=0, max_tokens=50, structured=StructuredOutput(choice=CHOICES)),
    ]
    params = [free[0], constrained[0], free[1], constrained[1], free[2], constrained[2]]
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    outs = _run(llm, params, prompts)
    for got, want in zip([outs[0][0], outs[2][0], outs[4][0]], alone, strict=True):
        assert got.token_ids == want.token_ids
        if want.logprobs is not None:
            for g, w in zip(got.logprobs, want.logprobs, strict=True):
                assert g.keys() == w.keys()
                assert [x.logprob for x in g.values()] == pytest.approx([x.logprob for x in w.values()], abs=1e-4)
    _check_schema(json.loads(outs[1][0].text))
    assert len(outs[3]) == 3 and all(re.fullmatch(REGEX, o.text) for o in outs[3])
    assert outs[5][0].text in CHOICES


def test_n_sequences_each_follow_the_constraint(llm):
    (outs,) = _run(llm, [_sampled(StructuredOutput(json=SCHEMA), 21, n=4)])
    assert len(outs) == 4
    for out in outs:
        _check_schema(json.loads(out.text))
    assert len({o.text for o in outs}) > 1
    # The runner drops finished sequences' matchers at its next step.
    _run(llm, [SamplingParams(max_tokens=2)])
    assert llm.engine.runner.structured.num_matchers == 0


# ------------------------------------------------- preemption and the prefix cache


def test_preemption_and_prefix_hits_keep_outputs_valid(llama_dir):
    # 6 blocks of 16 tokens; 31-token prompts fill 2 blocks each with their first token, so
    # three run at once and the next token of each needs a block no one has: running
    # requests are preempted and recomputed, finding their own blocks in the prefix cache.
    llm = LLM(str(llama_dir), num_kv_blocks=6, max_num_batched_tokens=32, enable_prefix_caching=True)
    kinds = [StructuredOutput(regex=REGEX), StructuredOutput(grammar=GRAMMAR), StructuredOutput(choice=CHOICES)]
    params = [_sampled(kinds[i % 3], 30 + i, max_tokens=36) for i in range(6)]
    prompts = [list(range(3 + i, 34 + i)) for i in range(6)]
    outs = [o[0] for o in _run(llm, params, prompts)]
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_tokens > 0
    for i, out in enumerate(outs):
        assert out.finish_reason == "stop", out.text
        pattern = (REGEX, GRAMMAR_RE)[i % 3] if i % 3 < 2 else None
        assert re.fullmatch(pattern, out.text) if pattern else out.text in CHOICES


def test_matcher_follows_tokens_that_shrink_and_regrow(llm):
    backend = llm.engine.structured
    compiled = backend.compile(StructuredOutput(regex="(ab|ac)d"))
    tok = llm.tokenizer
    ab, ac, d = (tok.convert_tokens_to_ids(list(s)) for s in ("ab", "ac", "d"))
    m = SequenceMatcher(compiled)
    m.sync(ab)
    m.sync(ab + d)
    assert m.matcher.is_accepting()
    m.sync(ac[:1])  # rolled back to "a"
    assert m.consumed == ac[:1] and not m.matcher.is_accepting()
    m.sync(ac + d)
    assert m.consumed == ac + d and m.matcher.is_accepting()


# ------------------------------------------------------------------ bad constraints


BAD = {
    "schema": StructuredOutput(json={"type": "object", "properties": {"a": {"type": "no-such-type"}}}),
    "regex": StructuredOutput(regex="(unclosed"),
    "grammar": StructuredOutput(grammar="start: undefined_rule"),
    "grammar syntax": StructuredOutput(grammar="start: (("),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_constraint_is_a_value_error_at_add(llm, name):
    params = SamplingParams(max_tokens=8, structured=BAD[name])
    with pytest.raises(ValueError, match=r"invalid (JSON schema|regex|grammar): .+"):
        llm.generate([PROMPTS[0]], params, use_tqdm=False)
    assert not llm.engine.scheduler.has_unfinished()
    # Refused again from the cache, and the engine still serves constrained requests.
    with pytest.raises(ValueError, match="invalid"):
        llm.engine.check_structured(BAD[name])
    (out,), = _run(llm, [_sampled(StructuredOutput(regex=REGEX), 1)])
    assert re.fullmatch(REGEX, out.text)


def test_constraint_and_end_options_refused_together():
    with pytest.raises(ValueError, match="ignore_eos cannot be combined with structured"):
        SamplingParams(ignore_eos=True, structured=StructuredOutput(regex="a"))
    with pytest.raises(ValueError, match="min_tokens cannot be combined with structured"):
        SamplingParams(min_tokens=2, structured=StructuredOutput(regex="a"))


def test_max_tokens_before_the_structure_closes_is_length(llm):
    (out,), = _run(llm, [_sampled(StructuredOutput(json=SCHEMA), 5, max_tokens=6)])
    assert out.finish_reason == "length" and len(out.token_ids) == 6
    # Properties come in the schema's order.
    assert out.text.startswith('{"name": "') or '{"name": "'.startswith(out.text)


def test_stop_string_ends_a_constrained_request(llm):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=['"age"'],
                            structured=StructuredOutput(json=SCHEMA))
    (out,), = _run(llm, [params])
    assert out.finish_reason == "stop" and out.stop_reason == '"age"'
    assert out.text.startswith('{"name": "') and '"age"' not in out.text


def test_a_failing_matcher_fails_only_its_request(llm, monkeypatch):
    free = SamplingParams(temperature=0.9, seed=5, max_tokens=12, ignore_eos=True)
    alone = [o[0].token_ids for o in _run(llm, [free, free], [PROMPTS[0], PROMPTS[1]])]
    real = SequenceMatcher.sync

    def broken(self, output_token_ids):
        if self.compiled.spec == "zz+":
            raise RuntimeError("injected matcher fault")
        return real(self, output_token_ids)

    monkeypatch.setattr(SequenceMatcher, "sync", broken)
    params = [free, _sampled(StructuredOutput(regex="zz+"), 1), free, _sampled(StructuredOutput(regex=REGEX), 2)]
    outs = [o[0] for o in _run(llm, params, [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]])]
    assert outs[1].finish_reason == "error"
    assert [outs[0].token_ids, outs[2].token_ids] == alone
    assert re.fullmatch(REGEX, outs[3].text)


# --------------------------------------------------------------------- AsyncEngine


async def _reply(deltas) -> tuple[str, list[int]]:
    outs = [out.outputs[0] async for out in deltas]
    return "".join(o.text for o in outs), [t for o in outs for t in o.token_ids]


async def _text(deltas) -> str:
    return (await _reply(deltas))[0]


def test_async_check_structured_off_the_engine_thread(llama_dir):
    engine = AsyncEngine(str(llama_dir))

    async def main():
        errors: list[BaseException] = []

        def check(s):
            try:
                engine.check_structured(s)
            except ValueError as e:
                errors.append(e)

        # Compiles on other threads while the engine thread steps a constrained request.
        threads = [threading.Thread(target=check, args=(s,)) for s in
                   (StructuredOutput(regex=REGEX), BAD["regex"], StructuredOutput(choice=CHOICES), None)]
        reply = asyncio.ensure_future(_text(engine.generate(PROMPTS[0], _sampled(StructuredOutput(json=SCHEMA), 4))))
        for t in threads:
            t.start()
        text = await reply
        for t in threads:
            t.join()
        assert len(errors) == 1 and "invalid regex" in str(errors[0])
        _check_schema(json.loads(text))
        with pytest.raises(ValueError, match="invalid grammar"):
            await asyncio.to_thread(engine.check_structured, BAD["grammar"])
        await engine.shutdown()

    asyncio.run(main())


def test_async_generate_compiles_a_new_schema_off_the_engine_thread(llama_dir, monkeypatch):
    """A new schema given to AsyncEngine.generate compiles in a worker thread, not on the
    engine thread (where it would stall every running request's step); a bad one raises
    ValueError at the call, and the engine keeps serving."""
    from livelm.runner.structured.backend import GrammarBackend

    engine = AsyncEngine(str(llama_dir))
    compiled_on: list[str] = []
    compile_ = GrammarBackend._compile

    def recording(self, structured):  # noqa: ANN001, ANN202
        compiled_on.append(threading.current_thread().name)
        return compile_(self, structured)

    monkeypatch.setattr(GrammarBackend, "_compile", recording)

    async def main():
        text = await _text(engine.generate(PROMPTS[0], _sampled(StructuredOutput(regex="(ab|cd){2,4}x"), 24)))
        assert re.fullmatch("(ab|cd){2,4}x", text)
        with pytest.raises(ValueError, match="invalid regex"):
            await _text(engine.generate(PROMPTS[0], _sampled(BAD["regex"], 4)))
        assert await _text(engine.generate(PROMPTS[1], SamplingParams(max_tokens=3, ignore_eos=True)))
        await engine.shutdown()

    asyncio.run(main())
    assert len(compiled_on) == 2  # each schema once (the engine thread's check hit the cache)
    assert "livelm-engine" not in compiled_on, compiled_on


def test_stream_replies_and_session_turns_follow_their_constraints(llama_dir):
    engine = AsyncEngine(str(llama_dir))

    async def main():
        async with engine.open_stream() as stream:
            stream.append(PROMPTS[2])
            stream.append(PROMPTS[1])
            assert re.fullmatch(REGEX, await _text(stream.generate(_sampled(StructuredOutput(regex=REGEX), 9))))
        first, ids = await _reply(engine.generate(PROMPTS[3], _sampled(StructuredOutput(choice=CHOICES), 2),
                                                  session_id="conv"))
        history = PROMPTS[3] + ids + [50, 51]  # the next turn extends the pinned history
        second = await _text(engine.generate(history, _sampled(StructuredOutput(json=SCHEMA), 3), session_id="conv"))
        assert first in CHOICES
        _check_schema(json.loads(second))
        await engine.close_session("conv")
        await engine.shutdown()

    asyncio.run(main())
