"""Fork/join of a running request on shared KV (docs/rl.md): branches and the joined parent
produce what the same prompts produce as plain requests, no token of the shared prefix is
computed again, branches decode in shared batches, and bad forks are refused."""

from __future__ import annotations

import asyncio

import pytest

from livelm import LLM, AsyncEngine, SamplingParams
from livelm.engine.engine import Engine, make_engine_config
from livelm.engine.fork import Branch

PROMPT = "The quick brown fox jumps over the lazy dog."
PARENT = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)


def _engine(model_dir) -> Engine:
    return Engine(make_engine_config(str(model_dir), {"kv_cache_gib": 0.02}))


def _run(engine: Engine) -> None:
    while engine.scheduler.has_unfinished():
        engine.step()


def _step_until(engine: Engine, state, num_outputs: int) -> None:
    while len(state.seqs[0].token_ids) < num_outputs:
        engine.step()


def _plain(model_dir, prompt_ids: list[int], params: SamplingParams) -> list[int]:
    return LLM(str(model_dir), kv_cache_gib=0.02).generate([prompt_ids], params)[0].outputs[0].token_ids


def _branches() -> list[Branch]:
    return [
        Branch(" A:", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)),
        Branch(" and then", SamplingParams(temperature=0.9, top_k=30, seed=7, max_tokens=9, ignore_eos=True)),
        Branch("", SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)),
    ]


@pytest.mark.parametrize("aligned", [False, True])
def test_fork_join_equals_plain_requests_without_recompute(llama_dir, aligned):
    engine = _engine(llama_dir)
    prompt_ids = engine.prompt_ids(PROMPT)
    bs = engine.config.block_size
    # Fork where the parent's computed tokens end inside a block (its copy is made) or at a
    # block boundary (nothing to copy): both must give the plain requests' tokens.
    m = next(k for k in range(2, 40) if ((len(prompt_ids) + k - 1) % bs == 0) == aligned)
    parent = engine.add("p", PROMPT, PARENT)
    engine.add("other", "Paris is the capital of", SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True))
    _step_until(engine, parent, m)
    batches: list[set[str]] = []
    execute = engine.runner.execute

    def spy(sched):
        batches.append({c.request_id for c in sched.chunks})
        return execute(sched)

    engine.runner.execute = spy
    computed = engine.stats().num_computed_tokens
    branches = _branches()
    fork = engine.fork("p", branches)
    assert fork.token_ids == prompt_ids + parent.seqs[0].token_ids
    branch_states = [engine.states[b] for b in fork.branch_ids]
    while any(not s.finished for s in branch_states):
        engine.step()
    assert any(set(fork.branch_ids) | {"other"} <= b for b in batches)  # one batch, all of them
    suffixes = [engine.prompt_ids(b.suffix) if b.suffix else [] for b in branches]
    outs = [s.seqs[0].token_ids for s in branch_states]
    for branch, suffix, out in zip(branches, suffixes, outs, strict=True):
        assert out == _plain(llama_dir, fork.token_ids + suffix, branch.params)
    appended, _ = engine.join("p", separator=" | ", prefix="<p>", suffix="</p>")
    head, sep, tail = (engine.prompt_ids(t) for t in ("<p>", " | ", "</p>"))
    assert appended == head + suffixes[0] + outs[0] + sep + suffixes[1] + outs[1] + sep + outs[2] + tail
    before_join = len(parent.seqs[0].token_ids)
    _run(engine)
    after = parent.seqs[0].token_ids[before_join:]
    assert len(after) == PARENT.max_tokens - m
    want = _plain(llama_dir, fork.token_ids + appended,
                  SamplingParams(temperature=0.0, max_tokens=PARENT.max_tokens - m, ignore_eos=True))
    assert after == want
    # Computed after the fork: each branch its suffix and its outputs, the parent the
    # appended tokens and its outputs (the last sampled token of each is never computed),
    # and the other request's decodes. Nothing of the shared prefix.
    spent = engine.stats().num_computed_tokens - computed
    own = sum(len(s) + len(o) for s, o in zip(suffixes, outs, strict=True)) + len(appended) + len(after)
    other_decodes = sum("other" in b for b in batches)
    assert spent == own + other_decodes


def test_nested_fork_and_parent_abort_leave_no_blocks(llama_dir):
    engine = _engine(llama_dir)
    parent = engine.add("p", PROMPT, PARENT)
    _step_until(engine, parent, 3)
    fork = engine.fork("p", [Branch(" x", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))])
    branch = engine.states[fork.branch_ids[0]]
    _step_until(engine, branch, 2)
    inner = engine.fork(fork.branch_ids[0], [Branch(" y", SamplingParams(max_tokens=3)) for _ in range(2)])
    assert len(inner.branch_ids) == 2
    engine.abort("p")  # the parent goes; its branches are requests of their own
    assert "p" not in engine.forks
    _run(engine)
    engine.abort(fork.branch_ids[0])  # a suspended branch (it forked) frees its KV too
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_join_aborts_running_branches(llama_dir):
    engine = _engine(llama_dir)
    parent = engine.add("p", PROMPT, PARENT)
    _step_until(engine, parent, 2)
    fork = engine.fork("p", [Branch(" a", SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))] * 2)
    for _ in range(3):
        engine.step()
    appended, moved = engine.join("p", branch_ids=list(reversed(fork.branch_ids)))
    assert {s.request_id for s, _ in moved} == set(fork.branch_ids)
    assert all(out.outputs[0].finish_reason == "abort" for _, out in moved)
    assert appended  # what they had generated by then
    _run(engine)
    assert parent.finished


