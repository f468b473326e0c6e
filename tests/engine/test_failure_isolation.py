"""One request that breaks a step ends alone; the others go on exactly as without it (issue 23).

Faults are injected past admission (request validation rejects these values there): the
engine's ``validate`` is bypassed, or SamplingParams fields are set after construction, or
the runner is patched to fail for one chosen request. The victims' outputs must equal the
same requests run alone, the culprit ends with an error, every KV block comes back (the
conftest fixture checks) and the engine serves a new request afterwards.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from livelm import SamplingParams
from livelm.engine.async_engine import AsyncEngine
from livelm.engine.llm import LLM
from livelm.runner.model_runner import ModelRunner

VICTIMS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26]]
CULPRIT = [40, 41, 42, 43]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_k=40, seed=77, max_tokens=12, ignore_eos=True)


def _unchecked(params: SamplingParams, **fields) -> SamplingParams:
    """``params`` with ``fields`` set past SamplingParams' own validation."""
    params = SamplingParams(**{f: getattr(params, f) for f in ("temperature", "top_k", "seed", "max_tokens",
                                                               "ignore_eos")})
    for name, value in fields.items():
        object.__setattr__(params, name, value)
    return params


BAD_PARAMS = {
    "seed beyond 64 bits": _unchecked(SEEDED, seed=2**70),
    "nan temperature": _unchecked(SEEDED, temperature=math.nan, seed=None),
    "nan repetition penalty (greedy)": _unchecked(GREEDY, repetition_penalty=math.nan),
    "inf presence penalty": _unchecked(SEEDED, presence_penalty=-math.inf, repetition_penalty=1.0),
}


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir))


@pytest.fixture
def unvalidated(llm, monkeypatch):
    """The LLM with admission checks off: bad values reach the step."""
    monkeypatch.setattr(llm.engine, "validate", lambda *args: None)
    return llm


def _alone(llm: LLM, params: list[SamplingParams]) -> list[list[int]]:
    return [llm.generate([p], q, use_tqdm=False)[0].outputs[0].token_ids for p, q in zip(VICTIMS, params, strict=True)]


def _with_culprit(llm: LLM, params: list[SamplingParams], bad: SamplingParams):
    outs = llm.generate([*VICTIMS[:1], CULPRIT, *VICTIMS[1:]], [params[0], bad, *params[1:]], use_tqdm=False)
    victims = [o.outputs[0].token_ids for i, o in enumerate(outs) if i != 1]
    return victims, outs[1].outputs[0]


