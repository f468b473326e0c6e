"""OpenAI-compatible HTTP server: ``build_app(engine, config)`` and ``run_server(args)``."""

from livelm.entrypoints.openai.api_server import build_app, run_server
from livelm.entrypoints.openai.config import ServerConfig

__all__ = ["ServerConfig", "build_app", "run_server"]
