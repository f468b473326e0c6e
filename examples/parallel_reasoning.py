"""Parallel reasoning through fork/join (docs/rl.md): one trajectory forks into branches that
share its KV, the branches reason side by side in the same batches, and their outputs are
joined back, marked by tags, into the trajectory, which then concludes.

The format follows Multiverse / Parallel-R1 style tags::

    <question and preamble> <Parallel>
    <Path>1: ...branch 1...</Path>
    <Path>2: ...branch 2...</Path>
    </Parallel>
    <Conclusion> ...the parent continues...

Here the controller (this script) decides when to fork: after the parent has written a
short preamble it pauses the engine (so the fork point is exact), forks, resumes. A model
trained for the format would emit ``<Parallel>`` itself; the controller would fork when it
sees it.

    python examples/parallel_reasoning.py                  # the default model
    python examples/parallel_reasoning.py --model DIR --branches 3
"""

from __future__ import annotations

import argparse
import asyncio

from livelm import AsyncEngine, SamplingParams
from livelm.engine.fork import Branch


async def main(model: str | None, num_branches: int, preamble_tokens: int) -> None:
    engine = AsyncEngine(model, kv_cache_gib=0.5)
    try:
        prompt = engine.apply_chat_template(
            [{"role": "user", "content": "Is 391 a prime number? Consider several ways to check."}]
        )
        params = SamplingParams(temperature=0.0, max_tokens=preamble_tokens + 48)
        parent = engine.generate(prompt, params, request_id="trajectory")
        preamble: list[int] = []
        async for out in parent:  # the parent writes its preamble
            preamble += out.outputs[0].token_ids
            if len(preamble) >= preamble_tokens:
                await engine.pause()  # no step runs now: the fork point stays where it is
                break
        computed = engine.stats().num_computed_tokens
        branches = [
            Branch(f"\n<Path>{i}:", SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=40,
                                                   stop=["</Path>"], sampling_logprobs=True))
            for i in range(1, num_branches + 1)
        ]
        fork, streams = await engine.fork("trajectory", branches)
        await engine.resume()

        async def read(stream) -> tuple[str, list[int]]:
            text, versions = "", []
            async for o in stream:
                text += o.outputs[0].text
                versions += o.outputs[0].weight_versions
            return text, versions

        results = await asyncio.gather(*(read(s) for s in streams))
        appended = await engine.join("trajectory", prefix="\n<Parallel>", separator="</Path>",
                                     suffix="</Path>\n</Parallel>\n<Conclusion>")
        conclusion: list[int] = []
        async for out in parent:  # the parent goes on after the joined branches
            conclusion += out.outputs[0].token_ids
        spent = engine.stats().num_computed_tokens - computed

        tok = engine.tokenizer
        print(f"forked at token {len(fork.token_ids)} into {len(fork.branch_ids)} branches sharing its KV")
        print("=" * 72)
        print(tok.decode(prompt[-40:]) + tok.decode(preamble), end="")
        print(tok.decode(appended), end="")
        print(tok.decode(conclusion))
        print("=" * 72)
        for bid, (text, _) in zip(fork.branch_ids, results, strict=True):
            print(f"branch {bid}: {len(tok.encode(text, add_special_tokens=False))} tokens")
        print(f"tokens computed after the fork: {spent} (branch suffixes + outputs, joined tokens, "
              f"conclusion; the {len(fork.token_ids)}-token shared context was not recomputed)")
    finally:
        await engine.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded model)")
    ap.add_argument("--branches", type=int, default=3)
    ap.add_argument("--preamble-tokens", type=int, default=12)
    args = ap.parse_args()
    asyncio.run(main(args.model, args.branches, args.preamble_tokens))