def _serves_after(llm: LLM) -> None:
    out = llm.generate([[7, 8, 9]], GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == GREEDY.max_tokens and out.finish_reason == "length"


@pytest.mark.parametrize("fault", list(BAD_PARAMS))
def test_bad_sampling_params_fail_only_their_request(unvalidated, fault):
    llm = unvalidated
    params = [GREEDY, SEEDED, GREEDY]
    alone = _alone(llm, params)
    victims, culprit = _with_culprit(llm, params, BAD_PARAMS[fault])
    assert victims == alone
    # A penalty on output tokens breaks the row from its second token on.
    assert culprit.finish_reason == "error" and len(culprit.token_ids) <= 1
    _serves_after(llm)


def test_nan_logits_of_one_row_end_that_request(llm, monkeypatch):
    runner = llm.engine.runner
    real = runner.sampler

    def poisoned(logits, batch):
        rows = [i for i, p in enumerate(batch.prompt_token_ids) if p == CULPRIT]
        if rows:
            logits = logits.clone()
            logits[rows[0], 3] = math.nan
        return real(logits, batch)

    params = [GREEDY, SEEDED, GREEDY]
    alone = _alone(llm, params)
    monkeypatch.setattr(runner, "sampler", poisoned)
    victims, culprit = _with_culprit(llm, params, GREEDY)
    assert victims == alone and culprit.finish_reason == "error"
    monkeypatch.undo()
    _serves_after(llm)


def _fail_when(monkeypatch, method: str, predicate) -> list[int]:
    """Make ``ModelRunner.<method>(chunks...)`` raise when ``predicate(chunks)``; counts the raises."""
    real = getattr(ModelRunner, method)  # a plain function either way (staticmethod unwrapped)
    raised: list[int] = []

    def check(chunks) -> None:
        if predicate(chunks):
            raised.append(1)
            raise RuntimeError("injected fault")

    if method == "_to_sampled":  # a staticmethod: (chunks, out)
        def patched_static(chunks, *args):
            check(chunks)
            return real(chunks, *args)

        monkeypatch.setattr(ModelRunner, method, staticmethod(patched_static))
    else:
        def patched(self, chunks, *args):
            check(chunks)
            return real(self, chunks, *args)

        monkeypatch.setattr(ModelRunner, method, patched)
    return raised


def _has_culprit(chunks) -> bool:
    return any(c.prompt_token_ids == CULPRIT for c in chunks)


@pytest.mark.parametrize("method", ["_prepare", "_to_sampled"])
def test_a_step_failure_is_traced_to_its_request(llm, monkeypatch, method):
    # _prepare fails before the model runs; _to_sampled after the seeded rows drew their
    # numbers: the probes rewind the generators, so the seeded victim is still exact.
    params = [SEEDED, GREEDY, SEEDED]
    alone = _alone(llm, params)
    raised = _fail_when(monkeypatch, method, _has_culprit)
    victims, culprit = _with_culprit(llm, params, GREEDY)
    assert raised and victims == alone
    assert culprit.finish_reason == "error"
    monkeypatch.undo()
    _serves_after(llm)


def test_a_transient_step_failure_ends_nobody(llm, monkeypatch):
    params = [GREEDY, SEEDED, GREEDY]
    alone = _alone(llm, params)
    seen = {"steps": 0}

    def once(chunks) -> bool:  # the whole batch fails once; alone every chunk passes
        seen["steps"] += 1
        return seen["steps"] == 3 and len(chunks) > 1

    _fail_when(monkeypatch, "_prepare", once)
    outs = llm.generate(VICTIMS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone


def test_a_failure_no_request_explains_ends_the_batch_and_the_engine_goes_on(llm, monkeypatch):
    _fail_when(monkeypatch, "_prepare", lambda chunks: True)
    outs = llm.generate(VICTIMS, GREEDY, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "error" for o in outs)
    monkeypatch.undo()
    _serves_after(llm)


def test_n_gt_1_culprit_ends_all_its_sequences(unvalidated):
    bad = _unchecked(SEEDED, seed=2**64 - 1)  # seed + sequence index 1 overflows
    object.__setattr__(bad, "n", 2)
    outs = unvalidated.generate([CULPRIT, VICTIMS[0]], [bad, GREEDY], use_tqdm=False)
    assert [o.finish_reason for o in outs[0].outputs] == ["error", "error"]
    assert outs[1].outputs[0].token_ids == _alone(unvalidated, [GREEDY] * 3)[0]


# ------------------------------------------------------------------ AsyncEngine


@pytest.fixture(scope="module")
def async_engine(llama_dir):
    engine = AsyncEngine(str(llama_dir))
    yield engine
    asyncio.run(engine.shutdown())


async def _collect(engine: AsyncEngine, prompt, params, started: asyncio.Event | None = None) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(prompt, params):
        tokens += out.outputs[0].token_ids
        if started is not None and tokens:
            started.set()
    return tokens


@pytest.mark.parametrize("fault", ["seed beyond 64 bits", "nan temperature"])
def test_async_culprit_raises_and_requests_in_flight_go_on(async_engine, monkeypatch, fault):
    engine = async_engine
    monkeypatch.setattr(engine._engine, "validate", lambda *args: None)
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    params = [long, _unchecked(SEEDED, max_tokens=40), long]

    async def run():
        alone = [await _collect(engine, p, q) for p, q in zip(VICTIMS, params, strict=True)]
        started = [asyncio.Event() for _ in VICTIMS]
        victims = [asyncio.create_task(_collect(engine, p, q, e))
                   for p, q, e in zip(VICTIMS, params, started, strict=True)]
        for e in started:
            await e.wait()  # all three are running when the culprit arrives
        with pytest.raises(ValueError, match="seed|finite"):
            await _collect(engine, CULPRIT, BAD_PARAMS[fault])
        assert await asyncio.gather(*victims) == alone
        assert len(await _collect(engine, [7, 8, 9], GREEDY)) == GREEDY.max_tokens

    asyncio.run(run())
    assert engine.is_alive


def test_async_failed_step_ends_the_culprit_with_runtime_error(async_engine, monkeypatch):
    engine = async_engine
    _fail_when(monkeypatch, "_prepare", _has_culprit)

    async def run():
        alone = await _collect(engine, VICTIMS[0], GREEDY)
        victim = asyncio.create_task(_collect(engine, VICTIMS[0], GREEDY))
        with pytest.raises(RuntimeError, match="injected fault"):
            await _collect(engine, CULPRIT, GREEDY)
        assert await victim == alone

    asyncio.run(run())
    assert engine.is_alive


def test_async_input_stream_whose_prefill_fails_is_closed_with_the_reason(async_engine, monkeypatch):
    engine = async_engine
    poison = [91, 92, 93, 94, 95]
    _fail_when(monkeypatch, "_prepare", lambda chunks: any(c.token_ids[:5] == poison for c in chunks))

    async def run():
        alone = await _collect(engine, VICTIMS[0], GREEDY)
        victim = asyncio.create_task(_collect(engine, VICTIMS[0], GREEDY))
        async with engine.open_stream() as stream:
            stream.append(poison)
            await stream.wait_prefilled(timeout=10)
            assert stream.closed and "the input stream failed" in stream.closed_reason
        assert await victim == alone

    asyncio.run(run())
    assert engine.is_alive
