"""``livelm serve``: flags and entry point of the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import os

from livelm.config import ACTIVATION_QUANTIZATION_CHOICES, KV_CACHE_DTYPE_CHOICES
from livelm.entrypoints.scheduling_args import add_scheduling_args
from livelm.entrypoints.speculative_args import add_speculative_args


def _non_negative_seconds(value: str) -> float:
    seconds = float(value)
    if not seconds >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return seconds


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """Add ``livelm serve``'s flags (server, then engine) to ``parser``."""
    server = parser.add_argument_group("server")
    server.add_argument("--model", default=None,
                        help="local HF directory, .gguf file or hub id (default: the embedded model)")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    server.add_argument("--api-key", default=os.environ.get("LIVELM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize "
                             "(default: $LIVELM_API_KEY; unset means no auth)")
    server.add_argument("--served-model-name", default=None,
                        help="model name clients must send (default: the model directory's name)")
    server.add_argument("--max-waiting", type=int, default=512,
                        help="sequences allowed to wait beyond those running before new requests "
                             "get 503 + Retry-After (default 512; negative disables the bound)")
    server.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024,
                        help="largest accepted request body, else 413 (default 8 MiB)")
    server.add_argument("--cors-origin", action="append", default=[],
                        help="allow browser requests from this origin (repeatable; CORS is off by default)")
    server.add_argument("--drain-timeout", "--shutdown-timeout", dest="drain_timeout_s",
                        type=_non_negative_seconds, default=5.0, metavar="SECONDS",
                        help="on SIGINT/SIGTERM, new requests get 503 at once and in-flight ones "
                             "may finish for this long; the rest then end with an error event "
                             "or body (default 5; --shutdown-timeout is the old name)")
    server.add_argument("--tool-call-parser", default="auto",
                        choices=["auto", "hermes", "llama3_json", "mistral", "none"],
                        help="how tool calls are read from replies with tool_choice 'auto': auto "
                             "picks the format from the chat template (default), none leaves "
                             "them in the content (docs/serving.md#tool-calling)")
    server.add_argument("--no-web-ui", action="store_true",
                        help="do not serve the chat page at / (the API is unchanged)")
    server.add_argument("--enable-rl-api", action="store_true",
                        help="serve /v1/rl/* for RL trainers: weight updates, pause/resume, "
                             "abort-all, rollouts with weight versions and sampling logprobs, "
                             "fork/join (behind --api-key; docs/rl.md)")
    server.add_argument("--log-level", default="info", type=str.lower,
                        choices=["critical", "error", "warning", "info", "debug"])
    engine = parser.add_argument_group("engine")
    engine.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"])
    engine.add_argument("--max-model-len", type=int, default=None,
                        help="context length (default: the model's)")
    engine.add_argument("--max-num-seqs", type=int, default=None,
                        help="sequences run at once (default: the engine's)")
    engine.add_argument("--max-n", dest="max_n", type=int, default=None,
                        help="most sequences (n) one request may ask for (default 16)")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="token budget of one engine step")
    engine.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache size on CPU")
    engine.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPE_CHOICES,
                        help="what the KV cache stores: auto (the model's dtype), float32, bfloat16 (half the memory; read in place by the C++ kernels), float16, q8_0 (block-quantized int8, 27%% of float32's memory; read in place by the C++ kernels) or fp8 (e4m3, for CUDA)")
    engine.add_argument("--seed", type=int, default=None, help="engine seed")
    engine.add_argument("--quantization", default=None,
                        choices=["auto", "none", "q8_0", "q4_0", "q4_1", "int8", "q5_0", "q5_1"],
                        help="weights in memory: auto keeps a GGUF's own format (default), none = "
                             "float, or quantize at load (docs/quantization.md)")
    engine.add_argument("--activation-quantization", dest="activation_quantization", default=None,
                        choices=list(ACTIVATION_QUANTIZATION_CHOICES),
                        help="int8 quantizes the activations of q8_0/q4_0/q4_1 linear layers per 32-block and multiplies "
                         "in integers (CPU; faster batches and prefill, within a perplexity bound; default none; "
                         "docs/quantization.md)")
    engine.add_argument("--attention-backend", default=None, choices=["auto", "cpu", "torch"],
                        help="auto: livelm's C++ kernels for fp32 on CPU, else torch ops (docs/kernels.md)")
    engine.add_argument("--no-prefix-caching", action="store_true",
                        help="do not reuse the KV of shared prompt prefixes (on by default)")
    engine.add_argument("--session-ttl", dest="session_ttl_s", type=float, default=None,
                        help="seconds a session's KV stays pinned after a turn "
                             "(default 30; requests may set session_ttl)")
    engine.add_argument("--threads", type=int, default=None,
                        help="CPU threads in all (default: torch's); shared out between replicas")
    distributed = parser.add_argument_group("data parallelism (docs/distributed.md)")
    distributed.add_argument("--data-parallel-size", dest="data_parallel_size", type=int, default=None,
                             help="engine replicas, each in its own process, behind this one server "
                                  "(default 1)")
    distributed.add_argument("--router", default="cache_aware", choices=["cache_aware", "round_robin"],
                             help="how requests are spread over replicas: cache_aware (session, then "
                                  "cached prefix within a load cap, then least load; default) or "
                                  "round_robin")
    distributed.add_argument("--tensor-parallel-size", dest="tensor_parallel_size", type=int, default=None,
                             help="split the model over this many processes, joined by gloo (CPU only "
                                  "so far; --threads shared out; default 1)")
    distributed.add_argument("--data-parallel-backend", dest="data_parallel_backend", default="local",
                             choices=["local", "ray"],
                             help="where replicas run: local (child processes; default) or ray (Ray "
                                  "actors in a placement group; pip install 'livelm[ray]')")
    distributed.add_argument("--ray-address", dest="ray_address", default=None,
                             help="the Ray cluster to place replicas on (e.g. auto or HOST:6379; "
                                  "default: RAY_ADDRESS, else a local cluster started by the server)")
    distributed.add_argument("--ray-placement-strategy", dest="ray_placement_strategy", default="PACK",
                             choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                             help="how the replicas' bundles spread over Ray nodes (default PACK; "
                                  "STRICT_SPREAD: one replica per node)")
    add_scheduling_args(parser.add_argument_group("scheduling (docs/scheduling.md)"))
    add_speculative_args(engine)
    streams = parser.add_argument_group("streaming input (/v1/stream, /v1/sessions)")
    streams.add_argument("--max-input-streams", dest="max_input_streams", type=int, default=None,
                         help="input sessions open at once; more get 429 (default 64)")
    streams.add_argument("--stream-idle-timeout", dest="stream_idle_timeout_s", type=float,
                         default=None,
                         help="seconds an input session may stay idle before it is closed "
                              "(default 600)")
    streams.add_argument("--max-stream-pending-tokens", dest="max_stream_pending_tokens",
                         type=int, default=None,
                         help="input tokens of a session that may wait for prefill; a piece "
                              "that would leave more gets 429 (default 16384)")


def serve_main(args: argparse.Namespace) -> None:
    """Run the server with parsed ``livelm serve`` arguments (returns after shutdown)."""
    from livelm.entrypoints.openai.api_server import run_server

    run_server(args)


def main(argv: list[str] | None = None) -> None:
    """``python -m livelm.entrypoints.serve_cli``: the same as ``livelm serve``."""
    parser = argparse.ArgumentParser(prog="livelm serve", description=__doc__)
    add_serve_args(parser)
    serve_main(parser.parse_args(argv))


if __name__ == "__main__":
    main()
