"""The FastAPI app (``build_app``) and the uvicorn process around it (``run_server``)."""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from livelm.config import EngineConfig
from livelm.engine.tokenizer import chat_template_text, template_supports_tools
from livelm.entrypoints.openai.admission import AdmissionControl
from livelm.entrypoints.openai.auth import BearerAuthMiddleware
from livelm.entrypoints.openai.body_limit import BodySizeLimitMiddleware
from livelm.entrypoints.openai.config import ServerConfig
from livelm.entrypoints.openai.drain import Drain, DrainMiddleware
from livelm.entrypoints.openai.errors import OpenAIError, install_error_handlers
from livelm.entrypoints.openai.generation import ClientDisconnected
from livelm.entrypoints.openai.logprobs import TokenText
from livelm.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from livelm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    SessionDeleted,
    TokenizeRequest,
    TokenizeResponse,
)
from livelm.entrypoints.openai.rl_routes import add_rl_routes
from livelm.entrypoints.openai.serving_chat import chat_prompt_ids, create_chat_completion
from livelm.entrypoints.openai.serving_completions import create_completion
from livelm.entrypoints.openai.state import ServerState
from livelm.entrypoints.openai.streaming_sessions import add_session_routes
from livelm.entrypoints.openai.tool_parsers import resolve_tool_parser
from livelm.entrypoints.openai.web import add_template_route, add_web_ui_routes
from livelm.entrypoints.openai.websocket_stream import add_websocket_route
from livelm.entrypoints.scheduling_args import scheduling_kwargs
from livelm.entrypoints.speculative_args import speculative_kwargs

logger = logging.getLogger("livelm.server")



def _engine_max_running(engine: Any) -> int:
    # AsyncEngine says how many sequences it runs at once; a look-alike test engine may not.
    value = getattr(engine, "max_num_seqs", None)
    if isinstance(value, int) and value > 0:
        return value
    return EngineConfig().max_num_seqs