def test_bad_forks_and_joins_are_refused(llama_dir):
    engine = _engine(llama_dir)
    ok = [Branch("", SamplingParams(max_tokens=2))]
    with pytest.raises(ValueError, match="not running"):
        engine.fork("nope", ok)
    done = engine.add("done", PROMPT, SamplingParams(max_tokens=2))
    _run(engine)
    assert done.finished
    with pytest.raises(ValueError, match="not running"):
        engine.fork("done", ok)
    engine.add("p", PROMPT, PARENT)
    engine.step()
    for branches, message in [
        ([], "between 1 and"),
        (ok * 65, "between 1 and"),
        ("text", "list of Branch"),
        ([Branch("", SamplingParams(n=2))], "n == 1"),
        ([Branch([10**9], SamplingParams())], "vocabulary|token"),
        ([Branch("", SamplingParams(max_tokens=10**6))], "context length|exceeds"),
    ]:
        with pytest.raises(ValueError, match=message):
            engine.fork("p", branches)
    with pytest.raises(ValueError, match="distinct"):
        engine.fork("p", ok * 2, branch_ids=["a", "a"])
    with pytest.raises(ValueError, match="has not forked"):
        engine.join("p")
    engine.fork("p", ok)
    with pytest.raises(ValueError, match="forked already"):
        engine.fork("p", ok)
    for kwargs, message in [
        ({"branch_ids": ["zzz"]}, "distinct branches"),
        ({"separator": 3.5}, "separator"),
        ({"prefix": [True]}, "prefix"),
        ({"suffix": [10**9]}, "vocabulary|token"),
        ({"include_branch_prompts": "yes"}, "boolean"),
    ]:
        with pytest.raises(ValueError, match=message):
            engine.join("p", **kwargs)
    engine.join("p")
    _run(engine)
    assert engine.stats().num_running == 0


def test_weight_update_with_an_open_fork(tiny_model_dirs):
    """An update while forked drops the suspended parent's KV; join recomputes it, so the
    tokens after the join come from the new weights."""
    engine = _engine(tiny_model_dirs["llama"])
    parent = engine.add("p", PROMPT, PARENT)
    _step_until(engine, parent, 3)
    fork = engine.fork("p", [Branch("", SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))])
    _run_branches = [engine.states[b] for b in fork.branch_ids]
    while not all(s.finished for s in _run_branches):
        engine.step()
    from safetensors.torch import load_file

    new = load_file(str(tiny_model_dirs["llama"] / "model.safetensors"))
    scaled = {k: v * 1.5 if "mlp" in k else v for k, v in new.items()}
    engine.update_weights(scaled)
    appended, _ = engine.join("p")
    _run(engine)
    assert parent.seqs[0].weight_versions[-1] == 1
    fresh = _engine(tiny_model_dirs["llama"])
    fresh.update_weights(scaled)
    ids = fork.token_ids + appended
    state = fresh.add("q", ids, SamplingParams(temperature=0.0, max_tokens=PARENT.max_tokens - 3, ignore_eos=True))
    _run(fresh)
    assert parent.seqs[0].token_ids[3:] == state.seqs[0].token_ids


def test_async_fork_join_parallel_reasoning(llama_dir):
    """The AsyncEngine API: pause at a point, fork, resume, read the branches, join."""
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)

    async def main():
        engine = AsyncEngine(str(llama_dir), kv_cache_gib=0.02)
        try:
            parent_tokens: list[int] = []
            gen = engine.generate(PROMPT, params, request_id="p")
            async for out in gen:
                parent_tokens += out.outputs[0].token_ids
                if len(parent_tokens) >= 4:
                    await engine.pause()
                    break
            # The generator is still open (we broke out of the loop but keep it).
            branches = [Branch(f"<Path>{i}:", SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
                        for i in (1, 2)]
            fork, streams = await engine.fork("p", branches)
            await engine.resume()
            outs = []
            for stream in streams:
                tokens = []
                async for o in stream:
                    tokens += o.outputs[0].token_ids
                outs.append(tokens)
            appended = await engine.join("p", prefix="<Parallel>", separator="</Path>", suffix="</Path></Parallel>")
            async for out in gen:
                parent_tokens += out.outputs[0].token_ids
            with pytest.raises(ValueError, match="not running"):
                await engine.fork("p", branches)
            pieces = [engine.encode(t) for t in ("<Parallel>", "<Path>1:", "</Path>", "<Path>2:",
                                                  "</Path></Parallel>")]
            return fork, outs, appended, parent_tokens, pieces
        finally:
            await engine.shutdown()

    fork, outs, appended, parent_tokens, (head, path1, sep, path2, tail) = asyncio.run(main())
    assert len(outs) == 2 and all(len(o) == 5 for o in outs)
    assert appended == head + path1 + outs[0] + sep + path2 + outs[1] + tail
    n_before = len(fork.token_ids) - len(_prompt_ids(llama_dir))
    after = parent_tokens[n_before:]
    want = _plain(llama_dir, fork.token_ids + appended,
                  SamplingParams(temperature=0.0, max_tokens=20 - n_before, ignore_eos=True))
    assert after == want


def _prompt_ids(model_dir) -> list[int]:
    return LLM(str(model_dir), kv_cache_gib=0.02).engine.prompt_ids(PROMPT)
