"""One streamed request to an OpenAI-compatible server, timed chunk by chunk."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from livelm.bench.metrics import RequestRecord


@dataclass(frozen=True)
class Target:
    """An OpenAI-compatible server under test: a name for tables, its base URL (without
    ``/v1``), the model name to send (None: ask ``/v1/models``) and an optional key."""

    name: str
    base_url: str
    model: str | None = None
    api_key: str | None = None

    @staticmethod
    def parse(spec: str, api_key: str | None = None) -> Target:
        """``NAME=URL`` or ``URL`` (named after host:port); a trailing ``/v1`` is dropped."""
        name, sep, url = spec.partition("=")
        if not sep or "://" in name:
            name, url = "", spec
        url = url.rstrip("/")
        if url.endswith("/v1"):
            url = url[: -len("/v1")]
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"target {spec!r} needs an http:// or https:// URL")
        return Target(name or url.split("://", 1)[1], url, None, api_key)


class OpenAIStreamClient:
    """Sends streamed completions or chat completions and records their timelines.

    Requests are greedy with ``ignore_eos`` (by default) so that outputs have the
    requested length; ``ignore_eos`` is an extension that livelm, vLLM, SGLang and
    llama.cpp accept and others ignore. One HTTP connection pool serves all requests.
    """

    def __init__(self, target: Target, timeout_s: float = 3600.0,
                 ignore_eos: bool = True, max_connections: int = 1024) -> None:
        self.target = target
        self.model = target.model or ""
        self.ignore_eos = ignore_eos
        headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        self._http = httpx.AsyncClient(
            base_url=target.base_url, headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=30.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def payload(self, prompt: str | list[int] | None, messages: list[dict] | None,
                max_tokens: int) -> tuple[str, dict]:
        """(route, JSON body) of one request: chat when ``messages`` is given."""
        body: dict = {"model": self.model, "max_tokens": max_tokens, "temperature": 0.0,
                      "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if messages is not None:
            return "/v1/chat/completions", {**body, "messages": messages}
        return "/v1/completions", {**body, "prompt": prompt}

    async def send(self, record: RequestRecord, prompt: str | list[int] | None = None,
                   messages: list[dict] | None = None, max_tokens: int = 16,
                   clock_origin: float = 0.0) -> RequestRecord:
        """Send one request and fill ``record`` (its ``start_s`` is set here, relative to
        ``clock_origin``, a ``time.perf_counter()`` value). Errors are recorded, not raised;
        cancellation propagates (the connection is closed, which aborts the request)."""
        route, body = self.payload(prompt, messages, max_tokens)
        start = time.perf_counter()
        record.start_s = start - clock_origin
        text: list[str] = []
        chunks = 0
        usage_out: int | None = None
        try:
            async with self._http.stream("POST", route, json=body) as resp:
                if resp.status_code != 200:
                    detail = (await resp.aread()).decode(errors="replace")[:300]
                    record.error = f"HTTP {resp.status_code}: {detail}"
                    return record
                async for event in sse_events(resp):
                    piece = chunk_text(event)
                    if piece:
                        # Time every text chunk; an empty role/finish chunk is no token.
                        record.chunk_times_s.append(time.perf_counter() - start)
                        text.append(piece)
                        chunks += 1
                    usage = event.get("usage")
                    if usage:
                        usage_out = usage.get("completion_tokens")
                        record.prompt_tokens = usage.get("prompt_tokens") or record.prompt_tokens
        except StreamError as e:
            record.error = str(e)
            return record
        except httpx.HTTPError as e:
            record.error = f"{type(e).__name__}: {e}"
            return record
        except json.JSONDecodeError as e:
            record.error = f"bad stream event: {e}"
            return record
        record.text = "".join(text)
        record.output_tokens = usage_out if usage_out is not None else chunks
        if not record.chunk_times_s:
            record.error = "no output text was streamed"
            return record
        record.success = True
        return record

    async def resolve_model(self) -> str:
        """Set and return the model to send: the target's, else the first of ``/v1/models``."""
        if not self.model:
            resp = await self._http.get("/v1/models")
            resp.raise_for_status()
            self.model = resp.json()["data"][0]["id"]
        return self.model


class StreamError(Exception):
    """An error event inside an SSE response (the server failed the request mid-stream)."""


async def sse_events(resp: httpx.Response) -> AsyncIterator[dict]:
    """The JSON events of an OpenAI-style SSE response, up to ``data: [DONE]``; an error
    event raises :class:`StreamError`, a malformed one ``json.JSONDecodeError``."""
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise StreamError(f"stream error: {event['error']}")
        yield event


def chunk_text(event: dict, index: int | None = None) -> str:
    """Output text of one completions or chat chunk ('' for role, finish and usage chunks):
    of every choice, or of choice ``index`` only."""
    out = []
    for choice in event.get("choices") or []:
        if index is not None and choice.get("index", 0) != index:
            continue
        if "text" in choice:
            out.append(choice.get("text") or "")
        else:
            out.append((choice.get("delta") or {}).get("content") or "")
    return "".join(out)
