"""The ``livelm`` command: generate, chat, serve, bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from livelm.config import ACTIVATION_QUANTIZATION_CHOICES, KV_CACHE_DTYPE_CHOICES
from livelm.entrypoints.scheduling_args import add_scheduling_args, scheduling_kwargs
from livelm.entrypoints.speculative_args import add_speculative_args, speculative_kwargs


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF directory, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--max-model-len", type=int, default=None)
    # An interactive session needs far less KV memory than a batch job's 4 GiB default.
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV cache size on CPU (default: sized to need, committed as used)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPE_CHOICES,
                   help="what the KV cache stores: auto (the model's dtype), float32, bfloat16 (half the memory; read in place by the C++ kernels), float16, q8_0 (block-quantized int8, 27%% of float32's memory; read in place by the C++ kernels) or fp8 (e4m3, for CUDA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over this many processes (gloo, CPU; --threads shared out; "
                        "docs/distributed.md)")
    p.add_argument("--quantization", default="auto",
                   choices=["auto", "none", "q8_0", "q4_0", "q4_1", "int8", "q5_0", "q5_1"],
                   help="weights in memory: auto keeps a GGUF's own format (default), none = float, "
                        "or quantize at load (docs/quantization.md)")
    p.add_argument("--activation-quantization", default="none", choices=list(ACTIVATION_QUANTIZATION_CHOICES),
                   help="int8 quantizes the activations of q8_0/q4_0/q4_1 linear layers per 32-block and multiplies "
                    "in integers (CPU; faster batches and prefill, within a perplexity bound; default none; "
                    "docs/quantization.md)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "cpu", "torch"],
                   help="auto: livelm's C++ kernels for fp32 on CPU, else torch ops (docs/kernels.md)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV of shared prompt prefixes (on by default)")
    add_scheduling_args(p)
    add_speculative_args(p)


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _engine_kwargs(args: argparse.Namespace) -> dict:
    kw = {"dtype": args.dtype, "max_model_len": args.max_model_len, "num_threads": args.threads,
          "quantization": args.quantization,
          "activation_quantization": args.activation_quantization, "attention_backend": args.attention_backend,
          "kv_cache_dtype": args.kv_cache_dtype, "tensor_parallel_size": args.tensor_parallel_size}
    if args.no_prefix_caching:
        kw["enable_prefix_caching"] = False
    if args.kv_cache_gib is not None:
        kw["kv_cache_gib"] = args.kv_cache_gib
    kw.update(scheduling_kwargs(args))
    kw.update(speculative_kwargs(args))
    return kw


def _sampling(args: argparse.Namespace):
    from livelm.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    """Complete each prompt (through the chat template unless --raw) and print the answers."""
    from livelm.engine.llm import LLM

    llm = LLM(args.model, **_engine_kwargs(args))
    params = _sampling(args)
    if args.raw or not getattr(llm.tokenizer, "chat_template", None):
        outputs = llm.generate(args.prompts, params)
    else:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    for prompt, out in zip(args.prompts, outputs, strict=True):
        if len(args.prompts) > 1:
            print(f"### {prompt}")
        print(out.outputs[0].text.strip())
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive multi-turn chat that streams the model's replies."""
    import asyncio

    from livelm.engine.async_engine import AsyncEngine

    engine = AsyncEngine(args.model, **_engine_kwargs(args))
    params = _sampling(args)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})

    async def reply(messages: list[dict]) -> str:
        text = []
        # One session: each turn reuses the pinned KV of the history instead of prefilling it.
        async for out in engine.generate(engine.apply_chat_template(messages), params,
                                         session_id="livelm-chat"):
            for c in out.outputs:
                print(c.text, end="", flush=True)
                text.append(c.text)
        print()
        return "".join(text)

    print(f"livelm chat with {engine.model_name} (empty line or Ctrl-D to quit, /reset to forget)")
    try:
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                break
            if not line:
                break
            if line == "/reset":
                history = history[:1] if args.system else []
                continue
            history.append({"role": "user", "content": line})
            answer = asyncio.run(reply(history))
            history.append({"role": "assistant", "content": answer})
    except KeyboardInterrupt:
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="livelm", description="Streaming-native LLM inference engine")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer one or more prompts")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--raw", action="store_true", help="do not wrap prompts in the chat template")
    _add_engine_args(gen)
    _add_sampling_args(gen, temperature=0.0)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive streaming chat")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_engine_args(chat)
    _add_sampling_args(chat, temperature=0.7)
    chat.set_defaults(func=cmd_chat)

    try:
        from livelm.entrypoints.serve_cli import add_serve_args, serve_main
    except ImportError:  # the server's optional pieces are missing
        pass
    else:
        serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
        add_serve_args(serve)
        serve.set_defaults(func=serve_main)

    from livelm.entrypoints.bench_cli import add_bench_args

    bench = sub.add_parser("bench", help="benchmarks: throughput, serve, sweep",
                           description="Benchmarks: offline throughput, serving latency under load, rate sweeps.")
    add_bench_args(bench)

    from livelm.entrypoints.simulate_cli import add_simulate_args

    simulate = sub.add_parser("simulate", help="calibrate the step cost model; replay traces on simulated replicas",
                              description="The real scheduler on simulated replicas (docs/scheduling.md).")
    add_simulate_args(simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``livelm`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except (ValueError, RuntimeError) as e:
        print(f"livelm: error: {e}", file=sys.stderr)
        return 2


def console_main() -> None:
    """The ``livelm`` console script: :func:`main`, and for ``generate`` a prompt exit.

    Once ``generate`` has printed its answers nothing is left to do, yet the interpreter's
    normal teardown of torch's modules and the model takes ~0.5 s of a ~3 s run; the
    long-running commands (serve, chat, bench) exit normally, running their atexit work.
    """
    code = main()
    if sys.argv[1:2] == ["generate"]:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
