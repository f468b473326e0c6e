"""Routes of the chat page: ``GET /`` (the page), ``/ui/...`` (its files) and
``POST /v1/chat/template`` (a conversation rendered by the chat template, as text).

The page streams its draft into a ``/v1/stream`` session as *text*, so it needs the exact
text the chat template makes of a conversation; the engine tokenizes that text the same
way ``/v1/chat/completions`` tokenizes its rendered prompt (``add_special_tokens=False``),
so a reply to the streamed text sees the very tokens a plain chat request would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from livelm.entrypoints.openai.errors import OpenAIError
from livelm.entrypoints.openai.protocol import (
    MAX_MESSAGES,
    Bool,
    ChatMessage,
    OpenAIModel,
    Text,
)
from livelm.entrypoints.openai.serving_chat import template_messages
from livelm.entrypoints.openai.state import ServerState

STATIC_DIR = Path(__file__).parent / "static"

# The page loads only its own files: no script, style, font or image from anywhere else,
# and it talks only to this server (HTTP and the /v1/stream WebSocket).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class ChatTemplateRequest(OpenAIModel):
    """``POST /v1/chat/template``: the messages to render."""

    model: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    add_generation_prompt: Bool = True


class ChatTemplateResponse(BaseModel):
    """The rendered text and how many tokens it is."""

    prompt: str
    num_tokens: int


def add_template_route(app: FastAPI, state: ServerState) -> None:
    """``POST /v1/chat/template``: ``{"messages", "add_generation_prompt"?}`` ->
    ``{"prompt", "num_tokens"}``, the text the chat template makes of the messages."""

    @app.post("/v1/chat/template")
    async def chat_template(req: ChatTemplateRequest) -> ChatTemplateResponse:
        """The conversation as the model's chat template writes it (no tools)."""
        state.check_model(req.model)
        tokenizer = state.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise OpenAIError("this model has no chat template", 400, param="messages")
        try:
            text = tokenizer.apply_chat_template(
                template_messages(req.messages), tokenize=False,
                add_generation_prompt=req.add_generation_prompt)
        except Exception as exc:  # a template may reject a conversation (e.g. role order)
            raise OpenAIError(f"chat template failed: {exc}", 400, param="messages") from exc
        # The same tokenizing as chat_prompt_ids: the template wrote any BOS it wants.
        count = len(tokenizer(text, add_special_tokens=False).input_ids)
        return ChatTemplateResponse(prompt=text, num_tokens=count)


def add_web_ui_routes(app: FastAPI) -> None:
    """``GET /`` serves the page, ``/ui/...`` its scripts, styles and vendored libraries."""
    index = STATIC_DIR / "index.html"
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY,
               "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
               # The page is small and changes with the package: always revalidate.
               "Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        """The chat page."""
        return FileResponse(index, media_type="text/html; charset=utf-8", headers=headers)

    app.mount("/ui", StaticFiles(directory=STATIC_DIR), name="web-ui")
