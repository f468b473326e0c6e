"""Settings of the HTTP layer (the engine has its own)."""

from __future__ import annotations

from dataclasses import dataclass

from livelm.entrypoints.openai.tool_parsers import TOOL_PARSER_CHOICES


@dataclass(frozen=True)
class ServerConfig:
    """What the OpenAI-compatible server enforces in front of the engine.

    ``max_running`` is how many sequences the engine runs at once (its ``max_num_seqs``);
    together with ``max_waiting`` it bounds the sequences admitted but not finished, so a
    burst gets a quick 503 instead of an ever-growing queue. ``None`` for ``max_waiting``
    disables the bound.
    """

    served_model_name: str | None = None  # None: the engine's model_name
    api_key: str | None = None
    max_waiting: int | None = 512
    max_running: int | None = None  # None: the engine's max_num_seqs
    max_body_bytes: int = 8 * 1024 * 1024
    cors_origins: tuple[str, ...] = ()
    retry_after_s: int = 1
    # On SIGINT/SIGTERM: seconds in-flight requests may take to finish while new ones get
    # 503; then the rest end with an OpenAI-style error (see docs/serving.md#shutdown).
    drain_timeout_s: float = 5.0
    # Whether the app's lifespan shutdown also shuts the engine down (tests that share one
    # engine between several apps turn it off).
    shutdown_engine: bool = True
    # How tool calls are read from a reply with tool_choice "auto": "auto" picks the
    # parser from the chat template's markers; "none" leaves calls in the content.
    tool_call_parser: str = "auto"
    # The RL serving routes /v1/rl/* (docs/rl.md): weight updates, pause, abort-all, fork/join.
    enable_rl_api: bool = False
    # The chat page at / (entrypoints/openai/web/); `livelm serve --no-web-ui` turns it off.
    web_ui: bool = True

    def __post_init__(self) -> None:
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_running is not None and self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.tool_call_parser not in TOOL_PARSER_CHOICES:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_PARSER_CHOICES)}, "
                             f"got {self.tool_call_parser!r}")
        if not self.drain_timeout_s >= 0:  # also refuses NaN
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