def build_app(engine: Any, config: ServerConfig | None = None) -> FastAPI:
    """An OpenAI-compatible app serving ``engine`` (an :class:`AsyncEngine` or look-alike).

    Each app has its own metrics registry and admission counter, so tests may build many.
    """
    config = config or ServerConfig()
    admission = AdmissionControl(
        config.max_running or _engine_max_running(engine), config.max_waiting, config.retry_after_s
    )
    metrics = ServerMetrics(engine.stats, admission)
    if hasattr(engine, "replica_health"):  # data-parallel replicas (docs/distributed.md)
        from livelm.serving.metrics import DataParallelCollector

        metrics.registry.register(DataParallelCollector(engine))
    state = ServerState(
        engine=engine,
        config=config,
        model_name=config.served_model_name or engine.model_name,
        metrics=metrics,
        admission=admission,
        token_text=TokenText(engine.tokenizer),
        tool_parser=resolve_tool_parser(config.tool_call_parser, chat_template_text(engine.tokenizer)),
        native_tools=template_supports_tools(engine.tokenizer),
    )

    drain = Drain(admission, config.drain_timeout_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # Served by DrainingServer, the drain has already stopped the engine (this is then
        # a no-op); under a plain uvicorn.Server, in-flight work is aborted here.
        if config.shutdown_engine:
            await engine.shutdown()

    app = FastAPI(title="livelm", lifespan=lifespan)
    app.state.livelm = state
    app.state.drain = drain

    def reject(reason: str) -> None:
        metrics.rejected.labels(reason).inc()

    install_error_handlers(app, reject)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    _add_routes(app, state)
    add_session_routes(app, state)  # streaming input over REST/SSE
    add_websocket_route(app, state)  # and over a WebSocket (/v1/stream)
    if config.enable_rl_api:
        add_rl_routes(app, state)  # /v1/rl/*: weight updates, pause, fork/join (docs/rl.md)
    add_template_route(app, state)  # POST /v1/chat/template: the chat page streams text
    if config.web_ui:
        add_web_ui_routes(app)  # the chat page at / (open: it holds no data; the API needs the key)

    # Added innermost first: CORS sees every request, then auth, then the size limit.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_body_bytes, on_reject=reject)
    if config.api_key:
        app.add_middleware(BearerAuthMiddleware, api_key=config.api_key, on_reject=reject)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(DrainMiddleware, drain=drain)  # outermost: refuses all once draining
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", response_model=None)
    async def health() -> dict | JSONResponse:
        """Liveness (open without a key): 200 while the engine's step loop runs, 503 with
        why once it stopped (an engine without ``is_alive`` counts as alive). With
        data-parallel replicas, each replica's status, pid, restarts and load too."""
        replicas = getattr(state.engine, "replica_health", None)
        if getattr(state.engine, "is_alive", True):
            return {"status": "ok"} if replicas is None else {"status": "ok", "replicas": replicas()}
        reason = getattr(state.engine, "dead_reason", None) or "the engine stopped"
        return JSONResponse({"status": "error", "message": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        """The one served model."""
        return ModelList(data=[ModelCard(id=state.model_name, max_model_len=state.max_model_len)])

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        """Text completions (OpenAI's legacy API)."""
        return await create_completion(state, req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        """Chat completions."""
        return await create_chat_completion(state, req, raw)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str) -> SessionDeleted:
        """Close an input session (streaming input) with that id, or else release a
        session's pinned KV now (instead of at the end of its TTL)."""
        stream = getattr(state.engine, "get_stream", lambda _: None)(session_id)
        if stream is not None:
            await stream.close()  # aborts its replies, frees its KV
            return SessionDeleted(id=session_id, deleted=True)
        close = getattr(state.engine, "close_session", None)
        if close is None:
            raise OpenAIError("this engine keeps no sessions", 501, "server_error")
        return SessionDeleted(id=session_id, deleted=await close(session_id))

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        """Token ids of a prompt, or of messages through the chat template."""
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError("give exactly one of prompt or messages", 400, param="prompt")
        if req.messages is not None:
            ids = chat_prompt_ids(state, req.messages)
        else:
            ids = list(state.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.max_model_len)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        """Text of token ids."""
        state.check_model(req.model)
        state.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=state.tokenizer.decode(req.tokens))


def configure_logging(level: str) -> None:
    """Timestamped lines for livelm's loggers; the per-request records are bare JSON lines
    (they carry their own timestamp), so log shippers can parse them as they are."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("livelm")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    json_handler = logging.StreamHandler()
    json_handler.setFormatter(logging.Formatter("%(message)s"))
    requests = logging.getLogger("livelm.server.requests")
    requests.handlers[:] = [json_handler]
    requests.propagate = False


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The HTTP-layer settings of ``livelm serve``'s flags."""
    return ServerConfig(
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        max_waiting=None if args.max_waiting is not None and args.max_waiting < 0 else args.max_waiting,
        max_running=args.max_num_seqs,
        max_body_bytes=args.max_body_bytes,
        cors_origins=tuple(args.cors_origin or ()),
        drain_timeout_s=getattr(args, "drain_timeout_s", ServerConfig.drain_timeout_s),
        tool_call_parser=getattr(args, "tool_call_parser", ServerConfig.tool_call_parser),
        enable_rl_api=getattr(args, "enable_rl_api", False),
        web_ui=not getattr(args, "no_web_ui", False),
    )


def engine_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options of ``livelm serve``'s flags (unset flags keep engine defaults)."""
    kwargs = {
        name: getattr(args, name)
        for name in ("dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                     "kv_cache_gib", "kv_cache_dtype", "seed", "session_ttl_s", "quantization",
                     "activation_quantization", "attention_backend", "max_n")
        if getattr(args, name, None) is not None
    }
    if getattr(args, "no_prefix_caching", False):
        kwargs["enable_prefix_caching"] = False
    kwargs.update(speculative_kwargs(args))
    for name in ("max_input_streams", "stream_idle_timeout_s", "max_stream_pending_tokens"):
        if getattr(args, name, None) is not None:  # streaming-input limits
            kwargs[name] = getattr(args, name)
    kwargs.update(scheduling_kwargs(args))
    if getattr(args, "data_parallel_size", None) is not None:
        kwargs["data_parallel_size"] = args.data_parallel_size
    if getattr(args, "tensor_parallel_size", None) is not None:
        kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    if getattr(args, "threads", None) is not None:
        kwargs["num_threads"] = args.threads
    return kwargs


def run_server(args: argparse.Namespace) -> None:
    """Load the engine, serve until SIGINT/SIGTERM, then drain and stop cleanly."""
    import uvicorn

    from livelm.entrypoints.openai.drain import FLUSH_TIMEOUT_S, DrainingServer
    from livelm.serving import make_async_engine

    configure_logging(args.log_level)
    engine_kwargs = engine_kwargs_from_args(args)
    data_parallel = engine_kwargs.get("data_parallel_size", 1) > 1
    if data_parallel and getattr(args, "enable_rl_api", False):
        raise SystemExit("--enable-rl-api needs one engine: it cannot be combined with --data-parallel-size > 1")
    logger.info("loading %s", args.model or "the default model")
    extra = {"router": args.router, "log_level": args.log_level.upper(),
             "backend": getattr(args, "data_parallel_backend", "local"),
             "ray_address": getattr(args, "ray_address", None),
             "ray_placement_strategy": getattr(args, "ray_placement_strategy", "PACK")} if data_parallel else {}
    if not data_parallel and (getattr(args, "data_parallel_backend", "local") != "local" or getattr(args, "ray_address", None)):
        raise SystemExit("--data-parallel-backend ray and --ray-address need --data-parallel-size > 1")
    engine = make_async_engine(args.model, served_model_name=args.served_model_name, **extra, **engine_kwargs)
    app = build_app(engine, server_config_from_args(args))
    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        access_log=False,  # one JSON line per request is logged by the app itself
        # The drain (DrainingServer) ends every request before uvicorn's own shutdown;
        # this only bounds what could still be open after it.
        timeout_graceful_shutdown=FLUSH_TIMEOUT_S,
        # WebSocket messages over --max-body-bytes get an error event from /v1/stream; far
        # larger ones are refused by the protocol layer (close code 1009) before buffering.
        ws_max_size=2 * args.max_body_bytes,
    )
    logger.info("serving %s on http://%s:%d/v1", app.state.livelm.model_name, args.host, args.port)
    if not getattr(args, "no_web_ui", False):
        logger.info("chat page: http://%s:%d/", args.host, args.port)
    # SIGINT/SIGTERM start the drain (new requests get 503, in-flight ones get
    # --drain-timeout seconds, then the engine stops and ends the rest with an error).
    # uvicorn restores the handlers it found when it stops: no-ops, so that a signal
    # arriving after that cannot turn a clean exit into KeyboardInterrupt.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    DrainingServer(uv_config, app.state.drain, engine.shutdown).run()
    logger.info("server stopped")
